"""Official dataset downloads: resumable fetch, checksum check, safe extraction.

``download(name, root)`` fetches the official archive of ``mvtec``, ``visa`` or ``btad`` into
``root`` (HTTP Range requests continue a ``<file>.part`` left by an interrupted run), checks its
SHA-256, extracts it into ``root`` and returns the directory to use as the dataset root. An
archive already placed at ``<root>/<file>`` is extracted without any network access.

Hosts change over time (MVTec in particular moves its share links); when a download fails the
error names the URL so the file can be fetched by hand and placed at ``<root>/<file>``.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass

from agp_data import storage
from agp_data.errors import DataError

CONNECT_TIMEOUT_S = 10.0
MAX_STALLED_ATTEMPTS = 5
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetSource:
    """Where an archive comes from and how to recognise its content once extracted."""

    name: str  # dataset name in agp_data.layouts.DATASETS
    file: str  # archive file name
    urls: tuple[str, ...]  # tried in order
    sha256: str | None  # None: unknown; the computed one is recorded next to the archive
    size: int | None = None  # bytes, when known


# Checksums and sizes: the values published with the widely used copies of these archives (e.g.
# by anomalib) and reported identically by independent downloads; mismatches are refused.
SOURCES: dict[str, DatasetSource] = {
    "mvtec": DatasetSource(
        name="mvtec",
        file="mvtec_anomaly_detection.tar.xz",
        urls=(
            # MVTec's own share links (mydrive.ch); the first is the current one, the second the
            # long-standing older link. MVTec may move them again: see mvtec.com/company/research/datasets.
            "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
            "420938113-1629960298/mvtec_anomaly_detection.tar.xz",
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
            "420938113-1629952094/mvtec_anomaly_detection.tar.xz",
        ),
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        size=5_264_982_680,
    ),
    "visa": DatasetSource(
        name="visa",
        file="VisA_20220922.tar",
        urls=("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",),
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        size=1_929_840_640,
    ),
    "btad": DatasetSource(
        name="btad",
        file="btad.zip",
        urls=("https://avires.dimi.uniud.it/papers/btad/btad.zip",),
        sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        size=1_229_193_337,
    ),
}


# --------------------------------------------------------------------------------------------
# Progress (rich, on stderr so --json output stays clean)
# --------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str, total: int | None, completed: int = 0):
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, completed=completed)

    def update(self, task, completed: int, total: int | None = None) -> None:
        if self._progress is not None and task is not None:
            self._progress.update(task, completed=completed, total=total)


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------
def _host(url: str) -> str:
    return urllib.parse.urlparse(url).netloc or url


def _manual_hint(source: DatasetSource, root: str) -> str:
    return (
        f"download {source.file} manually from {source.urls[0]} and place it at "
        f"{os.path.join(root, source.file)} (then rerun to extract)"
    )


def _open(url: str, offset: int):
    headers = {"User-Agent": "agp-data/1 (+python urllib)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=CONNECT_TIMEOUT_S)


def _fetch(source: DatasetSource, url: str, part: str, progress: _Progress) -> None:
    """Download ``url`` into ``part``, continuing what is there; raises DataError on failure."""
    stalled = 0
    reached = False
    task = None
    while True:
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        if source.size is not None and offset >= source.size:
            return
        try:
            response = _open(url, offset)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left after offset: the file is complete
                return
            raise _FetchFailed(url, f"HTTP {exc.code} {exc.reason}", reachable=True) from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            if not reached:
                raise _FetchFailed(url, str(getattr(exc, "reason", exc)), reachable=False) from exc
            stalled += 1
            if stalled >= MAX_STALLED_ATTEMPTS:
                raise DataError(
                    f"download of {source.file} keeps failing at {offset} bytes ({exc}): rerun later "
                    f"to resume, or {_manual_hint(source, os.path.dirname(part))}"
                ) from exc
            time.sleep(min(2**stalled, 30))
            continue
        reached = True
        with response:
            status = getattr(response, "status", 200)
            if offset and status != 206:
                offset = 0  # the server ignored the Range header: start over
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else source.size
            if task is None:
                task = progress.task(f"download {source.file}", total, offset)
            written = offset
            try:
                with open(part, "ab" if offset else "wb") as f:
                    while chunk := response.read(_CHUNK):
                        f.write(chunk)
                        written += len(chunk)
                        progress.update(task, written, total)
            except (TimeoutError, ConnectionError, OSError, urllib.error.URLError) as exc:
                stalled = 0 if written > offset else stalled + 1
                if stalled >= MAX_STALLED_ATTEMPTS:
                    raise DataError(
                        f"download of {source.file} keeps failing at {written} bytes ({exc}): "
                        "rerun later to resume"
                    ) from exc
                continue
            if total is None or written >= total:
                return
            # The connection closed early: resume from where it stopped, unless nothing arrives.
            stalled = 0 if written > offset else stalled + 1
            if stalled >= MAX_STALLED_ATTEMPTS:
                raise DataError(f"download of {source.file} stops at {written} bytes: rerun later to resume")


class _FetchFailed(Exception):
    def __init__(self, url: str, reason: str, reachable: bool) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason, self.reachable = url, reason, reachable


def sha256_of(path: str, progress: _Progress | None = None) -> str:
    digest = hashlib.sha256()
    total = os.path.getsize(path)
    task = progress.task(f"verify {os.path.basename(path)}", total) if progress else None
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK * 8), b""):
            digest.update(block)
            done += len(block)
            if progress:
                progress.update(task, done, total)
    return digest.hexdigest()


def _verify(source: DatasetSource, archive: str, progress: _Progress, record_dir: str) -> str:
    """Check (or, if unknown, record in ``<record_dir>/<file>.sha256``) the archive's SHA-256."""
    actual = sha256_of(archive, progress)
    if source.sha256 is None:
        storage.write_text(os.path.join(record_dir, source.file + ".sha256"), f"{actual}  {source.file}\n")
        return actual
    if actual != source.sha256:
        raise DataError(
            f"checksum mismatch for {archive}: expected sha256 {source.sha256}, got {actual}; "
            "delete the file and rerun (or place a correct copy there)"
        )
    return actual


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------
def _safe_member_path(root: str, name: str) -> str:
    target = os.path.realpath(os.path.join(root, name))
    if not (target == os.path.realpath(root) or target.startswith(os.path.realpath(root) + os.sep)):
        raise DataError(f"archive member '{name}' would be written outside {root}: refusing to extract")
    return target


