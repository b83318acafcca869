"""agpctl report without a model: the page built from made-up predictions has every section,
no network address, embedded pictures that decode, and the thresholds, history and examples
it was given; the command refuses a bad --out before any evaluation."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from agpctl.cli import cli
from agpctl.errors import UserError
from agpctl.inference.report import SECTIONS, render_report, report_uri
from agpctl.inference.report_inputs import CategoryThresholds, ReportInputs, thresholds_for
from agpctl.inference.report_panels import select_examples
from agpctl.inference.report_plots import thin_curve
from agpctl.inference.scoring import Predictions

SIZE = 32  # the made-up model's map size


class PageParts(HTMLParser):
    """Element ids, every src / href, the <img> sources and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.add(attributes["id"])
        for name in ("src", "href"):
            if name in attributes:
                self.links.append(attributes[name])
        if tag == "img":
            self.images.append(attributes.get("src", ""))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> PageParts:
    parts = PageParts()
    parts.feed(page)
    return parts


def decode(src: str) -> Image.Image:
    header, _, payload = src.partition(",")
    assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header[:40]
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image


def made_up_predictions(tmp_path) -> Predictions:
    """Two categories, 3 normal + 3 defective test images each; defects score higher."""
    rng = np.random.default_rng(0)
    scores, maps, masks, labels, categories, paths = [], [], [], [], [], []
    for category in ("bottle", "screw"):
        for index in range(6):
            defective = index >= 3
            mask = np.zeros((SIZE, SIZE), bool)
            if defective:
                mask[8:16, 10:20] = True
            score_map = (rng.random((SIZE, SIZE)) + 2.0 * mask).astype(np.float32)
            path = tmp_path / category / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)  # not square
            scores.append(float(score_map.max()) + index * 0.01)
            maps.append(score_map)
            masks.append(mask)
            labels.append(int(defective))
            categories.append(category)
            paths.append(str(path))
    return Predictions(indices=np.arange(len(scores)), scores=np.array(scores, np.float32), maps=np.stack(maps),
                       masks=np.stack(masks), labels=np.array(labels), categories=categories, paths=paths)


def made_up_inputs(tmp_path, *, history=True, thresholds=True) -> ReportInputs:
    predictions = made_up_predictions(tmp_path)
    stored = {"image": 1.5, "pixel": 1.25,
              "per_category": {"bottle": {"image": 2.75, "pixel": 1.5, "images": 40, "stable": True}}}
    records = [{"epoch": e, "loss": 1.0 / e, "losses": {"reconstruction": 0.8 / e}, "lr": 1e-4, "images_per_s": 12.0,
                "seconds": 10.0, "val": {"i_auroc": 0.5 + e / 10, "p_auroc": 0.6, "pro": 0.4, "objective": 0.5}}
               for e in (1, 2, 3)]
    return ReportInputs(
        run_uri=str(tmp_path / "run"),
        configuration=[("method", "agpnet"), ("categories", "bottle, screw")],
        table=predictions.metrics(),
        predictions=predictions,
        thresholds={c: thresholds_for(stored if thresholds else {}, c) for c in ("bottle", "screw")},
        history={"": records} if history else {},
        source="made up for a test",
    )


def test_the_page_has_every_section_and_only_embedded_pictures(tmp_path) -> None:
    page = render_report(made_up_inputs(tmp_path), examples=2)
    parts = parse(page)
    assert {key for key, _ in SECTIONS} <= parts.ids
    assert not [link for link in parts.links if link.lower().startswith(("http:", "https:", "//", "file:"))]
    assert "http://" not in page and "https://" not in page
    # 5 curves + 2 histograms + 1 learning-curve figure + the colour bar, and per category
    # 3 groups of 2 images (2 FP, 2 FN, 1 best: 3 defective) with 4 tiles each
    assert len(parts.images) == 5 + 2 + 1 + 1 + 2 * (2 + 2 + 1) * 4
    sizes = [decode(src).size for src in parts.images]
    assert all(width > 0 and height > 0 for width, height in sizes)
    assert (160, 120) in sizes  # a 64×48 test image's tiles keep its aspect ratio
    text = " ".join(parts.text)
    assert "image 2.75, pixel 1.5 — the category's own (40 held-out images)" in text  # bottle's own
    assert "image 1.5, pixel 1.25 — pooled over all categories" in text  # screw: the pooled one
    assert "3 epoch(s) recorded, 30 s of training, 12.0 images/s on average" in text


