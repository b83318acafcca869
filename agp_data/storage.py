"""One small interface over local paths and ``s3://bucket/key`` URIs.

Every function takes either a local path or an S3 URI. S3 access goes through boto3's standard
credential chain (environment, shared profile, instance role); the endpoint is the one given to
:func:`configure_s3` (``--s3-endpoint``) or else ``AWS_ENDPOINT_URL``, which boto3 honours
natively. Credentials never pass through this module's messages.

Storage failures a user can fix (no credentials, unreachable endpoint, missing bucket or key,
malformed URI, a local write refused by the operating system) become
:class:`~agp_data.errors.DataError` with one line naming the URI and the fix.
:func:`check_writable_dir` and :func:`check_writable_file` find the local ones before long work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import urlparse

from agp_data.errors import DataError, WriteDataError

S3_SCHEME = "s3://"
DEFAULT_CACHE_MAX_GB = 20.0
_CHUNK = 1 << 20
# Single PUT requests are limited to 5 GB; bigger files go through boto3's multipart transfer.
_SINGLE_PUT_LIMIT = 4 * 1024**3
# After this many fetches into the local cache, re-measure it even if the running estimate is low
# (other processes share the cache and add files we do not count).
_CACHE_RESCAN_EVERY = 256

_endpoint_override: str | None = None
_client_lock = threading.Lock()
_clients: dict[tuple, object] = {}
_cache_lock = threading.Lock()
_local_copy_memo: dict[tuple[str, str], str] = {}
_cache_bytes_estimate: dict[str, int] = {}
_fetches_since_scan: dict[str, int] = {}


def _current_umask() -> int:
    # Reading the umask requires setting it; done once at import, before any threads write files.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK  # what os.makedirs would give; for directories made by mkdtemp (0700)


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------
def is_s3(uri: str | os.PathLike) -> bool:
    """True for anything in the ``s3:`` scheme (malformed ones are rejected when used)."""
    return str(uri).lower().startswith("s3:")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``; malformed URIs raise DataError."""
    text = str(uri)
    if not text.startswith(S3_SCHEME):
        raise DataError(f"malformed S3 URI '{text}': write it as s3://bucket/path")
    bucket, _, key = text[len(S3_SCHEME) :].partition("/")
    if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket):
        raise DataError(f"malformed S3 URI '{text}': '{bucket}' is not a bucket name (s3://bucket/path)")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path components below ``base``; works for local paths and S3 URIs."""
    base = str(base)
    if is_s3(base):
        pieces = [base.rstrip("/")] + [str(p).strip("/") for p in parts if str(p).strip("/")]
        return "/".join(pieces)
    return os.path.join(base, *[str(p) for p in parts])


def _s3_uri(bucket: str, key: str) -> str:
    return f"{S3_SCHEME}{bucket}/{key}"


# --------------------------------------------------------------------------------------------
# S3 client and error translation
# --------------------------------------------------------------------------------------------
def configure_s3(endpoint: str | None) -> None:
    """Use ``endpoint`` (e.g. ``http://127.0.0.1:9000`` for MinIO) for every S3 call; None resets."""
    global _endpoint_override
    if endpoint is not None:
        endpoint = endpoint.strip()
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DataError(f"invalid S3 endpoint '{endpoint}': give a URL such as http://127.0.0.1:9000")
    _endpoint_override = endpoint or None


def s3_endpoint() -> str | None:
    """The S3 endpoint in use: the configured override, else the environment, else AWS."""
    return (
        _endpoint_override
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _client():
    """A boto3 S3 client for the current endpoint/environment (one per process and setting)."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
    # Keyed by pid: clients hold connection pools that must not cross a fork (DataLoader workers).
    # The environment parts of the key make a test that changes AWS_* see a fresh client.
    key = (
        os.getpid(),
        endpoint,
        _region(),
        os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
    )
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                connect_timeout=10,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
                # MinIO and other self-hosted endpoints usually need path-style addressing.
                s3={"addressing_style": "path"} if endpoint else None,
            )
            session = boto3.session.Session()
            kwargs = {"config": config}
            if _endpoint_override:
                kwargs["endpoint_url"] = _endpoint_override
            if not session.region_name:
                kwargs["region_name"] = _region()
            client = session.client("s3", **kwargs)
            _clients[key] = client
    return client


_CREDENTIALS_FIX = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile (AWS_PROFILE)"


@contextlib.contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn botocore failures into one-line DataErrors naming ``uri`` and the fix."""
    import boto3.exceptions
    import botocore.exceptions as bce

    try:
        yield
    except (bce.NoCredentialsError, bce.PartialCredentialsError) as exc:
        raise DataError(f"no usable AWS credentials to {action} {uri}: {_CREDENTIALS_FIX}") from exc
    except bce.ProfileNotFound as exc:
        raise DataError(
            f"AWS profile '{os.environ.get('AWS_PROFILE', '')}' not found while trying to "
            f"{action} {uri}: fix AWS_PROFILE or ~/.aws/config"
        ) from exc
    except (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ConnectionClosedError) as exc:
        where = s3_endpoint() or "AWS S3"
        raise DataError(
            f"cannot reach S3 endpoint {where} to {action} {uri}: check --s3-endpoint / "
            "AWS_ENDPOINT_URL and that the server is running"
        ) from exc
    except bce.ReadTimeoutError as exc:
        raise DataError(f"S3 endpoint timed out trying to {action} {uri}: retry later") from exc
    except bce.ClientError as exc:
        raise _client_error(exc, uri, action) from exc
    except boto3.exceptions.S3UploadFailedError as exc:
        cause = exc.__context__
        if isinstance(cause, bce.ClientError):
            raise _client_error(cause, uri, action) from exc
        raise DataError(f"cannot {action} {uri}: upload failed; retry") from exc
    except bce.BotoCoreError as exc:
        raise DataError(f"cannot {action} {uri}: {type(exc).__name__}; check the S3 settings") from exc


def _client_error(exc, uri: str, action: str) -> DataError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    bucket = split_s3(uri)[0] if uri.startswith(S3_SCHEME) else uri
    if code == "NoSuchBucket":
        return DataError(f"S3 bucket '{bucket}' does not exist ({uri}): create it or fix the URI")
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return DataError(f"no such S3 object {uri}: check the path")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return DataError(f"S3 rejected the credentials for {uri} ({code}): {_CREDENTIALS_FIX}")
    if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
        return DataError(
            f"access denied to {uri}: check the credentials and the bucket policy ({_CREDENTIALS_FIX})"
        )
    return DataError(f"cannot {action} {uri}: S3 error {code or status}")


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------
def list_files(
    uri: str | os.PathLike,
    recursive: bool = True,
    skipped: list[tuple[str, str]] | None = None,
) -> list[str]:
    """Sorted full paths/URIs of the files under ``uri`` (files only; [] when nothing is there).

    A local file or S3 object given directly lists as itself. A missing S3 bucket raises DataError.
    Local entries that cannot be read (symbolic-link loops, broken links, folders without
    permission) are left out, never fatal; pass a list as ``skipped`` to get ``(path, reason)``
    appended for each. Symbolic links to folders are not followed (they are reported there too).
    """
    uri = str(uri)
    if not is_s3(uri):
        if os.path.isfile(uri):
            return [uri]
        if not os.path.isdir(uri):
            return []
        return sorted(_local_files(uri, recursive, skipped if skipped is not None else []))

    bucket, key = split_s3(uri)
    client = _client()
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    found = []
    with _s3_errors(uri, "list"):
        paginator = client.get_paginator("list_objects_v2")
        params = {"Bucket": bucket, "Prefix": prefix}
        if not recursive:
            params["Delimiter"] = "/"
        for page in paginator.paginate(**params):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # skip "directory" marker objects
                    found.append(_s3_uri(bucket, obj["Key"]))
        if not found and key and not key.endswith("/"):
            # The URI may name a single object rather than a prefix.
            if _head(client, bucket, key) is not None:
                found.append(_s3_uri(bucket, key))
    return sorted(found)


def _local_files(root: str, recursive: bool, skipped: list[tuple[str, str]]) -> list[str]:
    # scandir instead of os.walk: os.walk files a symlink loop or a broken link under "files"
    # (its is_dir() swallows the error), and silently drops folders it cannot open.
    found: list[str] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError as exc:
            skipped.append((directory, _reason(exc)))
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append(entry.path)
                elif entry.is_file():
                    found.append(entry.path)
                elif entry.is_symlink():
                    if entry.is_dir():
                        if recursive:
                            skipped.append((entry.path, "symbolic link to a folder, not followed"))
                    else:
                        skipped.append((entry.path, "broken symbolic link (its target does not exist)"))
                else:
                    skipped.append((entry.path, "not a regular file"))
            except OSError as exc:  # e.g. ELOOP from a link that points at itself
                skipped.append((entry.path, _reason(exc)))
    return found


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")


def _head(client, bucket: str, key: str) -> dict | None:
    """head_object, or None when the object does not exist (other errors propagate)."""
    import botocore.exceptions as bce

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except bce.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _bucket_exists(client, bucket: str) -> bool:
    import botocore.exceptions as bce

    try:
        client.head_bucket(Bucket=bucket)
        return True
    except bce.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise


def _prefix_has_objects(client, bucket: str, key: str) -> bool:
    import botocore.exceptions as bce

    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    try:
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except bce.ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) == "NoSuchBucket":
            return False
        raise
    return page.get("KeyCount", 0) > 0


def exists(uri: str | os.PathLike) -> bool:
    """True if ``uri`` is an existing file or directory (S3: an object or a non-empty prefix)."""
    uri = str(uri)
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    client = _client()
    with _s3_errors(uri, "check"):
        if not key.strip("/"):
            return _bucket_exists(client, bucket)
        if not key.endswith("/") and _head(client, bucket, key) is not None:
            return True
        return _prefix_has_objects(client, bucket, key)


def is_dir(uri: str | os.PathLike) -> bool:
    """True for a local directory, an existing bucket, or an S3 prefix with objects below it."""
    uri = str(uri)
    if not is_s3(uri):
        return os.path.isdir(uri)
    bucket, key = split_s3(uri)
    client = _client()
    with _s3_errors(uri, "check"):
        if not key.strip("/"):
            return _bucket_exists(client, bucket)
        return _prefix_has_objects(client, bucket, key)


def size(uri: str | os.PathLike) -> int:
    """Size of one file in bytes."""
    uri = str(uri)
    if not is_s3(uri):
        try:
            return os.path.getsize(uri)
        except FileNotFoundError as exc:
            raise DataError(f"no such file {uri}: check the path") from exc
    bucket, key = split_s3(uri)
    with _s3_errors(uri, "read"):
        return int(_client().head_object(Bucket=bucket, Key=key)["ContentLength"])


def _etag_signature(etag, length) -> str:
    return str(etag or "").strip('"') + f":{length}"


# A folder with at most this many wanted objects gets one HEAD each; more get one listing.
_HEADS_PER_FOLDER = 8


def file_signatures(uris: Iterable[str | os.PathLike]) -> dict[str, str | None]:
    """A cheap version stamp per file, to tell whether it changed since it was last seen.

    Local: size and modification time (ns), one ``stat`` each. S3: ETag and size, from one
    listing per folder (or a HEAD per object where a folder holds only a few of them). ``None``
    for a file that does not exist or cannot be looked at.
    """
    signatures: dict[str, str | None] = {}
    remote: dict[tuple[str, str], list[str]] = {}
    for item in uris:
        uri = str(item)
        if is_s3(uri):
            bucket, key = split_s3(uri)
            remote.setdefault((bucket, key.rpartition("/")[0]), []).append(uri)
            continue
        try:
            st = os.stat(uri)
        except (OSError, ValueError):
            signatures[uri] = None
            continue
        signatures[uri] = f"{st.st_size}:{st.st_mtime_ns}"
    for (bucket, folder), wanted in remote.items():
        signatures.update(_s3_signatures(bucket, folder, wanted))
    return signatures


def _s3_signatures(bucket: str, folder: str, wanted: list[str]) -> dict[str, str | None]:
    client = _client()
    found: dict[str, str | None] = dict.fromkeys(wanted)
    where = _s3_uri(bucket, folder)
    with _s3_errors(where, "list"):
        if len(wanted) <= _HEADS_PER_FOLDER:
            for uri in wanted:
                head = _head(client, bucket, split_s3(uri)[1])
                if head is not None:
                    found[uri] = _etag_signature(head.get("ETag"), head.get("ContentLength"))
            return found
        paginator = client.get_paginator("list_objects_v2")
        prefix = f"{folder}/" if folder else ""
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for obj in page.get("Contents", []):
                uri = _s3_uri(bucket, obj["Key"])
                if uri in found:
                    found[uri] = _etag_signature(obj.get("ETag"), obj.get("Size"))
    return found


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------
def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = str(uri)
    if not is_s3(uri):
        try:
            with open(uri, "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise DataError(f"no such file {uri}: check the path") from exc
        except IsADirectoryError as exc:
            raise DataError(f"{uri} is a directory, expected a file") from exc
        except PermissionError as exc:
            raise DataError(f"permission denied reading {uri}: fix the file permissions") from exc
    bucket, key = split_s3(uri)
    with _s3_errors(uri, "read"):
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()


def read_head(uri: str | os.PathLike, num_bytes: int) -> bytes:
    """The first ``num_bytes`` of a file (S3: one ranged GET), e.g. to parse an image header."""
    uri = str(uri)
    if not is_s3(uri):
        try:
            with open(uri, "rb") as f:
                return f.read(num_bytes)
        except FileNotFoundError as exc:
            raise DataError(f"no such file {uri}: check the path") from exc
    bucket, key = split_s3(uri)
    with _s3_errors(uri, "read"):
        response = _client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{num_bytes - 1}")
        return response["Body"].read()


def read_text(uri: str | os.PathLike, encoding: str = "utf-8") -> str:
    data = read_bytes(uri)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri} is not {encoding} text: {exc.reason} at byte {exc.start}") from exc


def _atomic_local_write(path: str, write: Callable[[object], object]) -> None:
    """Write via a temp file in the target directory + os.replace: readers never see half a file.

    Any OSError (read-only file system, disk full, a file where a folder should be ...) becomes
    a :class:`WriteDataError` naming ``path``; the target keeps its old content and no temp file
    is left.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path):  # known now: don't write all the bytes first and fail at the rename
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        os.makedirs(directory, exist_ok=True)
        # The name is cut: mkstemp adds characters, and a name near the length limit must still work.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)[:96]}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc, folder=directory) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, DataError):
            raise _write_error(path, exc, folder=directory) from exc
        raise


def _file_in_the_way(folder: str) -> str | None:
    """The first existing ancestor of ``folder`` (itself included) that is not a folder."""
    chain = []
    current = os.path.abspath(folder)
    while True:
        chain.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for candidate in reversed(chain):
        if not os.path.lexists(candidate):
            return None
        if not os.path.isdir(candidate):
            return candidate
    return None


def local_write_error(
    uri: str, exc: OSError, folder: str | None = None, action: str = "write"
) -> WriteDataError:
    """One line for a failed local write of ``uri`` (into ``folder``, by default its parent):
    what is wrong and the fix. For code that writes local files itself, e.g. with PIL."""
    if isinstance(exc, WriteDataError):
        return exc
    return _write_error(uri, exc, folder or os.path.dirname(os.path.abspath(uri)), action)


def _write_error(uri: str, exc: OSError, folder: str, action: str = "write") -> WriteDataError:
    """One line for a failed local write of ``uri`` into ``folder``: what is wrong and the fix."""
    code = exc.errno
    where = f"cannot {action} {uri}"
    fix = "choose another location"
    blocker = _file_in_the_way(folder) if code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT) else None
    if code in (errno.EACCES, errno.EPERM):
        message = f"permission denied writing {uri}: choose a writable location"
    elif code == errno.EROFS:
        message = f"{where}: the file system is read-only; {fix}"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        message = f"{where}: {exc.strerror or 'No space left on device'}; free some space or {fix}"
    elif blocker is not None:
        message = f"{where}: {blocker} is a file, not a folder; {fix}"
    elif code == errno.EISDIR:
        message = f"{where}: it is a folder, not a file; name a file there or {fix}"
    elif code == errno.ENAMETOOLONG:
        message = f"{where}: the name is too long; choose a shorter path"
    else:
        message = f"{where}: {_reason(exc)}; {fix}"
    return WriteDataError(message, code)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically: local temp file + rename, or a single S3 PUT.

    Local write failures raise :class:`WriteDataError` (a DataError) naming ``uri`` and the fix.
    """
    uri = str(uri)
    if not is_s3(uri):
        _atomic_local_write(uri, lambda f: f.write(data))
        return
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise DataError(f"cannot write to {uri}: it names a bucket or folder, not an object")
    with _s3_errors(uri, "write"):
        _client().put_object(Bucket=bucket, Key=key, Body=bytes(data))


def write_text(uri: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def make_dirs(uri: str | os.PathLike) -> None:
    """Create a local folder and its parents (nothing to do on S3, which has no folders).

    Failures raise :class:`WriteDataError` naming ``uri`` and the fix.
    """
    uri = str(uri)
    if is_s3(uri):
        split_s3(uri)
        return
    try:
        os.makedirs(uri, exist_ok=True)
    except OSError as exc:
        raise _write_error(uri, exc, folder=uri, action="create") from exc


def check_writable_dir(uri: str | os.PathLike) -> None:
    """Raise DataError unless ``uri`` is a folder that can be written into, or can be created.

    For callers to run before long work starts, so that a bad ``--out`` fails in a second, not
    at the end. Nothing is created: an existing folder gets a probe file made and removed at
    once (permission bits do not tell, e.g. as root or on a read-only mount); a missing one is
    probed at its nearest existing ancestor. ``s3://`` URIs are only parsed (no network call):
    whether a bucket takes writes shows at the first write.
    """
    uri = str(uri)
    if is_s3(uri):
        split_s3(uri)
        return
    _check_local_target(uri, os.path.abspath(uri), action="write into")


def check_writable_file(uri: str | os.PathLike) -> None:
    """Raise DataError unless a file can be written at ``uri``: not an existing folder, and its
    parent folder writable or creatable (see :func:`check_writable_dir`). ``s3://``: parsed only."""
    uri = str(uri)
    if is_s3(uri):
        _, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise DataError(f"cannot write to {uri}: it names a bucket or folder, not an object")
        return
    path = os.path.abspath(uri)
    if os.path.isdir(path):
        raise WriteDataError(
            f"cannot write {uri}: it is a folder, not a file; name a file there or choose another location",
            errno.EISDIR,
        )
    _check_local_target(uri, os.path.dirname(path), action="write", new_name=os.path.basename(path))


def _check_local_target(uri: str, folder: str, action: str, new_name: str | None = None) -> None:
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        raise WriteDataError(
            f"cannot {action} {uri}: {blocker} is a file, not a folder; choose another location",
            errno.ENOTDIR,
        )
    existing, missing = folder, [new_name] if new_name else []
    while not os.path.isdir(existing):
        missing.append(os.path.basename(existing))
        existing = os.path.dirname(existing)
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for name in missing:
        if len(os.fsencode(name)) > name_max:
            raise WriteDataError(
                f"cannot {action} {uri}: the name {name[:24]}… is longer than {name_max} bytes; "
                "choose a shorter path",
                errno.ENAMETOOLONG,
            )
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".agp-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _write_error(uri, exc, folder=folder, action=action) from exc


def delete(uri: str | os.PathLike) -> None:
    """Delete a file or a whole directory/prefix; a missing path is not an error."""
    uri = str(uri)
    if not is_s3(uri):
        try:
            if os.path.isdir(uri) and not os.path.islink(uri):
                shutil.rmtree(uri)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(uri)
        except OSError as exc:
            raise WriteDataError(
                f"cannot delete {uri}: {_reason(exc)}; remove it by hand or check the file system",
                exc.errno,
            ) from exc
        return
    bucket, key = split_s3(uri)
    if not key.strip("/"):
        raise DataError(f"refusing to delete the whole bucket {uri}: name a path inside it")
    client = _client()
    with _s3_errors(uri, "delete"):
        keys = [split_s3(u)[1] for u in list_files(uri)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


# --------------------------------------------------------------------------------------------
# Local cache of S3 objects
# --------------------------------------------------------------------------------------------
def cache_root() -> str:
    """agp's cache directory: ``$AGP_CACHE_DIR`` or ``~/.cache/agp``."""
    return os.environ.get("AGP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "agp")


def _cache_limit_bytes() -> int:
    raw = os.environ.get("AGP_CACHE_MAX_GB")
    if raw is None or raw.strip() == "":
        return int(DEFAULT_CACHE_MAX_GB * 1024**3)
    try:
        value = float(raw)
    except ValueError as exc:
        raise DataError(f"AGP_CACHE_MAX_GB='{raw}' is not a number: set it to e.g. 20") from exc
    if value <= 0:
        raise DataError(f"AGP_CACHE_MAX_GB='{raw}' must be positive")
    return int(value * 1024**3)


def local_copy(uri: str | os.PathLike, cache_dir: str | None = None) -> str:
    """A local path holding the content of ``uri``.

    Local paths are returned unchanged. S3 objects are fetched once into the cache
    (``cache_dir`` or ``$AGP_CACHE_DIR/s3``), named by bucket/key and the object's ETag (so a
    changed object is fetched again), written to a temp name and renamed (safe with several
    processes), and the cache is kept under ``AGP_CACHE_MAX_GB`` (default 20) by evicting the
    least recently used files. Within one process a fetched object is not checked again.
    """
    uri = str(uri)
    if not is_s3(uri):
        return uri
    bucket, key = split_s3(uri)
    directory = os.path.abspath(cache_dir or os.path.join(cache_root(), "s3"))
    memo_key = (directory, uri)
    cached = _local_copy_memo.get(memo_key)
    if cached is not None and os.path.exists(cached):
        _touch(cached)
        return cached

    client = _client()
    with _s3_errors(uri, "read"):
        head = client.head_object(Bucket=bucket, Key=key)
    version = str(head.get("ETag", "")).strip('"') or str(head.get("ContentLength", ""))
    name_hash = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
    version_hash = hashlib.sha256(version.encode()).hexdigest()[:16]
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(key))[-80:] or "object"
    path = os.path.join(directory, name_hash[:2], f"{name_hash[2:26]}-{version_hash}-{basename}")
    if os.path.exists(path):
        _touch(path)
    else:
        with _s3_errors(uri, "read"):
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            _atomic_local_write(path, lambda f: _copy_stream(body, f))
        _account_fetch(directory, os.path.getsize(path), keep=path)
    _local_copy_memo[memo_key] = path
    return path


def forget_local_copies(uris: Iterable[str] | None = None) -> None:
    """Forget which S3 objects (all, or those of ``uris``) this process already fetched, so the
    next :func:`local_copy` checks their ETag again (the cached files themselves stay)."""
    with _cache_lock:
        if uris is None:
            _local_copy_memo.clear()
            return
        wanted = {str(u) for u in uris}
        for key in [k for k in _local_copy_memo if k[1] in wanted]:
            del _local_copy_memo[key]


def _copy_stream(body, f) -> None:
    for chunk in iter(lambda: body.read(_CHUNK), b""):
        f.write(chunk)


def _touch(path: str) -> None:
    # The modification time doubles as "last used" for LRU eviction.
    with contextlib.suppress(OSError):
        os.utime(path)


def _cache_files(directory: str) -> list[tuple[float, int, str]]:
    entries = []
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            if name.endswith(".tmp"):
                continue  # another process is still writing it
            full = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.stat(full)
                entries.append((st.st_mtime, st.st_size, full))
    return entries


def _account_fetch(directory: str, nbytes: int, keep: str) -> None:
    limit = _cache_limit_bytes()
    with _cache_lock:
        if directory not in _cache_bytes_estimate:
            _cache_bytes_estimate[directory] = sum(s for _, s, _ in _cache_files(directory))
        else:
            _cache_bytes_estimate[directory] += nbytes
        _fetches_since_scan[directory] = _fetches_since_scan.get(directory, 0) + 1
        if _cache_bytes_estimate[directory] <= limit and _fetches_since_scan[directory] < _CACHE_RESCAN_EVERY:
            return
        _fetches_since_scan[directory] = 0
        entries = sorted(_cache_files(directory))
        total = sum(s for _, s, _ in entries)
        for _, file_size, full in entries:  # oldest use first
            if total <= limit:
                break
            if full == keep:
                continue
            with contextlib.suppress(OSError):
                os.remove(full)
                total -= file_size
        _cache_bytes_estimate[directory] = total


# --------------------------------------------------------------------------------------------
# Directory copies
# --------------------------------------------------------------------------------------------
def _relative(base: str, full: str) -> str:
    if is_s3(base):
        prefix = base.rstrip("/") + "/"
        return full[len(prefix) :] if full.startswith(prefix) else os.path.basename(full)
    return os.path.relpath(full, base).replace(os.sep, "/")


def _copy_file(src: str, dst: str) -> None:
    if not is_s3(src) and not is_s3(dst):
        with open(src, "rb") as fin:
            _atomic_local_write(dst, lambda f: shutil.copyfileobj(fin, f, _CHUNK))
        return
    if not is_s3(src):  # local → S3
        bucket, key = split_s3(dst)
        client = _client()
        with _s3_errors(dst, "upload to"):
            if os.path.getsize(src) > _SINGLE_PUT_LIMIT:
                client.upload_file(src, bucket, key)
            else:
                with open(src, "rb") as fin:
                    client.put_object(Bucket=bucket, Key=key, Body=fin)
        return
    bucket, key = split_s3(src)
    if is_s3(dst):  # S3 → S3: server-side copy
        dst_bucket, dst_key = split_s3(dst)
        with _s3_errors(dst, "copy to"):
            _client().copy({"Bucket": bucket, "Key": key}, dst_bucket, dst_key)
        return
    with _s3_errors(src, "download"):  # S3 → local
        body = _client().get_object(Bucket=bucket, Key=key)["Body"]
        _atomic_local_write(dst, lambda f: _copy_stream(body, f))


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy every file below ``src`` to the same relative place below ``dst``; returns targets.

    Any direction works (local/S3 to local/S3). Each file is written atomically.
    """
    src, dst = str(src), str(dst)
    if not is_s3(src) and not os.path.isdir(src):
        raise DataError(f"no such directory {src}: nothing to copy")
    files = list_files(src)
    if is_s3(src) and not files:
        raise DataError(f"nothing under {src}: check the URI")
    targets = []
    for full in files:
        target = join(dst, _relative(src, full))
        _copy_file(full, target)
        targets.append(target)
    return targets


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> list[str]:
    """Copy a directory tree to ``uri`` (S3 or local)."""
    return copy_tree(local_dir, uri)


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> list[str]:
    """Copy everything below ``uri`` (S3 or local) into ``local_dir``."""
    return copy_tree(uri, local_dir)


# --------------------------------------------------------------------------------------------
# pyarrow
# --------------------------------------------------------------------------------------------
def pyarrow_filesystem(uri: str | os.PathLike):
    """``(pyarrow.fs.FileSystem, path)`` for ``uri`` (Ray Train's ``storage_filesystem``).

    S3: an ``S3FileSystem`` on the configured endpoint (credentials from the AWS default chain)
    and the path ``bucket/key``; local: ``LocalFileSystem`` and the absolute path.
    """
    import pyarrow.fs as pafs

    uri = str(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    bucket, key = split_s3(uri)
    kwargs = {"region": _region(), "allow_bucket_creation": True}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    try:
        filesystem = pafs.S3FileSystem(**kwargs)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for bad settings
        raise DataError(f"cannot set up pyarrow S3 access for {uri}: {exc}") from exc
    return filesystem, f"{bucket}/{key.strip('/')}".rstrip("/")
