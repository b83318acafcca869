"""agp_data.storage on local paths and on a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import os
import socket

import pytest

from agp_data import storage
from agp_data.errors import DataError


@pytest.fixture
def reset_endpoint():
    yield
    storage.configure_s3(None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------
def test_join_and_is_s3():
    assert storage.join("s3://bucket/a/", "b", "/c.png") == "s3://bucket/a/b/c.png"
    assert storage.join("s3://bucket", "x") == "s3://bucket/x"
    assert storage.join("/tmp/a", "b", "c.png") == os.path.join("/tmp/a", "b", "c.png")
    assert storage.is_s3("s3://bucket/key") and storage.is_s3("S3://bucket")
    assert not storage.is_s3("/data/s3/x") and not storage.is_s3("relative/path")
    assert storage.split_s3("s3://bucket/a/b.png") == ("bucket", "a/b.png")
    assert storage.split_s3("s3://bucket") == ("bucket", "")


@pytest.mark.parametrize("bad", ["s3:/x", "s3:x", "s3://", "s3:///key", "s3://Bad Bucket/k"])
def test_malformed_s3_uris_are_data_errors(bad):
    with pytest.raises(DataError, match="malformed S3 URI"):
        storage.list_files(bad)


def test_configure_s3_rejects_non_urls(reset_endpoint):
    with pytest.raises(DataError, match="invalid S3 endpoint"):
        storage.configure_s3("localhost:9000")
    storage.configure_s3("http://127.0.0.1:9000")
    assert storage.s3_endpoint() == "http://127.0.0.1:9000"
    storage.configure_s3(None)
    assert storage.s3_endpoint() == (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------
def test_local_write_read_list_delete(tmp_path):
    base = str(tmp_path / "root")
    storage.write_bytes(storage.join(base, "b", "2.bin"), b"two")
    storage.write_text(storage.join(base, "a.txt"), "héllo")
    storage.write_bytes(storage.join(base, "b", "c", "3.bin"), b"three")
    assert storage.read_bytes(storage.join(base, "b", "2.bin")) == b"two"
    assert storage.read_text(storage.join(base, "a.txt")) == "héllo"
    expected = [os.path.join(base, p) for p in ("a.txt", "b/2.bin", "b/c/3.bin")]
    assert storage.list_files(base) == expected
    assert storage.list_files(base, recursive=False) == [expected[0]]
    assert storage.list_files(str(tmp_path / "missing")) == []
    assert storage.exists(expected[1]) and storage.is_dir(os.path.join(base, "b"))
    assert not storage.is_dir(expected[1])
    assert storage.size(expected[2]) == 5
    storage.delete(os.path.join(base, "b"))
    assert storage.list_files(base) == [expected[0]]
    storage.delete(os.path.join(base, "nothing-here"))  # missing: no error
    with pytest.raises(DataError, match="no such file"):
        storage.read_bytes(os.path.join(base, "b", "2.bin"))


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    storage.write_bytes(str(target), b"old")
    storage.write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["model.pt"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode

    # A failure while writing (wrong data type) leaves the old file and no temp file.
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["model.pt"]

    # So does a failure at the very end (disk full when syncing).
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        storage.write_bytes(str(target), b"x" * 1000)
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_local_copy_tree_both_ways(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"A")
    (src / "sub" / "b.bin").write_bytes(b"B")
    storage.upload_dir(str(src), str(tmp_path / "dst"))
    storage.download_dir(str(tmp_path / "dst"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "a.bin").read_bytes() == b"A"
    assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == b"B"
    with pytest.raises(DataError, match="no such directory"):
        storage.upload_dir(str(tmp_path / "absent"), str(tmp_path / "x"))


def test_local_copy_and_pyarrow_for_local_paths(tmp_path):
    path = str(tmp_path / "f.bin")
    storage.write_bytes(path, b"1")
    assert storage.local_copy(path) == path
    filesystem, fs_path = storage.pyarrow_filesystem("relative/dir")
    assert type(filesystem).__name__ == "LocalFileSystem"
    assert fs_path == os.path.abspath("relative/dir")


# --------------------------------------------------------------------------------------------
# S3 (moto server)
# --------------------------------------------------------------------------------------------
def test_s3_write_read_list_exists_delete(s3_bucket):
    base = f"s3://{s3_bucket}/data"
    storage.write_bytes(storage.join(base, "x", "1.bin"), b"one")
    storage.write_text(storage.join(base, "top.txt"), "top")
    storage.write_bytes(storage.join(base, "x", "y", "2.bin"), b"two")
    storage.write_bytes(f"s3://{s3_bucket}/data-other/3.bin", b"not under data/")
    assert storage.list_files(base) == [
        f"{base}/top.txt",
        f"{base}/x/1.bin",
        f"{base}/x/y/2.bin",
    ]
    assert storage.list_files(base, recursive=False) == [f"{base}/top.txt"]
    assert storage.list_files(f"{base}/x/1.bin") == [f"{base}/x/1.bin"]
    assert storage.read_bytes(f"{base}/x/y/2.bin") == b"two"
    assert storage.read_text(f"{base}/top.txt") == "top"
    assert storage.read_head(f"{base}/x/y/2.bin", 2) == b"tw"
    assert storage.exists(f"{base}/x/1.bin") and storage.exists(f"{base}/x")
    assert storage.is_dir(base) and not storage.is_dir(f"{base}/x/1.bin")
    assert storage.exists(f"s3://{s3_bucket}") and not storage.exists(f"{base}/nope")
    assert storage.size(f"{base}/x/1.bin") == 3
    storage.delete(f"{base}/x")
    assert storage.list_files(base) == [f"{base}/top.txt"]
    assert storage.read_bytes(f"s3://{s3_bucket}/data-other/3.bin") == b"not under data/"
    with pytest.raises(DataError, match="refusing to delete the whole bucket"):
        storage.delete(f"s3://{s3_bucket}")


def test_s3_missing_bucket_and_key_are_one_line_errors(s3_bucket):
    with pytest.raises(DataError, match="no such S3 object s3://.*/missing.bin") as info:
        storage.read_bytes(f"s3://{s3_bucket}/missing.bin")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="bucket 'agp-no-such-bucket' does not exist"):
        storage.list_files("s3://agp-no-such-bucket/data")
    assert not storage.exists("s3://agp-no-such-bucket/data")


def test_s3_missing_credentials(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookups
    with pytest.raises(DataError, match="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"):
        storage.list_files(f"s3://{s3_bucket}/data")


def test_s3_unreachable_endpoint(s3_bucket, reset_endpoint):
    storage.configure_s3(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(DataError, match=r"cannot reach S3 endpoint http://127\.0\.0\.1:\d+ .*--s3-endpoint"):
        storage.read_bytes(f"s3://{s3_bucket}/a.bin")


def test_s3_explicit_endpoint_override(s3_server, s3_bucket, monkeypatch, reset_endpoint):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.configure_s3(s3_server)
    storage.write_bytes(f"s3://{s3_bucket}/via-override.bin", b"ok")
    assert storage.read_bytes(f"s3://{s3_bucket}/via-override.bin") == b"ok"


def test_s3_tree_round_trip(tmp_path, s3_bucket):
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"A" * 10)
    (src / "deep" / "er" / "b.bin").write_bytes(b"B" * 20)
    uri = f"s3://{s3_bucket}/run"
    storage.upload_dir(str(src), uri)
    assert storage.list_files(uri) == [f"{uri}/a.bin", f"{uri}/deep/er/b.bin"]
    storage.download_dir(uri, str(tmp_path / "back"))
    assert (tmp_path / "back" / "deep" / "er" / "b.bin").read_bytes() == b"B" * 20
    with pytest.raises(DataError, match="nothing under"):
        storage.download_dir(f"s3://{s3_bucket}/absent", str(tmp_path / "x"))


def test_local_copy_fetches_once_and_refetches_changed_objects(tmp_path, s3_bucket):
    uri = f"s3://{s3_bucket}/img/a.png"
    storage.write_bytes(uri, b"version 1")
    cache = str(tmp_path / "cache")
    first = storage.local_copy(uri, cache)
    assert first.startswith(cache) and open(first, "rb").read() == b"version 1"
    assert storage.local_copy(uri, cache) == first
    storage.write_bytes(uri, b"version 2, longer")
    storage.forget_local_copies()  # as a new process would
    second = storage.local_copy(uri, cache)
    assert second != first and open(second, "rb").read() == b"version 2, longer"
    leftovers = [n for _, _, names in os.walk(cache) for n in names if n.endswith(".tmp")]
    assert leftovers == []


def _age(path: str, seconds: float) -> None:
    stamp = os.stat(path).st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_local_copy_evicts_least_recently_used(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("AGP_CACHE_MAX_GB", str(1500 / 1024**3))  # room for two 600-byte files
    cache = str(tmp_path / "cache")
    uris = [f"s3://{s3_bucket}/lru/{i}.bin" for i in range(3)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * 600)
    first, second = storage.local_copy(uris[0], cache), storage.local_copy(uris[1], cache)
    _age(first, 300)
    _age(second, 200)
    storage.forget_local_copies()
    assert storage.local_copy(uris[0], cache) == first  # a cache hit: now the most recently used
    third = storage.local_copy(uris[2], cache)  # over the limit: the least recently used goes
    assert [os.path.exists(p) for p in (first, second, third)] == [True, False, True]


def test_local_copy_respects_cache_size_limit(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("AGP_CACHE_MAX_GB", str(1500 / 1024**3))
    cache = str(tmp_path / "cache")
    paths = []
    for i in range(4):
        uri = f"s3://{s3_bucket}/limit/{i}.bin"
        storage.write_bytes(uri, bytes([i]) * 600)
        paths.append(storage.local_copy(uri, cache))
        _age(paths[-1], 100 - i)
    assert [os.path.exists(p) for p in paths] == [False, False, True, True]
    assert [open(p, "rb").read(1) for p in paths[2:]] == [b"\x02", b"\x03"]


def test_bad_cache_limit_is_a_data_error(tmp_path, s3_bucket, monkeypatch):
    storage.write_bytes(f"s3://{s3_bucket}/limit/9.bin", b"9")
    monkeypatch.setenv("AGP_CACHE_MAX_GB", "lots")
    with pytest.raises(DataError, match="AGP_CACHE_MAX_GB='lots' is not a number"):
        storage.local_copy(f"s3://{s3_bucket}/limit/9.bin", str(tmp_path / "cache"))


def test_pyarrow_filesystem_talks_to_the_same_endpoint(s3_bucket):
    filesystem, path = storage.pyarrow_filesystem(f"s3://{s3_bucket}/ray/run")
    assert type(filesystem).__name__ == "S3FileSystem"
    assert path == f"{s3_bucket}/ray/run"
    with filesystem.open_output_stream(f"{path}/written-by-pyarrow.txt") as f:
        f.write(b"arrow")
    assert storage.read_bytes(f"s3://{s3_bucket}/ray/run/written-by-pyarrow.txt") == b"arrow"
