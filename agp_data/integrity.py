"""Checks of a dataset's files before training or evaluation relies on them.

Two costs, two functions:

- :func:`check_masks` reads image headers only: defect images without a mask (every pixel of
  them would count as normal) and masks of another size than their image (they would be
  resized to fit). Warnings by default, a DataError with ``strict`` (``--strict-data``).
- :func:`verify_images` decodes every pixel of every image and mask, in a thread pool: a
  truncated file has a header that looks fine. Files verified once are remembered (by size and
  modification time, or S3 ETag) so a second run over the same data costs a ``stat`` per file.

``agp_data.inspect`` reports the same problems through :func:`lacks_mask` and
:func:`measure_sample`: one definition of what a mask problem is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from agp_data import storage
from agp_data.errors import DataError
from agp_data.images import decoded_size, image_size
from agp_data.samples import Sample

MISSING_MASK = "missing_mask"
SIZE_MISMATCH = "size_mismatch"
UNREADABLE = "unreadable"

VERIFIED_CACHE = "verified-images.json"
_CACHE_VERSION = 1
# About 100 bytes an entry: the cache stays a few tens of MB however many datasets pass through.
_CACHE_MAX_ENTRIES = 300_000
_LISTED = 3

Size = tuple[int, int]


@dataclass
class Problem:
    # empty_category | empty_split | missing_mask | orphan_mask | missing_file | unreadable | size_mismatch
    kind: str
    path: str
    detail: str


def lacks_mask(sample: Sample) -> bool:
    """A defect image without a mask: every pixel of it would be scored as normal."""
    return sample.label != 0 and sample.mask is None


def measure_sample(
    sample: Sample, size_of: Callable[[str], Size] = image_size
) -> tuple[Size | None, list[Problem]]:
    """The image's (width, height), or None if unreadable, and what is wrong with its files.

    ``size_of`` reads one file's size: :func:`~agp_data.images.image_size` (header only) or a
    full decode. Problems: ``unreadable`` image or mask, ``size_mismatch`` (the mask's path).
    """
    try:
        size = size_of(sample.image)
    except DataError as exc:
        return None, [Problem(UNREADABLE, sample.image, str(exc))]
    if sample.mask is None:
        return size, []
    try:
        mask_size = size_of(sample.mask)
    except DataError as exc:
        return size, [Problem(UNREADABLE, sample.mask, str(exc))]
    if mask_size != size:
        detail = f"mask is {mask_size[0]}x{mask_size[1]}, image {sample.image} is {size[0]}x{size[1]}"
        return size, [Problem(SIZE_MISMATCH, sample.mask, detail)]
    return size, []


def measure_samples(
    samples: list[Sample], size_of: Callable[[str], Size] = image_size, workers: int | None = None
) -> list[tuple[Size | None, list[Problem]]]:
    """:func:`measure_sample` of each sample, in order, read by a thread pool (S3 round trips and
    PIL's decoders both release the GIL)."""
    if len(samples) <= 1:
        return [measure_sample(s, size_of) for s in samples]
    with ThreadPoolExecutor(max_workers=_worker_count(workers, len(samples))) as pool:
        return list(pool.map(lambda s: measure_sample(s, size_of), samples))


def check_masks(samples: list[Sample], *, strict: bool = False) -> list[str]:
    """One warning per kind of mask problem, with the count and the first paths; [] if none.

    Reads only headers (of the images that have a mask, and of their masks). ``strict``: raise
    DataError with the same lines instead of returning them.
    """
    missing = [s.image for s in samples if lacks_mask(s)]
    problems = [p for _, found in measure_samples([s for s in samples if s.mask is not None]) for p in found]
    mismatched = [p for p in problems if p.kind == SIZE_MISMATCH]
    unreadable = [p for p in problems if p.kind == UNREADABLE]

    def fix(normal: str) -> str:
        if strict:
            return f"{normal}, or drop --strict-data to go on with a warning"
        return f"{normal}, or pass --strict-data to stop on this"

    lines = []
    if missing:
        lines.append(
            f"{_count(missing, 'defect image has', 'defect images have')} no mask (all pixels count as "
            f"normal): {_listed(missing)}; {fix('add the masks or remove the images')}"
        )
    if mismatched:
        shown = [f"{p.path} ({p.detail})" for p in mismatched]
        lines.append(
            f"{_count(mismatched, 'mask differs', 'masks differ')} in size from the image (resized to "
            f"fit): {_listed(shown)}; {fix('fix or remove these masks')}"
        )
    if unreadable:
        lines.append(
            f"{_count(unreadable, 'image or mask', 'images or masks')} cannot be read: "
            f"{_listed([p.path for p in unreadable])}; remove or replace them"
        )
    if strict and lines:
        raise DataError(" | ".join(lines))
    return lines


def verify_images(
    samples: list[Sample],
    *,
    on_progress: Callable[[int, int], None] | None = None,
    cache_dir: str | None = None,
    workers: int | None = None,
) -> None:
    """Decode every image and mask of ``samples`` fully; DataError naming the bad files.

    Local paths and ``s3://`` URIs (fetched into ``<cache_dir>/s3``, where training reads them
    next). ``on_progress(done, total)`` counts files, from the calling thread. Files that
    decoded are remembered in ``<cache_dir or storage.cache_root()>/verified-images.json`` under
    their signature (:func:`agp_data.storage.file_signatures`) and are not opened again until
    it changes; an unreadable or corrupt cache file counts as empty.
    """
    kinds: dict[str, str] = {}
    for sample in samples:
        kinds.setdefault(sample.image, "image")
        if sample.mask is not None:
            kinds.setdefault(sample.mask, "mask")
    paths = list(kinds)
    total = len(paths)
    cache_path = os.path.join(cache_dir or storage.cache_root(), VERIFIED_CACHE)
    verified = _read_cache(cache_path)
    signatures = storage.file_signatures(paths)
    todo = [p for p in paths if signatures.get(p) is None or verified.get(_cache_key(p)) != signatures[p]]
    done = total - len(todo)
    if on_progress:
        on_progress(done, total)
    s3_cache = os.path.join(cache_dir, "s3") if cache_dir else None
    # An object that changed since this process fetched it must be fetched again, not reused.
    storage.forget_local_copies([p for p in todo if storage.is_s3(p)])
    failures: dict[str, str] = {}
    decoded: list[str] = []
    if todo:
        with ThreadPoolExecutor(max_workers=_worker_count(workers, len(todo))) as pool:
            futures = {pool.submit(_decode_failure, p, kinds[p], s3_cache): p for p in todo}
            for future in as_completed(futures):
                path = futures[future]
                reason = future.result()
                if reason is None:
                    decoded.append(path)
                else:
                    failures[path] = reason
                done += 1
                if on_progress:
                    on_progress(done, total)
    _remember(cache_path, {_cache_key(p): signatures[p] for p in decoded if signatures.get(p) is not None})
    if failures:
        bad = [p for p in paths if p in failures]  # input order, not completion order
        if len(bad) == 1:
            (path,) = bad
            raise DataError(f"cannot decode {kinds[path]} {path} ({failures[path]}): remove or replace it")
        shown = [f"{p} ({failures[p]})" for p in bad]
        raise DataError(
            f"{len(bad)} images or masks cannot be decoded: {_listed(shown)}; remove or replace them"
        )


def _decode_failure(path: str, what: str, s3_cache: str | None) -> str | None:
    """None if ``path`` decodes, else a short reason."""
    if not storage.is_s3(path) and not os.path.exists(path):
        return "no such file"
    try:
        decoded_size(path, s3_cache, what)
    except DataError as exc:
        cause = exc.__cause__
        if cause is None:
            return str(exc)
        return (str(cause) or type(cause).__name__).splitlines()[0]
    return None


def _worker_count(workers: int | None, jobs: int) -> int:
    default = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's own default
    return max(1, min(jobs, workers if workers is not None else default))


def _count(items: list, one: str, many: str) -> str:
    return f"1 {one}" if len(items) == 1 else f"{len(items)} {many}"


def _listed(items: list[str]) -> str:
    text = ", ".join(items[:_LISTED])
    if len(items) > _LISTED:
        text += f" and {len(items) - _LISTED} more"
    return text


def _cache_key(path: str) -> str:
    return path if storage.is_s3(path) else os.path.abspath(path)


def _read_cache(path: str) -> dict[str, str]:
    # The cache only saves time: whatever is wrong with it means "nothing verified yet".
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("version") != _CACHE_VERSION:
        return {}
    files = content.get("files")
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}


def _remember(path: str, entries: dict[str, str]) -> None:
    if not entries:
        return
    # Re-read just before writing: another process may have verified other files meanwhile.
    files = _read_cache(path)
    for key, signature in entries.items():
        files.pop(key, None)  # re-inserted last: the oldest entries are the ones trimmed
        files[key] = signature
    kept = dict(list(files.items())[-_CACHE_MAX_ENTRIES:])
    try:
        storage.write_text(path, json.dumps({"version": _CACHE_VERSION, "files": kept}))
    except DataError:
        pass  # a cache that cannot be written costs the next run time, never this run's result
