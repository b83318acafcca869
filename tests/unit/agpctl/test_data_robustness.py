"""``agpctl data`` on data and folders that are not what the command expects: the user's files
are never deleted, damaged images are found, and write failures are one line (exit code 2)."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile

import pytest
from click.testing import CliRunner

from agp_data.generate import generate_dataset
from agpctl.cli import cli

SMALL = ["--categories", "1", "--train", "2", "--test", "2", "--size", "32"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _assert_one_line_error(result, pattern: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and lines[0].startswith("error:")
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _truncate(path) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _all_files(root) -> dict[str, bytes]:
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, root)] = open(full, "rb").read()
    return found


# --------------------------------------------------------------------------------------------
# generate over an existing dataset
# --------------------------------------------------------------------------------------------
def test_generate_refuses_to_replace_a_dataset_holding_the_users_files(tmp_path):
    out = tmp_path / "gen"
    assert run("data", "generate", "--out", str(out), *SMALL).exit_code == 0
    (out / "fabric" / "train" / "good" / "my_photo.png").write_bytes(b"the user's own image")
    (out / "notes.txt").write_text("labelling notes")
    before = _all_files(out)

    result = run("data", "generate", "--out", str(out), *SMALL, "--seed", "1")
    line = _assert_one_line_error(result, r"holds a generated dataset plus 2 file\(s\) agp did not generate")
    assert "fabric/train/good/my_photo.png" in line and "notes.txt" in line
    assert line.endswith("pass another --out or move those files away")
    assert _all_files(out) == before  # nothing deleted, nothing rewritten
    assert sorted(os.listdir(tmp_path)) == ["gen"]  # no scratch folder left


def test_generate_still_replaces_its_own_dataset(tmp_path):
    out = tmp_path / "gen"
    assert run("data", "generate", "--out", str(out), "--categories", "1", "--train", "3", "--test", "4",
               "--size", "32").exit_code == 0
    result = run("data", "generate", "--out", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out / "fabric" / "train" / "good")) == ["000.png", "001.png"]
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["params"]["train"] == 2 and sorted(os.listdir(tmp_path)) == ["gen"]


def test_generate_help_says_what_happens_to_an_existing_folder():
    text = " ".join(run("data", "generate", "--help").output.split())
    assert "If that folder also holds files it did not write" in text
    assert "refuses and changes nothing" in text


# --------------------------------------------------------------------------------------------
# generate into places that cannot be written
# --------------------------------------------------------------------------------------------
def test_generate_below_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken" / "gen"
    _assert_one_line_error(
        run("data", "generate", "--out", str(out), *SMALL),
        rf"cannot write into {re.escape(str(out))}: {re.escape(str(out.parent))} is a file, not a folder",
    )


def test_generate_on_a_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    _assert_one_line_error(
        run("data", "generate", "--out", str(tmp_path / "gen"), *SMALL), r"the file system is read-only"
    )
    assert os.listdir(tmp_path) == []


def test_generate_running_out_of_space_is_one_line_and_leaves_no_scratch(tmp_path, monkeypatch):
    from PIL import Image

    save = Image.Image.save
    calls = []

    def disk_fills_up(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_fills_up)
    _assert_one_line_error(
        run("data", "generate", "--out", str(tmp_path / "gen"), *SMALL),
        r"cannot write .*gen: No space left on device; free some space",
    )
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# inspect decodes every file
# --------------------------------------------------------------------------------------------
@pytest.fixture
def small_dataset(tmp_path) -> str:
    return generate_dataset(str(tmp_path / "ds"), categories=1, train=3, test=4, size=64, seed=0)


def test_inspect_flags_a_truncated_image(small_dataset):
    bad = os.path.join(small_dataset, "fabric", "train", "good", "001.png")
    _truncate(bad)
    result = run("data", "inspect", "--dataset", "synthetic", "--root", small_dataset, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    (problem,) = report["problems"]
    assert (problem["kind"], problem["path"]) == ("unreadable", bad)
    assert "truncated" in problem["detail"]
    assert report["categories"][0]["sizes_checked"] == 6  # the 6 images that decoded


def test_inspect_flags_a_truncated_mask(small_dataset):
    masks = sorted(
        os.path.join(d, n) for d, _, names in os.walk(os.path.join(small_dataset, "fabric", "ground_truth"))
        for n in names
    )
    _truncate(masks[0])
    result = run("data", "inspect", "--dataset", "synthetic", "--root", small_dataset)
    assert result.exit_code == 0, result.output
    assert "1 problem(s)" in result.stderr
    assert "unreadable" in result.stdout and os.path.basename(masks[0]) in result.stdout
    assert "no problems found" not in result.stdout
