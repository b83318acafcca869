"""agp_data.storage on hostile local file systems: every failed write is one DataError line,
unreadable directory entries are skipped and reported, never fatal.

Tests run as root, where permission bits do not stop writes: read-only and full file systems
are simulated by making the system call fail; files and folders in the way are real.
"""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

from agp_data import storage
from agp_data.errors import DataError, WriteDataError


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


# --------------------------------------------------------------------------------------------
# writes
# --------------------------------------------------------------------------------------------
def test_read_only_file_system_is_one_line_naming_the_path(tmp_path, monkeypatch):
    target = tmp_path / "out" / "metrics.json"
    monkeypatch.setattr(tempfile, "mkstemp", _fail_with(errno.EROFS))
    with pytest.raises(DataError) as info:
        storage.write_text(str(target), "{}")
    assert _one_line(info.value) == (
        f"cannot write {target}: the file system is read-only; choose another location"
    )
    assert info.value.errno == errno.EROFS and isinstance(info.value, OSError)
    assert not target.exists()


def test_disk_full_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    storage.write_bytes(str(target), b"old")
    monkeypatch.setattr(os, "fsync", _fail_with(errno.ENOSPC))
    with pytest.raises(WriteDataError) as info:
        storage.write_bytes(str(target), b"new" * 1000)
    assert _one_line(info.value) == (
        f"cannot write {target}: No space left on device; free some space or choose another location"
    )
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_disk_full_at_the_rename_is_translated_too(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    monkeypatch.setattr(os, "replace", _fail_with(errno.EDQUOT))
    with pytest.raises(DataError, match=f"cannot write {target}: .*; free some space"):
        storage.write_bytes(str(target), b"x")
    assert os.listdir(tmp_path) == []


def test_parent_that_is_a_file(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("I am a file")
    for target in (blocker / "metrics.json", blocker / "deep" / "er" / "metrics.json"):
        with pytest.raises(DataError) as info:
            storage.write_text(str(target), "{}")
        assert _one_line(info.value) == (
            f"cannot write {target}: {blocker} is a file, not a folder; choose another location"
        )
    assert blocker.read_text() == "I am a file"
    with pytest.raises(DataError, match=f"cannot create {blocker}/sub: {blocker} is a file, not a folder"):
        storage.make_dirs(str(blocker / "sub"))


def test_target_that_is_a_folder(tmp_path):
    folder = tmp_path / "checkpoint"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        storage.write_bytes(str(folder), b"x")
    assert _one_line(info.value) == (
        f"cannot write {folder}: it is a folder, not a file; name a file there or choose another location"
    )
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"] and os.listdir(folder) == ["inside"]


def test_name_too_long(tmp_path):
    target = tmp_path / ("n" * 300 + ".png")
    with pytest.raises(DataError, match="the name is too long; choose a shorter path"):
        storage.write_bytes(str(target), b"x")
    # A name close to the limit is still writable (the temp name must not push it over).
    near = tmp_path / ("m" * 250 + ".png")
    storage.write_bytes(str(near), b"ok")
    assert near.read_bytes() == b"ok" and os.listdir(tmp_path) == [near.name]


def test_other_os_errors_are_one_line_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "mkstemp", _fail_with(errno.EIO))
    with pytest.raises(DataError) as info:
        storage.write_bytes(str(tmp_path / "x.bin"), b"x")
    expected = f"cannot write {tmp_path / 'x.bin'}: Input/output error; choose another location"
    assert _one_line(info.value) == expected


def test_permission_denied_message_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "mkstemp", _fail_with(errno.EACCES))
    with pytest.raises(DataError, match=r"^permission denied writing .*x\.bin: choose a writable location$"):
        storage.write_bytes(str(tmp_path / "x.bin"), b"x")


def test_copy_tree_into_a_read_only_target_is_a_data_error(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"A")
    monkeypatch.setattr(tempfile, "mkstemp", _fail_with(errno.EROFS))
    with pytest.raises(DataError, match="read-only"):
        storage.copy_tree(str(tmp_path / "src"), str(tmp_path / "dst"))


def test_delete_failure_is_a_data_error(tmp_path, monkeypatch):
    (tmp_path / "f.bin").write_bytes(b"x")
    monkeypatch.setattr(os, "remove", _fail_with(errno.EROFS))
    with pytest.raises(DataError, match=f"cannot delete {tmp_path / 'f.bin'}: Read-only file system"):
        storage.delete(str(tmp_path / "f.bin"))


# --------------------------------------------------------------------------------------------
# check_writable_dir / check_writable_file
# --------------------------------------------------------------------------------------------
def test_check_writable_dir_accepts_existing_and_creatable_folders_and_creates_nothing(tmp_path):
    storage.check_writable_dir(str(tmp_path))
    storage.check_writable_dir(str(tmp_path / "new" / "deeper"))
    storage.check_writable_file(str(tmp_path / "new" / "file.json"))
    storage.check_writable_file(str(tmp_path / "existing.json"))
    assert os.listdir(tmp_path) == []  # no folders made, no probe file left