class _CountingReader:
    """A file wrapper that remembers how far the decompressor has read (for progress)."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.position += len(data)
        return data


def _extract(archive: str, root: str, progress: _Progress) -> None:
    total = os.path.getsize(archive)
    task = progress.task(f"extract {os.path.basename(archive)}", total)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            done = 0
            for info in zf.infolist():
                _safe_member_path(root, info.filename)
                zf.extract(info, root)
                done += info.compress_size
                progress.update(task, done, total)
        progress.update(task, total, total)
        return
    try:
        with open(archive, "rb") as raw:
            reader = _CountingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|*") as tar:  # streaming: one pass over .xz
                for member in tar:
                    _safe_member_path(root, member.name)
                    if hasattr(tarfile, "data_filter"):
                        tar.extract(member, root, filter="data")
                    elif member.isfile() or member.isdir():
                        tar.extract(member, root)
                    progress.update(task, reader.position, total)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, tarfile.FilterError):
            raise DataError(f"unsafe member in {archive} ({exc}): refusing to extract") from exc
        raise DataError(
            f"cannot extract {archive}: {exc}; the archive is incomplete or damaged, delete it and rerun"
        ) from exc
    progress.update(task, total, total)


def _marker_ok(root: str, name: str) -> bool:
    """Recognise an extracted dataset directly at ``root``."""
    if name == "visa":
        return os.path.isfile(os.path.join(root, "split_csv", "1cls.csv"))
    if name == "btad":
        return os.path.isdir(os.path.join(root, "01", "train", "ok"))
    if name == "mvtec":
        try:
            children = os.listdir(root)
        except OSError:
            return False
        return any(os.path.isdir(os.path.join(root, c, "train", "good")) for c in children)
    return False


def find_dataset_root(root: str, name: str) -> str | None:
    """``root`` or one of its sub-directories that holds the extracted ``name`` dataset."""
    if _marker_ok(root, name):
        return root
    try:
        children = sorted(os.listdir(root))
    except OSError:
        return None
    for child in children:
        candidate = os.path.join(root, child)
        if os.path.isdir(candidate) and _marker_ok(candidate, name):
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def download_source(source: DatasetSource, root: str, *, progress: bool = True) -> str:
    """Fetch (or reuse), verify and extract ``source`` into ``root``; returns the dataset root."""
    if storage.is_s3(root):
        raise DataError(f"download needs a local --root (got {root}): download locally, then copy it to S3")
    root = os.path.abspath(os.path.expanduser(root))
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, source.file)
    marker = os.path.join(root, f".agp-extracted-{source.file}")
    with _Progress(progress) as bars:
        if os.path.exists(marker) and find_dataset_root(root, source.name):
            return find_dataset_root(root, source.name)  # type: ignore[return-value]
        if not os.path.exists(archive):
            part = archive + ".part"
            failures: list[_FetchFailed] = []
            for url in source.urls:  # later URLs are fallbacks for moved or unreachable hosts
                try:
                    _fetch(source, url, part, bars)
                    break
                except _FetchFailed as exc:
                    failures.append(exc)
            else:
                served = [f for f in failures if f.reachable]
                if served:
                    raise DataError(
                        f"download of {source.file} from {served[0].url} failed ({served[0].reason}): "
                        f"{_manual_hint(source, root)}"
                    )
                raise DataError(f"cannot reach {_host(failures[0].url)}: {_manual_hint(source, root)}")
            if source.size is not None and os.path.getsize(part) != source.size:
                raise DataError(
                    f"{part} has {os.path.getsize(part)} bytes, expected {source.size}: rerun to resume, "
                    "or delete it to start over"
                )
            _verify(source, part, bars, root)
            os.replace(part, archive)
        else:
            _verify(source, archive, bars, root)
        _extract(archive, root, bars)
    dataset_root = find_dataset_root(root, source.name)
    if dataset_root is None:
        raise DataError(
            f"extracted {archive} into {root} but found no {source.name} layout there: check the archive"
        )
    storage.write_text(marker, f"{source.sha256 or sha256_of(archive)}\n")
    return dataset_root


def download(name: str, root: str, *, progress: bool = True) -> str:
    """Download and extract ``mvtec`` | ``visa`` | ``btad`` into ``root``; returns the dataset root.

    For VisA the archive's ``split_csv/1cls.csv`` is checked to be present.
    """
    if name not in SOURCES:
        raise DataError(f"no official download for '{name}': choose one of {', '.join(SOURCES)}")
    dataset_root = download_source(SOURCES[name], root, progress=progress)
    if name == "visa" and not os.path.isfile(os.path.join(dataset_root, "split_csv", "1cls.csv")):
        raise DataError(f"{dataset_root} lacks split_csv/1cls.csv: the VisA archive is incomplete")
    return dataset_root
