"""Dataset health check: what a layout parser finds under a root, and what looks wrong.

Counts come from the layout parser. Images and masks are decoded in full (a truncated file has a
header that looks fine), in a thread pool: for local roots every one, for ``s3://`` roots a few
per category (evenly spread). Mask problems are those of :mod:`agp_data.integrity`, which
training and evaluation check too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from agp_data import storage
from agp_data.images import decoded_size
from agp_data.integrity import MISSING_MASK, Problem, lacks_mask, measure_samples
from agp_data.layouts import FolderLayout, LayoutScan, _relative, scan_layout, select_categories
from agp_data.samples import Sample

S3_IMAGES_PER_CATEGORY = 16  # images decoded per category of an s3:// root
MAX_SIZES_LISTED = 10


@dataclass
class CategoryReport:
    name: str
    train_good: int = 0
    test_good: int = 0
    test_defect: int = 0
    defect_types: dict[str, int] = field(default_factory=dict)
    masks_found: int = 0
    masks_missing: int = 0
    # "WxH" → number of checked images of that size (the most common ones, at most
    # MAX_SIZES_LISTED); min/max by area and the number of distinct sizes cover all checked images.
    image_sizes: dict[str, int] = field(default_factory=dict)
    distinct_sizes: int = 0
    min_size: str | None = None
    max_size: str | None = None
    sizes_checked: int = 0  # images that were decoded

    @property
    def total(self) -> int:
        return self.train_good + self.test_good + self.test_defect


@dataclass
class DatasetReport:
    dataset: str
    root: str
    categories: list[CategoryReport]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        categories = []
        for report in self.categories:
            entry = asdict(report)
            entry["total"] = report.total
            categories.append(entry)
        return {
            "dataset": self.dataset,
            "root": self.root,
            "ok": self.ok,
            "categories": categories,
            "totals": {
                key: sum(getattr(c, key) for c in self.categories)
                for key in ("train_good", "test_good", "test_defect", "masks_found", "masks_missing")
            },
            "problems": [asdict(p) for p in self.problems],
        }


def _evenly_spaced(items: list, count: int) -> list:
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def _category_of(scan: LayoutScan, path: str) -> str:
    if scan.dataset == "folder":
        return scan.categories[0]
    return _relative(scan.root, path).split("/")[0]


def _check_files(
    samples: list[Sample], report: CategoryReport, problems: list[Problem], remote: bool
) -> None:
    sizes: Counter[str] = Counter()
    checked = _evenly_spaced(samples, S3_IMAGES_PER_CATEGORY) if remote else samples
    for size, found in measure_samples(checked, decoded_size):
        problems.extend(found)
        if size is not None:
            sizes[f"{size[0]}x{size[1]}"] += 1

    def area(key: str) -> tuple[int, str]:
        width, height = (int(v) for v in key.split("x"))
        return width * height, key

    by_area = sorted(sizes, key=area)
    report.image_sizes = dict(sizes.most_common(MAX_SIZES_LISTED))
    report.distinct_sizes = len(sizes)
    report.min_size = by_area[0] if by_area else None
    report.max_size = by_area[-1] if by_area else None
    report.sizes_checked = sum(sizes.values())


def inspect_dataset(
    dataset: str,
    root: str | None,
    categories: list[str] | str | None = None,
    folder: FolderLayout | None = None,
) -> DatasetReport:
    """Per-category counts, mask coverage, image sizes and a list of problems with paths.

    A root that is missing or not the layout raises DataError (there is nothing to report on);
    everything else found wrong is listed in ``problems``.
    """
    scan = scan_layout(dataset, root, folder=folder)
    selected = select_categories(scan, categories)
    remote = storage.is_s3(scan.root)
    problems: list[Problem] = []
    reports: list[CategoryReport] = []
    for category in selected:
        report = CategoryReport(category)
        samples = scan.samples_of(category)
        defects: Counter[str] = Counter()
        for sample in samples:
            if sample.split == "train":
                report.train_good += 1
            elif sample.label == 0:
                report.test_good += 1
            else:
                report.test_defect += 1
                defects[sample.defect] += 1
                if not lacks_mask(sample):
                    report.masks_found += 1
                else:
                    report.masks_missing += 1
                    detail = "defective image without a mask (scored as all-zero)"
                    problems.append(Problem(MISSING_MASK, sample.image, detail))
        report.defect_types = dict(sorted(defects.items()))
        category_path = (
            scan.root
            if dataset in ("folder", "visa") or scan.root is None
            else storage.join(scan.root, category)
        )
        if not samples:
            problems.append(Problem("empty_category", category_path, "no images found"))
        else:
            if report.train_good == 0:
                problems.append(Problem("empty_split", category_path, "no normal training images"))
            if report.test_good + report.test_defect == 0:
                problems.append(Problem("empty_split", category_path, "no test images"))
            _check_files(samples, report, problems, remote)
        reports.append(report)

    wanted = set(selected)
    for path in scan.orphan_masks:
        if _category_of(scan, path) in wanted:
            problems.append(Problem("orphan_mask", path, "mask matches no image"))
    for path in scan.missing_files:
        if _category_of(scan, path) in wanted:
            problems.append(
                Problem("missing_file", path, f"listed in {scan.root}/split_csv/1cls.csv but absent")
            )
    return DatasetReport(dataset, scan.root, reports, problems)
