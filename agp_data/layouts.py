"""Dataset layouts: parse a directory tree (local or ``s3://``) into :class:`Sample` records.

Supported layouts (``DATASETS``):

- ``mvtec`` / ``synthetic``: ``<cat>/train/good/*``, ``<cat>/test/<defect>/*``,
  ``<cat>/ground_truth/<defect>/<stem>_mask.png``.
- ``visa``: ``split_csv/1cls.csv`` (object, split, label, image, mask) over the original tree.
- ``btad``: categories ``01``–``03``: ``<cat>/train/ok``, ``<cat>/test/{ok,ko}``,
  ``<cat>/ground_truth/ko/<stem>.{png,bmp}``.
- ``mvtec3d``: RGB only: ``<cat>/{train,test}/<defect>/rgb/*.png``, masks
  ``<cat>/test/<defect>/gt/<stem>.png`` (the ``validation`` split is not used).
- ``folder``: explicit folders of normal / abnormal images and masks (:class:`FolderLayout`).

Images may have any extension in :data:`agp_data.images.IMAGE_EXTENSIONS`; masks are found by
stem with any image extension (``<stem>.png``, ``<stem>_mask.bmp`` ...). A defective test image
without a mask keeps label 1 and ``mask=None``; pixel metrics treat it as an all-zero mask.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

from agp_data import storage
from agp_data.errors import DataError
from agp_data.images import is_image_file
from agp_data.samples import Sample

DATASETS = ("synthetic", "mvtec", "visa", "btad", "mvtec3d", "folder")
SPLITS = ("train", "test")
VISA_SPLIT_CSV = "split_csv/1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")

LAYOUT_HINTS = {
    "mvtec": (
        "<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png and "
        "<root>/<category>/ground_truth/<defect>/<name>_mask.png"
    ),
    "synthetic": (
        "the MVTec-AD layout <root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png "
        "(create one with `agpctl data generate --out DIR`)"
    ),
    "btad": (
        "<root>/01/train/ok/*.bmp, <root>/01/test/{ok,ko}/*.bmp and <root>/01/ground_truth/ko/<name>.png"
    ),
    "mvtec3d": (
        "<root>/<category>/train/good/rgb/*.png, <root>/<category>/test/<defect>/rgb/*.png and "
        "masks in <root>/<category>/test/<defect>/gt/*.png"
    ),
    "visa": (
        f"<root>/{VISA_SPLIT_CSV} (columns {','.join(VISA_COLUMNS)}) over the VisA tree, "
        "as extracted from VisA_20220922.tar"
    ),
    "folder": "a folder of normal images (--normal-dir), optionally --abnormal-dir and --mask-dir",
}


@dataclass
class FolderLayout:
    """A generic layout given as folders.

    - ``normal_dir``: defect-free images (searched recursively). Sorted by relative path, they
      are split deterministically: image ``i`` goes to test when ``floor((i+1)·f)`` exceeds
      ``floor(i·f)`` (f = ``test_fraction``), i.e. evenly spread, ``floor(n·f)`` test images.
    - ``abnormal_dir``: defective images, all in the test split with label 1; the defect type is
      the sub-folder name (``abnormal/scratch/x.png`` → ``scratch``) or ``abnormal``.
    - ``mask_dir``: masks matched by stem (``<stem>.png``, ``<stem>_mask.png``, any image
      extension), preferring the same sub-folder as the image. An abnormal image without a mask
      gets ``mask=None`` and label 1: pixel metrics then treat it as all-zero.

    Relative folders are resolved below the ``root`` given to :func:`load_samples`, if any.
    """

    normal_dir: str
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    test_fraction: float = 0.2
    category: str = "folder"


@dataclass
class LayoutScan:
    """Everything found under a dataset root, before selecting categories or splits."""

    dataset: str
    root: str
    categories: list[str]  # every category found, including empty ones
    samples: list[Sample]
    orphan_masks: list[str] = field(default_factory=list)  # masks that match no image
    missing_files: list[str] = field(default_factory=list)  # listed in a split file, absent

    def samples_of(self, category: str, split: str | None = None) -> list[Sample]:
        return [s for s in self.samples if s.category == category and (split is None or s.split == split)]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def load_samples(
    dataset: str,
    root: str | None,
    *,
    categories: list[str] | tuple[str, ...] | str | None = None,
    split: str | None = None,
    folder: FolderLayout | None = None,
) -> list[Sample]:
    """Samples of ``dataset`` under ``root`` (local path or ``s3://``), ordered by category,
    split (train first) and path. ``split`` None = both. ``categories`` None = all found.

    Raises DataError for a missing root, a tree that is not the layout, an unknown category, a
    category with no images (in the requested split), and VisA split entries whose files are
    missing.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split '{split}': use 'train', 'test' or None for both")
    scan = scan_layout(dataset, root, folder=folder)
    selected = select_categories(scan, categories)
    if scan.missing_files:
        wanted = set(selected)
        missing = [p for p in scan.missing_files if _category_of_missing(scan, p) in wanted]
        if missing:
            raise DataError(
                f"{len(missing)} file(s) listed in {storage.join(scan.root, VISA_SPLIT_CSV)} are "
                f"missing, e.g. {missing[0]}: re-extract the dataset (agpctl data download {dataset})"
            )
    result: list[Sample] = []
    for category in selected:
        chosen = scan.samples_of(category, split)
        if not chosen:
            where = f"{split} images" if split else "images"
            raise DataError(
                f"category '{category}' in {scan.root} has no {where}: expected {LAYOUT_HINTS[dataset]}"
            )
        result.extend(chosen)
    return result


def list_categories(dataset: str, root: str | None, folder: FolderLayout | None = None) -> list[str]:
    """Sorted category names found under ``root`` (for ``folder``: the layout's category)."""
    return scan_layout(dataset, root, folder=folder).categories


def select_categories(scan: LayoutScan, categories: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Validate requested categories against a scan (None = all, "a,b" strings accepted)."""
    if categories is None:
        return list(scan.categories)
    if isinstance(categories, str):
        categories = [c for c in categories.split(",")]
    requested = [str(c).strip() for c in categories if str(c).strip()]
    if not requested:
        return list(scan.categories)
    unknown = [c for c in requested if c not in scan.categories]
    if unknown:
        available = ", ".join(scan.categories) or "none"
        raise DataError(
            f"unknown category '{unknown[0]}' in {scan.root} ({scan.dataset}): available: {available}"
        )
    return list(dict.fromkeys(requested))


def resolve_root(dataset: str, root: str | None, folder: FolderLayout | None = None) -> str | None:
    """Check the dataset name and root; returns the root to use (absolute for local paths)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASETS)}")
    if root is None or str(root).strip() == "":
        if dataset == "synthetic":
            from agp_data.generate import synthetic_root

            return synthetic_root()
        if dataset == "folder":
            return None
        raise DataError(f"dataset '{dataset}' needs a root directory (--root DIR or s3://bucket/path)")
    root = str(root).strip()
    if storage.is_s3(root):
        storage.split_s3(root)  # rejects malformed URIs early with a clear message
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root))


