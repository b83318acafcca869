"""Which category an image shows: named by the user, named by its path, or inferred.

A multi-class model scores every category, but thresholds are calibrated per category, so
predict must know each image's category. Inferring it compares the image's pooled backbone
features with one prototype per category, the mean pooled feature of that category's normal
training images (computed once at training and stored in the checkpoint payload under
``"categories"``). The backbone is frozen, so a prototype never goes stale as training goes on.

Pooled feature of an image: for each of the model's backbone layers, the global average of
its feature map, L2-normalised (so that no layer outweighs another by its scale), then
concatenated. Similarity is cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from agp_models.base import AnomalyModel
from agpctl.models import autocast

PAYLOAD_KEY = "categories"  # where a checkpoint payload holds the prototypes
FEATURE = "per-layer L2-normalised global average of the backbone's feature maps, concatenated; cosine similarity"


def pooled_features(model: AnomalyModel, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """(B, D) float32 pooled backbone features of normalised ``images`` (B, 3, S, S)."""
    with torch.no_grad(), autocast(precision, images.device):
        maps = model.backbone(images).features
    return torch.cat([F.normalize(m.float().mean(dim=(2, 3)), dim=1) for m in maps], dim=1)


@dataclass
class CategoryPrototypes:
    names: list[str]  # sorted
    vectors: torch.Tensor  # (K, D) float32 on the CPU, row k the prototype of names[k]
    images: list[int]  # training images behind each prototype

    def to_payload(self) -> dict[str, Any]:
        return {"names": list(self.names), "prototypes": self.vectors.clone(), "images": list(self.images)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any] | None) -> "CategoryPrototypes | None":
        """The prototypes a checkpoint payload stores, or None (runs trained before they existed)."""
        if not payload or "prototypes" not in payload:
            return None
        return cls(list(payload["names"]), payload["prototypes"].float().cpu(), [int(n) for n in payload["images"]])

    def summary(self) -> dict[str, Any]:
        """What ``categories.json`` records: the names, their image counts and how features are compared."""
        return {"categories": list(self.names), "images": dict(zip(self.names, self.images)),
                "feature": FEATURE, "dimensions": int(self.vectors.shape[1])}

    def nearest(self, features: torch.Tensor) -> list[tuple[str, float]]:
        """(category, cosine similarity) of the closest prototype to each row of ``features``."""
        similarity = F.normalize(features.float().cpu(), dim=1) @ F.normalize(self.vectors, dim=1).T
        best, index = similarity.max(dim=1)
        return [(self.names[int(i)], float(s)) for s, i in zip(best, index)]


def category_prototypes(model: AnomalyModel, dataset: Dataset, device: torch.device, batch_size: int,
                        precision: str = "fp32", loader_workers: int = 0) -> CategoryPrototypes:
    """The mean pooled feature of each category's images in ``dataset`` (normal training images)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for batch in loader:
        features = pooled_features(model, batch["image"].to(device), precision).cpu()
        for category, vector in zip(batch["category"], features):
            sums[category] = sums[category] + vector if category in sums else vector.clone()
            counts[category] = counts.get(category, 0) + 1
    names = sorted(sums)
    vectors = torch.stack([sums[n] / counts[n] for n in names]) if names else torch.zeros(0, 0)
    return CategoryPrototypes(names, vectors, [counts[n] for n in names])