def test_check_writable_dir_rejects_files_in_the_way(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    with pytest.raises(DataError) as info:
        storage.check_writable_dir(str(blocker))
    assert _one_line(info.value) == (
        f"cannot write into {blocker}: {blocker} is a file, not a folder; choose another location"
    )
    with pytest.raises(DataError, match=f"{blocker} is a file, not a folder"):
        storage.check_writable_dir(str(blocker / "below"))
    with pytest.raises(DataError, match=f"{blocker} is a file, not a folder"):
        storage.check_writable_file(str(blocker / "below" / "x.json"))


def test_check_writable_file_rejects_a_folder(tmp_path):
    with pytest.raises(DataError, match=f"cannot write {tmp_path}: it is a folder, not a file"):
        storage.check_writable_file(str(tmp_path))


def test_check_writable_dir_on_a_read_only_or_full_file_system(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "mkstemp", _fail_with(errno.EROFS))
    with pytest.raises(DataError, match=f"cannot write into {tmp_path}/out: the file system is read-only"):
        storage.check_writable_dir(str(tmp_path / "out"))
    monkeypatch.setattr(tempfile, "mkstemp", _fail_with(errno.ENOSPC))
    with pytest.raises(DataError, match="No space left on device"):
        storage.check_writable_file(str(tmp_path / "x.json"))


def test_check_writable_dir_rejects_names_that_are_too_long(tmp_path):
    with pytest.raises(DataError, match="is longer than 255 bytes; choose a shorter path"):
        storage.check_writable_dir(str(tmp_path / ("d" * 256) / "x"))
    with pytest.raises(DataError, match="is longer than 255 bytes"):
        storage.check_writable_file(str(tmp_path / ("f" * 256)))


def test_check_writable_on_s3_makes_no_network_call(monkeypatch):
    def no_network():
        raise AssertionError("no S3 client may be made")

    monkeypatch.setattr(storage, "_client", no_network)
    storage.check_writable_dir("s3://some-bucket/runs/x")
    storage.check_writable_file("s3://some-bucket/runs/x/metrics.json")
    with pytest.raises(DataError, match="malformed S3 URI"):
        storage.check_writable_dir("s3:/bucket")
    with pytest.raises(DataError, match="names a bucket or folder"):
        storage.check_writable_file("s3://some-bucket/runs/")


# --------------------------------------------------------------------------------------------
# list_files
# --------------------------------------------------------------------------------------------
@pytest.fixture
def hostile_folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"b")
    os.symlink(root / "loop", root / "loop")  # points at itself: stat gives ELOOP
    os.symlink(root / "gone.png", root / "broken.png")
    os.symlink(root / "a.png", root / "sub" / "link-to-a.png")
    return root


def test_list_files_skips_a_symlink_loop_and_a_broken_link(hostile_folder):
    root = str(hostile_folder)
    skipped: list[tuple[str, str]] = []
    assert storage.list_files(root, recursive=False, skipped=skipped) == [f"{root}/a.png"]
    assert sorted(skipped) == [
        (f"{root}/broken.png", "broken symbolic link (its target does not exist)"),
        (f"{root}/loop", "Too many levels of symbolic links"),
    ]
    skipped = []
    assert storage.list_files(root, skipped=skipped) == [
        f"{root}/a.png",
        f"{root}/sub/b.png",
        f"{root}/sub/link-to-a.png",
    ]
    assert sorted(path for path, _ in skipped) == [f"{root}/broken.png", f"{root}/loop"]
    # Without a list to report to, the same files are listed and nothing raises.
    assert storage.list_files(root, recursive=False) == [f"{root}/a.png"]
    assert len(storage.list_files(root)) == 3


def test_list_files_skips_a_sub_folder_it_cannot_open(hostile_folder, monkeypatch):
    root = str(hostile_folder)
    scandir = os.scandir

    def denied_for_sub(path="."):
        if os.fspath(path) == f"{root}/sub":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied_for_sub)
    skipped: list[tuple[str, str]] = []
    assert storage.list_files(root, skipped=skipped) == [f"{root}/a.png"]
    assert (f"{root}/sub", "Permission denied") in skipped


def test_list_files_reports_symlinked_folders_it_does_not_follow(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.png").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    skipped: list[tuple[str, str]] = []
    assert storage.list_files(str(tmp_path), skipped=skipped) == [str(tmp_path / "real" / "x.png")]
    assert skipped == [(str(tmp_path / "alias"), "symbolic link to a folder, not followed")]


def test_file_signatures_change_with_the_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"one")
    first = storage.file_signatures([str(path), str(tmp_path / "missing")])
    assert first[str(tmp_path / "missing")] is None and first[str(path)]
    path.write_bytes(b"three")
    assert storage.file_signatures([str(path)])[str(path)] != first[str(path)]


def test_file_signatures_on_s3_by_listing_and_by_head(s3_bucket):
    many = [f"s3://{s3_bucket}/d/{i}.bin" for i in range(storage._HEADS_PER_FOLDER + 2)]
    for uri in many:
        storage.write_bytes(uri, b"x")
    few = f"s3://{s3_bucket}/e/only.bin"
    storage.write_bytes(few, b"yy")
    missing = f"s3://{s3_bucket}/d/absent.bin"
    signatures = storage.file_signatures([*many, few, missing])
    assert signatures[missing] is None
    assert all(signatures[u] and signatures[u].endswith(":1") for u in many)
    assert signatures[few].endswith(":2")
    storage.write_bytes(few, b"zzz")
    assert storage.file_signatures([few])[few] != signatures[few]