def scan_layout(dataset: str, root: str | None, folder: FolderLayout | None = None) -> LayoutScan:
    """Parse everything under ``root`` without judging emptiness (used by inspect and loaders)."""
    root = resolve_root(dataset, root, folder)
    if dataset == "folder":
        if folder is None:
            raise DataError(
                "dataset 'folder' needs a FolderLayout: give --normal-dir (and optionally "
                "--abnormal-dir, --mask-dir)"
            )
        return _scan_folder(folder, root)
    assert root is not None
    if not storage.is_dir(root):
        raise DataError(f"dataset root {root} does not exist or is empty: expected {LAYOUT_HINTS[dataset]}")
    if dataset == "visa":
        return _scan_visa(root)
    files = storage.list_files(root)
    relatives = [_relative(root, f) for f in files]
    if dataset == "mvtec3d":
        scan = _scan_mvtec3d(root, files, relatives)
    else:
        good_names = ("ok", "good") if dataset == "btad" else ("good",)
        scan = _scan_category_tree(dataset, root, files, relatives, good_names)
    if not scan.categories:
        hint = ""
        if any(rel.split("/")[0] in ("train", "test") for rel in relatives):
            hint = f" ({root} looks like a single category: use its parent folder as the root)"
        raise DataError(f"no {dataset} categories under {root}: expected {LAYOUT_HINTS[dataset]}{hint}")
    return scan


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------
def _relative(root: str, full: str) -> str:
    if storage.is_s3(root):
        return full[len(root.rstrip("/")) + 1 :]
    return os.path.relpath(full, root).replace(os.sep, "/")


