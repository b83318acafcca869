"""Maps of each method after a few seeded fp32 training steps, recorded once from the code
before the speed work (#14), so that changes meant to be numerically neutral (caches, fused
optimisers, host syncs, attention kernels) can be checked against them.

``python tests/unit/agp_models/reference_maps.py`` records ``tests/data/reference_maps.pt``:
per method the exact inputs (training batches with their extras, the normal images the
inference state is fitted on, test images) and the resulting maps and scores. The inputs are
stored, not regenerated, so that changes to data loading or synthesis do not move them.
``test_reference_maps.py`` replays the same steps on today's code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

REFERENCE_FILE = Path(__file__).resolve().parents[2] / "data" / "reference_maps.pt"
STEPS = 3
# name -> (method, dotted overrides of the tiny test config): every method on the tiny CNN,
# and AGPNet on a small random ViT too (its attention prior comes from the ViT blocks).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "agpnet": ("agpnet", {}),
    "agpnet-vit": ("agpnet", {"model.backbone.name": "vit_tiny_patch16_224", "model.layers": [2, 4],
                              "model.backbone.kwargs": {"img_size": 64}}),
    "onenip": ("onenip", {}),
    "rlr": ("rlr", {}),
}


def replay(method: str, config: dict[str, Any], record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``method`` from ``config`` (dotted overrides of the tiny test config), train it
    on the recorded batches, fit its inference state and predict the recorded test images."""
    from agpctl.distributed import WorkerContext
    from agpctl.models import build_model
    from agpctl.training.steps import Trainer
    from helpers import tiny_run_config

    cfg = tiny_run_config(method, **config)
    torch.manual_seed(0)
    model = build_model(cfg)
    trainer = Trainer(model, model, cfg, steps_per_epoch=len(record["train_batches"]), ctx=WorkerContext())
    torch.manual_seed(1)
    trainer.train_epoch([dict(b) for b in record["train_batches"]])
    model.eval()
    model.fit_inference_state([dict(b) for b in record["fit_batches"]])
    with torch.no_grad():
        prediction = model.predict(record["test_images"])
    return prediction.maps.float(), prediction.scores.float()


def _half(value: Any) -> Any:
    """Inputs stored in half precision (the file stays small); replays use them as float32."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.half().float()
    if isinstance(value, dict):
        return {k: _half(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_half(v) for v in value]
    return value


def record_inputs(method: str, config: dict[str, Any], root: str) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from agp_data.anomaly_synthesis import SynthesisConfig
    from agp_data.dataset import AnomalyDataset
    from agp_data.layouts import load_samples
    from agp_data.training_view import TrainingView
    from agpctl.models import build_model
    from helpers import tiny_run_config

    cfg = tiny_run_config(method, **config)
    model = build_model(cfg)
    samples = load_samples("mvtec", root)
    mean, std = model.backbone.mean, model.backbone.std
    train = AnomalyDataset([s for s in samples if s.split == "train" and s.label == 0],
                           image_size=cfg.model.image_size, mean=mean, std=std)
    test = AnomalyDataset([s for s in samples if s.split == "test"], image_size=cfg.model.image_size,
                          mean=mean, std=std)
    view = train
    if model.batch_extras:
        view = TrainingView(train, model.batch_extras,
                            synthesis=SynthesisConfig(probability=model.pseudo_anomaly_probability), seed=3)
    loader = iter(DataLoader(view, batch_size=4, shuffle=True, num_workers=0,
                             generator=torch.Generator().manual_seed(5)))
    train_batches = [next(loader) for _ in range(STEPS)]
    fit_batches = list(DataLoader(train, batch_size=8, shuffle=False, num_workers=0))
    test_images = torch.stack([test[i]["image"] for i in range(0, len(test), 3)])
    return _half({"train_batches": train_batches, "fit_batches": fit_batches, "test_images": test_images})


def _compact(value: Any) -> Any:
    """Float inputs saved as float16: exact, since they were rounded to it before the replay."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.half()
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def load_reference() -> dict[str, Any]:
    """The recorded cases, inputs back in float32."""
    return {name: {**_half({k: v for k, v in record.items() if k not in ("maps", "scores")}),
                   "maps": record["maps"], "scores": record["scores"]}
            for name, record in torch.load(REFERENCE_FILE, weights_only=False).items()}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import agp_models  # noqa: F401  (before timm)
    from agp_data.generate import generate_dataset
    import tempfile

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(f"{tmp}/data", categories=2, train=8, test=6, size=64, seed=0)
        for name, (method, config) in CASES.items():
            record = record_inputs(method, config, root)
            maps, scores = replay(method, config, record)
            record.update(maps=maps, scores=scores)
            out[name] = record
            print(name, tuple(maps.shape), scores.tolist())
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: {**_compact({k: v for k, v in record.items() if k not in ("maps", "scores")}),
                       "maps": record["maps"], "scores": record["scores"]} for name, record in out.items()},
               REFERENCE_FILE)
    print(f"wrote {REFERENCE_FILE} ({REFERENCE_FILE.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
