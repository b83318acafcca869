"""Config dataclasses: YAML round trip, overrides and clear errors."""

import pytest

from agpctl.config import RunConfig
from agpctl.errors import UserError
from agpctl.cli.run_flags import RUN_FLAGS, config_from_options


def test_yaml_round_trip_is_lossless():
    cfg = RunConfig(method="agpnet")
    cfg.train.epochs = 7
    cfg.model.backbone.kwargs = {"pad_type": "same"}
    cfg.data.categories = ["a", "b"]
    again = RunConfig.from_yaml(cfg.to_yaml())
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()


def test_unknown_field_is_rejected_with_its_name():
    with pytest.raises(UserError, match="unknown field.*epoch_count"):
        RunConfig.from_yaml("train:\n  epoch_count: 3\n")


def test_wrong_type_names_the_field():
    with pytest.raises(UserError, match="epochs.*integer"):
        RunConfig.from_yaml("train:\n  epochs: many\n")


def test_bad_yaml_is_one_clear_error():
    with pytest.raises(UserError, match="not valid YAML"):
        RunConfig.from_yaml("train: [unclosed\n")


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 5\n  batch_size: 4\nmodel:\n  lr: 0.001\n")
    cfg = config_from_options({"config_path": str(path), "epochs": 9, "layers": "3,6", "backbone_kwargs": "pad_type=same,depth=4",
                               "mean": "0.5,0.5,0.5", "set_values": ("data.val_fraction=0.2",)})
    assert cfg.train.epochs == 9  # flag beats YAML
    assert cfg.train.batch_size == 4  # YAML beats default
    assert cfg.model.lr == 0.001
    assert cfg.model.layers == [3, 6]
    assert cfg.model.backbone.kwargs == {"pad_type": "same", "depth": 4}
    assert cfg.model.backbone.mean == [0.5, 0.5, 0.5]
    assert cfg.data.val_fraction == 0.2


def test_every_flag_maps_to_an_existing_field():
    cfg = RunConfig().to_dict()
    for flag, path, _, _ in RUN_FLAGS:
        node = cfg
        for key in path.split("."):
            assert key in node, f"{flag} -> {path}: no such config field"
            node = node[key]


def test_changing_method_swaps_the_model_config():
    cfg = config_from_options({"method": "rlr"})
    assert cfg.method == "rlr"
    assert type(cfg.model).__name__ == "RLRConfig"
    with pytest.raises(UserError, match="unknown method"):
        config_from_options({"method": "nope"})


def test_a_saved_rlr_config_with_the_retired_batch_size_still_loads_with_a_warning(capsys):
    cfg = RunConfig.from_yaml("method: rlr\nmodel:\n  batch_size: 4\n  alpha: 0.5\n", "runs/old/config.yaml")
    assert cfg.method == "rlr" and cfg.model.alpha == 0.5 and not hasattr(cfg.model, "batch_size")
    err = " ".join(capsys.readouterr().err.split())
    assert "runs/old/config.yaml: model.batch_size is ignored" in err and "train.batch_size" in err


def test_a_retired_field_given_on_the_command_line_is_refused():
    with pytest.raises(UserError, match="model.batch_size is no longer a field.*train.batch_size"):
        RunConfig(method="rlr").with_overrides({"model.batch_size": 8})


def test_a_model_section_that_is_not_a_mapping_is_one_clear_error():
    with pytest.raises(UserError, match="my.yaml: model: expected a mapping for RLRConfig, got 'fast'"):
        RunConfig.from_yaml("method: rlr\nmodel: fast\n", "my.yaml")