def _stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def _mask_stem(name: str) -> tuple[str, bool]:
    """``000_mask.png`` → (``000``, True); ``000.png`` → (``000``, False)."""
    stem = _stem(name)
    if stem.endswith("_mask"):
        return stem[: -len("_mask")], True
    return stem, False


def _hidden(parts: list[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


class _MaskIndex:
    """Masks keyed by (group, stem); a ``<stem>_mask`` file wins over a plain ``<stem>`` one."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, tuple[str, bool]] = {}
        self._used: set[str] = set()

    def add(self, key: tuple, path: str, explicit_mask_suffix: bool) -> None:
        current = self._by_key.get(key)
        if current is None or (explicit_mask_suffix and not current[1]):
            self._by_key[key] = (path, explicit_mask_suffix)

    def take(self, key: tuple) -> str | None:
        found = self._by_key.get(key)
        if found is None:
            return None
        self._used.add(found[0])
        return found[0]

    def all_paths(self) -> list[str]:
        return sorted(path for path, _ in self._by_key.values())

    def unused(self) -> list[str]:
        return [p for p in self.all_paths() if p not in self._used]


def _sorted_samples(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: (s.category, SPLITS.index(s.split), s.image))


def _scan_category_tree(
    dataset: str, root: str, files: list[str], relatives: list[str], good_names: tuple[str, ...]
) -> LayoutScan:
    categories: set[str] = set()
    images: list[tuple[str, str, str, str]] = []  # (category, split, defect dir, path)
    masks = _MaskIndex()
    for full, rel in zip(files, relatives):
        parts = rel.split("/")
        if len(parts) < 3 or _hidden(parts) or parts[1] not in ("train", "test", "ground_truth"):
            continue
        categories.add(parts[0])
        if len(parts) != 4 or not is_image_file(parts[3]):
            continue
        category, section, defect_dir, name = parts
        if section == "ground_truth":
            stem, suffixed = _mask_stem(name)
            masks.add((category, defect_dir, stem), full, suffixed)
        elif section == "train" and defect_dir in good_names:
            images.append((category, "train", defect_dir, full))
        elif section == "test":
            images.append((category, "test", defect_dir, full))

    samples = []
    for category, split, defect_dir, full in images:
        normal = defect_dir in good_names
        mask = None if normal else masks.take((category, defect_dir, _stem(full)))
        samples.append(
            Sample(
                image=full,
                mask=mask,
                label=0 if normal else 1,
                category=category,
                defect="good" if normal else defect_dir,
                split=split,
            )
        )
    return LayoutScan(dataset, root, sorted(categories), _sorted_samples(samples), masks.unused())


def _scan_mvtec3d(root: str, files: list[str], relatives: list[str]) -> LayoutScan:
    categories: set[str] = set()
    images: list[tuple[str, str, str, str]] = []
    masks = _MaskIndex()
    for full, rel in zip(files, relatives):
        parts = rel.split("/")
        if len(parts) < 3 or _hidden(parts) or parts[1] not in ("train", "validation", "test"):
            continue
        categories.add(parts[0])
        if len(parts) != 5 or not is_image_file(parts[4]):
            continue
        category, section, defect_dir, kind, name = parts
        if section == "train" and defect_dir == "good" and kind == "rgb":
            images.append((category, "train", defect_dir, full))
        elif section == "test" and kind == "rgb":
            images.append((category, "test", defect_dir, full))
        elif section == "test" and kind == "gt":
            stem, suffixed = _mask_stem(name)
            masks.add((category, defect_dir, stem), full, suffixed)

    samples = []
    for category, split, defect_dir, full in images:
        normal = defect_dir == "good"
        mask = None if normal else masks.take((category, defect_dir, _stem(full)))
        samples.append(
            Sample(full, mask, 0 if normal else 1, category, "good" if normal else defect_dir, split)
        )
    # Masks of good test images (all-zero in MVTec-3D) are legitimately unused: not orphans.
    orphans = [m for m in masks.unused() if _relative(root, m).split("/")[2] != "good"]
    return LayoutScan("mvtec3d", root, sorted(categories), _sorted_samples(samples), orphans)


def _scan_visa(root: str) -> LayoutScan:
    csv_uri = storage.join(root, VISA_SPLIT_CSV)
    if not storage.exists(csv_uri):
        raise DataError(f"{root} is not a VisA root: missing {csv_uri}; expected {LAYOUT_HINTS['visa']}")
    reader = csv.DictReader(io.StringIO(storage.read_text(csv_uri).lstrip("\ufeff")))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing_columns = [c for c in VISA_COLUMNS if c not in columns]
    if missing_columns:
        raise DataError(
            f"{csv_uri} lacks column(s) {', '.join(missing_columns)}: expected {','.join(VISA_COLUMNS)}"
        )
    present = {_relative(root, f) for f in storage.list_files(root)}
    samples: list[Sample] = []
    missing: list[str] = []
    categories: set[str] = set()
    for line_number, raw_row in enumerate(reader, start=2):
        row = {str(k).strip(): (v or "").strip() for k, v in raw_row.items() if k is not None}
        category, split, label_text = row["object"], row["split"].lower(), row["label"].lower()
        if not category and not row["image"]:
            continue  # blank line
        if split not in SPLITS or label_text not in ("normal", "anomaly"):
            raise DataError(
                f"{csv_uri} line {line_number}: split must be train/test and label normal/anomaly, "
                f"got '{row['split']}', '{row['label']}'"
            )
        categories.add(category)
        image_rel = _clean_relative(row["image"])
        if image_rel not in present:
            missing.append(storage.join(root, image_rel))
            continue
        mask_rel = _clean_relative(row["mask"]) if row["mask"] else ""
        label = 1 if label_text == "anomaly" else 0
        mask = None
        if label == 1 and mask_rel:
            if mask_rel in present:
                mask = storage.join(root, mask_rel)
            else:
                missing.append(storage.join(root, mask_rel))
        samples.append(
            Sample(
                image=storage.join(root, image_rel),
                mask=mask,
                label=label,
                category=category,
                defect="anomaly" if label else "good",
                split=split,
            )
        )
    return LayoutScan("visa", root, sorted(categories), _sorted_samples(samples), [], missing)


def _clean_relative(path: str) -> str:
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path.lstrip("/")


def _category_of_missing(scan: LayoutScan, path: str) -> str:
    # VisA paths start with the object name (candle/Data/Images/...).
    return _relative(scan.root, path).split("/")[0]


def _resolve_folder(path: str | None, root: str | None, what: str, required: bool) -> str | None:
    if path is None or str(path).strip() == "":
        if required:
            raise DataError(f"{what} is required for the folder layout")
        return None
    path = str(path).strip()
    if storage.is_s3(path):
        storage.split_s3(path)
        resolved = path.rstrip("/")
    elif root is not None and not os.path.isabs(os.path.expanduser(path)):
        resolved = (
            storage.join(root, path) if storage.is_s3(root) else os.path.abspath(os.path.join(root, path))
        )
    else:
        resolved = os.path.abspath(os.path.expanduser(path))
    if not storage.is_dir(resolved):
        raise DataError(f"{what} {resolved} does not exist or is empty: point it at a folder of images")
    return resolved


def _inside(path: str, directory: str | None) -> bool:
    if directory is None:
        return False
    return path.startswith(directory.rstrip("/" + os.sep) + ("/" if storage.is_s3(directory) else os.sep))


def _images_under(directory: str, exclude: tuple[str | None, ...]) -> list[tuple[str, str]]:
    """(full path, relative path) of images below ``directory``, skipping nested excluded dirs."""
    found = []
    for full in storage.list_files(directory):
        rel = _relative(directory, full)
        if _hidden(rel.split("/")) or not is_image_file(full):
            continue
        # Skip other layout folders nested inside this one (e.g. normal/defects/).
        nested = [d for d in exclude if d and d != directory and _inside(d, directory)]
        if any(_inside(full, other) for other in nested):
            continue
        found.append((full, rel))
    return sorted(found, key=lambda item: item[1])


def folder_test_indices(count: int, test_fraction: float) -> list[int]:
    """Indices (into the sorted normal images) that go to the test split; see FolderLayout."""
    fraction = Fraction(test_fraction).limit_denominator(10**6)
    return [i for i in range(count) if (fraction * (i + 1)).__floor__() > (fraction * i).__floor__()]


def _scan_folder(layout: FolderLayout, root: str | None) -> LayoutScan:
    if not 0.0 <= float(layout.test_fraction) < 1.0:
        raise DataError(f"test_fraction={layout.test_fraction} must be in [0, 1)")
    category = str(layout.category).strip() or "folder"
    normal_dir = _resolve_folder(layout.normal_dir, root, "normal_dir", required=True)
    abnormal_dir = _resolve_folder(layout.abnormal_dir, root, "abnormal_dir", required=False)
    mask_dir = _resolve_folder(layout.mask_dir, root, "mask_dir", required=False)
    assert normal_dir is not None
    excluded = (normal_dir, abnormal_dir, mask_dir)

    samples: list[Sample] = []
    normals = _images_under(normal_dir, excluded)
    test_indices = set(folder_test_indices(len(normals), float(layout.test_fraction)))
    for i, (full, _) in enumerate(normals):
        split = "test" if i in test_indices else "train"
        samples.append(Sample(full, None, 0, category, "good", split))

    masks = _MaskIndex()
    keys_by_stem: dict[str, set[tuple[str, str]]] = defaultdict(set)
    if mask_dir is not None:
        for full, rel in _images_under(mask_dir, excluded):
            stem, suffixed = _mask_stem(rel)
            key = (posixpath.dirname(rel), stem)
            masks.add(key, full, suffixed)
            keys_by_stem[stem].add(key)
    if abnormal_dir is not None:
        for full, rel in _images_under(abnormal_dir, excluded):
            subdir = posixpath.dirname(rel)
            stem = _stem(rel)
            # Same sub-folder first, then the mask folder's top level, then a unique stem anywhere.
            mask = masks.take((subdir, stem))
            if mask is None and subdir:
                mask = masks.take(("", stem))
            if mask is None and len(keys_by_stem.get(stem, ())) == 1:
                mask = masks.take(next(iter(keys_by_stem[stem])))
            defect = subdir.split("/")[0] if subdir else "abnormal"
            samples.append(Sample(full, mask, 1, category, defect, "test"))
    display_root = root if root is not None else normal_dir
    return LayoutScan("folder", display_root, [category], _sorted_samples(samples), masks.unused())