def test_a_run_without_history_or_thresholds_says_so(tmp_path) -> None:
    page = render_report(made_up_inputs(tmp_path, history=False, thresholds=False), examples=1)
    parts = parse(page)
    text = " ".join(parts.text)
    assert "This run has no training history (history.jsonl)" in text
    assert "no pixel threshold: no predicted masks" in text
    # without a pixel threshold each example has 3 tiles: 1 FP + 1 FN + 1 best per category
    assert len(parts.images) == 5 + 2 + 1 + 2 * 3 * 3
    assert all(decode(src).size[0] > 0 for src in parts.images)


def test_examples_are_the_most_telling_images(tmp_path) -> None:
    predictions = made_up_predictions(tmp_path)
    chosen = select_examples(predictions, "screw", 2)
    # screw is samples 6..11: 6-8 normal, 9-11 defective, scores rising with the index
    assert chosen["false_positives"] == [8, 7]
    assert chosen["false_negatives"] == [9, 10]
    assert chosen["best_detections"] == [11]
    assert select_examples(predictions, "screw", 0) == {"false_positives": [], "false_negatives": [],
                                                        "best_detections": []}


def test_thresholds_of_a_category_are_those_predict_uses() -> None:
    stored = {"image": 1.0, "pixel": 2.0, "quantile": 0.99, "per_category": {
        "a": {"image": 3.0, "pixel": 4.0, "images": 12, "stable": True},
        "b": {"image": 5.0, "pixel": 6.0, "images": 3, "stable": False}}}
    assert thresholds_for(stored, "a") == CategoryThresholds(3.0, 4.0, "the category's own (12 held-out images)", True)
    unstable = thresholds_for(stored, "b")  # too few images: the pooled ones decide, and the page says why
    assert (unstable.image, unstable.pixel, unstable.stable) == (1.0, 2.0, False)
    assert "own (5) rests on only 3 held-out images" in unstable.source
    assert thresholds_for(stored, "c") == CategoryThresholds(1.0, 2.0, "pooled over all categories")
    assert thresholds_for({"source": "none", "image": None, "pixel": None}, "a").image is None
    assert thresholds_for({"image": 1.0, "pixel": 2.0}, "a", own_model=True).source == "the category's model"


def test_long_curves_are_thinned_keeping_their_ends_and_order() -> None:
    x = np.sort(np.random.default_rng(1).random(100_000))
    y = np.sqrt(x)
    thin_x, thin_y = thin_curve(x, y, max_points=500)
    assert 400 <= len(thin_x) <= 502
    assert (thin_x[0], thin_x[-1]) == (x[0], x[-1]) and np.all(np.diff(thin_x) >= 0)
    np.testing.assert_array_equal(thin_y, np.sqrt(thin_x))  # points of the curve, not new ones
    assert np.max(np.diff(thin_x)) < 0.01  # no long stretch left out
    short = np.arange(10.0)
    assert thin_curve(short, short, max_points=500)[0] is short


def test_saved_maps_load_back_and_a_wrong_file_is_one_line(tmp_path) -> None:
    predictions = made_up_predictions(tmp_path)
    predictions.save_npz(str(tmp_path / "maps.npz"))
    loaded = Predictions.load_npz(str(tmp_path / "maps.npz"))
    np.testing.assert_array_equal(loaded.maps, predictions.maps)
    assert loaded.categories == predictions.categories and loaded.paths == predictions.paths
    assert loaded.metrics() == predictions.metrics()
    (tmp_path / "not.npz").write_bytes(b"hello")
    with pytest.raises(UserError, match=r"not\.npz is not a maps file of agpctl eval --save-maps"):
        Predictions.load_npz(str(tmp_path / "not.npz"))


def test_report_location() -> None:
    assert report_uri("/runs/a/", None) == "/runs/a/report.html"
    assert report_uri("s3://bucket/runs/a", "out.html") == "out.html"
    with pytest.raises(UserError, match="--out is required for the s3:// run"):
        report_uri("s3://bucket/runs/a", None)


@pytest.mark.parametrize("case", ["a folder", "under a file", "s3 run without --out"])
def test_a_bad_out_fails_before_any_evaluation(tmp_path, monkeypatch, case) -> None:
    import agpctl.cli.report as report_command

    def never(*args, **kwargs):
        raise AssertionError("the run was evaluated before --out was checked")

    monkeypatch.setattr(report_command, "gather_report_inputs", never)
    (tmp_path / "a-file.txt").write_text("x")
    out = {"a folder": [str(tmp_path)], "under a file": [str(tmp_path / "a-file.txt" / "report.html")],
           "s3 run without --out": []}[case]
    run = "s3://bucket/runs/a" if case.startswith("s3") else str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["report", "--run", run, *(["--out", *out] if out else [])])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1, message
    expected = {"a folder": "it is a folder", "under a file": "a-file.txt is a file, not a folder",
                "s3 run without --out": "--out is required"}[case]
    assert expected in message
