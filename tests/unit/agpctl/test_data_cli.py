"""``agpctl data`` commands (CliRunner and a real subprocess) and the download machinery."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import tarfile
import threading
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from agp_data import storage
from agp_data.download import DatasetSource, download, download_source
from agp_data.errors import DataError
from agp_data.layouts import load_samples
from agpctl.cli import cli
from helpers import REPO_ROOT, agpctl

REPO = os.fspath(REPO_ROOT)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _png(path, value=90, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def _assert_one_line_error(result, pattern: str):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("error:")
    import re

    assert re.search(pattern, lines[0]), lines[0]


# --------------------------------------------------------------------------------------------
# generate / inspect
# --------------------------------------------------------------------------------------------
def test_generate_command(tmp_path):
    out = tmp_path / "gen"
    result = run(
        "data",
        "generate",
        "--out",
        str(out),
        "--categories",
        "2",
        "--train",
        "2",
        "--test",
        "2",
        "--size",
        "32",
        "--seed",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert "wrote 8 images (2 categories: fabric, metal" in result.stdout
    assert str(out) in result.stdout and "s" in result.stdout.split(" in ")[-1]
    assert len(load_samples("synthetic", str(out))) == 8


def test_inspect_table_and_json(generated_dataset):
    result = run("data", "inspect", "--dataset", "synthetic", "--root", generated_dataset)
    assert result.exit_code == 0, result.output
    for text in ("fabric", "metal", "64x64", "no problems found", "crack 1"):
        assert text in result.stdout
    result = run(
        "data",
        "inspect",
        "--dataset",
        "synthetic",
        "--root",
        generated_dataset,
        "--json",
        "--categories",
        "metal",
    )
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] is True and [c["name"] for c in report["categories"]] == ["metal"]
    (metal,) = report["categories"]
    assert (metal["train_good"], metal["test_good"], metal["test_defect"]) == (8, 3, 3)
    assert (metal["masks_found"], metal["masks_missing"]) == (3, 0)
    assert metal["image_sizes"] == {"64x64": 14} and metal["min_size"] == metal["max_size"] == "64x64"


def test_inspect_reports_problems_with_paths(tmp_path):
    root = tmp_path / "ds"
    _png(root / "widget/train/good/0.png")
    _png(root / "widget/train/good/1.png", size=(20, 8))
    (root / "widget/train/good/2.png").write_bytes(b"not a png at all")
    _png(root / "widget/test/good/0.png")
    _png(root / "widget/test/dent/0.png")
    _png(root / "widget/test/dent/1.png")  # no mask
    _png(root / "widget/ground_truth/dent/0_mask.png", value=255, size=(6, 5))  # wrong size
    _png(root / "widget/ground_truth/dent/7_mask.png", value=255)  # no image
    _png(root / "empty/ground_truth/x/0_mask.png")
    result = run("data", "inspect", "--dataset", "mvtec", "--root", str(root), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    problems = {(p["kind"], os.path.relpath(p["path"], root)) for p in report["problems"]}
    assert problems == {
        ("empty_category", "empty"),
        ("orphan_mask", "empty/ground_truth/x/0_mask.png"),
        ("unreadable", "widget/train/good/2.png"),
        ("missing_mask", "widget/test/dent/1.png"),
        ("size_mismatch", "widget/ground_truth/dent/0_mask.png"),
        ("orphan_mask", "widget/ground_truth/dent/7_mask.png"),
    }
    widget = next(c for c in report["categories"] if c["name"] == "widget")
    assert (widget["min_size"], widget["max_size"], widget["distinct_sizes"]) == ("12x10", "20x8", 2)
    text = run("data", "inspect", "--dataset", "mvtec", "--root", str(root))
    assert text.exit_code == 0 and "6 problem(s)" in text.stderr
    assert "orphan_mask" in text.stdout and str(root / "widget/ground_truth/dent/7_mask.png") in text.stdout


def test_inspect_folder_layout(tmp_path):
    for i in range(5):
        _png(tmp_path / f"ok/{i}.png")
    _png(tmp_path / "bad/b.png")
    _png(tmp_path / "masks/b_mask.png", value=255)
    result = run(
        "data",
        "inspect",
        "--dataset",
        "folder",
        "--normal-dir",
        str(tmp_path / "ok"),
        "--abnormal-dir",
        str(tmp_path / "bad"),
        "--mask-dir",
        str(tmp_path / "masks"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    (folder,) = json.loads(result.stdout)["categories"]
    assert (
        folder["name"],
        folder["train_good"],
        folder["test_good"],
        folder["test_defect"],
        folder["masks_found"],
    ) == (
        "folder",
        4,
        1,
        1,
        1,
    )


def test_inspect_s3_root_with_endpoint_option(generated_dataset, s3_server, s3_bucket, monkeypatch):
    storage.upload_dir(generated_dataset, f"s3://{s3_bucket}/gen")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only --s3-endpoint says where the server is
    try:
        result = run(
            "data",
            "inspect",
            "--dataset",
            "mvtec",
            "--root",
            f"s3://{s3_bucket}/gen",
            "--s3-endpoint",
            s3_server,
            "--json",
        )
    finally:
        storage.configure_s3(None)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["root"] == f"s3://{s3_bucket}/gen" and report["ok"]
    assert [c["train_good"] for c in report["categories"]] == [8, 8]


@pytest.mark.parametrize(
    "args, pattern",
    [
        (
            ["--dataset", "mvtec", "--root", "/definitely/not/here"],
            r"dataset root /definitely/not/here does not exist",
        ),
        (["--dataset", "mvtec", "--root", "s3:/x"], r"malformed S3 URI 's3:/x'"),
        (["--dataset", "mvtec"], r"--dataset mvtec needs --root"),
        (["--dataset", "folder"], r"--dataset folder needs --normal-dir"),
        (["--dataset", "folder", "--normal-dir", "/no/such/dir"], r"normal_dir /no/such/dir does not exist"),
        (["--dataset", "mvtec", "--root", ".", "--normal-dir", "x"], r"only apply to --dataset folder"),
        (["--dataset", "mvtec", "--root", "s3://b/x", "--s3-endpoint", "nonsense"], r"invalid S3 endpoint"),
    ],
)
def test_inspect_user_mistakes_exit_2_with_one_line(args, pattern):
    try:
        _assert_one_line_error(run("data", "inspect", *args), pattern)
    finally:
        storage.configure_s3(None)


def test_generate_user_mistakes(tmp_path):
    _assert_one_line_error(
        run("data", "generate", "--out", str(tmp_path / "g"), "--categories", "9"), "between 1 and 5"
    )
    (tmp_path / "file").write_text("x")
    _assert_one_line_error(run("data", "generate", "--out", str(tmp_path / "file")), "is a file")


def test_real_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    out = tmp_path / "sub"
    done = agpctl("data", "generate", "--out", str(out), "--categories", "1", "--train", "2", "--test", "2",
                  "--size", "32", cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 4 images" in done.stdout and (out / "dataset.json").exists()
    failed = agpctl("data", "inspect", "--dataset", "mvtec", "--root", str(tmp_path / "missing"),
                    cwd=REPO, env=env, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and "Traceback" not in failed.stderr
    assert "does not exist" in failed.stderr


# --------------------------------------------------------------------------------------------
# download machinery (a real HTTP server on 127.0.0.1 with Range support)
# --------------------------------------------------------------------------------------------
class _RangeServer:
    def __init__(self, payload: bytes) -> None:
        requests: list[str | None] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                requests.append(self.headers.get("Range"))
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
                else:
                    self.send_response(200)
                body = payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.requests = requests
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/archive"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/archive.tar.gz"


def _mvtec_tar(tmp_path) -> bytes:
    tree = tmp_path / "tree"
    _png(tree / "widget/train/good/0.png", value=10)
    _png(tree / "widget/test/good/0.png", value=20)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tree / "widget", arcname="widget")
    return buffer.getvalue()


def _source(url: str, payload: bytes, sha: str | None = "auto", name="mvtec", file="tiny.tar.gz"):
    digest = hashlib.sha256(payload).hexdigest() if sha == "auto" else sha
    return DatasetSource(name=name, file=file, urls=(url,), sha256=digest, size=len(payload))


def test_download_resumes_verifies_and_extracts(tmp_path):
    payload = _mvtec_tar(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "tiny.tar.gz.part").write_bytes(payload[:100])  # left by an interrupted run
    with _RangeServer(payload) as server:
        dataset_root = download_source(_source(server.url, payload), str(root), progress=False)
    assert server.requests == ["bytes=100-"]
    assert (root / "tiny.tar.gz").read_bytes() == payload and not (root / "tiny.tar.gz.part").exists()
    assert dataset_root == str(root)
    assert [s.split for s in load_samples("mvtec", dataset_root)] == ["train", "test"]
    # Done once: a rerun needs no network at all.
    assert download_source(_source(_closed_port_url(), payload), str(root), progress=False) == str(root)


def test_download_fresh_without_range(tmp_path):
    payload = _mvtec_tar(tmp_path)
    with _RangeServer(payload) as server:
        download_source(_source(server.url, payload, sha=None), str(tmp_path / "r"), progress=False)
    assert server.requests == [None]
    recorded = (tmp_path / "r" / "tiny.tar.gz.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(payload).hexdigest()  # unknown checksum: recorded instead


def test_placed_archive_extracts_without_network(tmp_path):
    payload = _mvtec_tar(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "tiny.tar.gz").write_bytes(payload)
    assert download_source(_source(_closed_port_url(), payload), str(root), progress=False) == str(root)
    assert (root / "widget/train/good/0.png").exists()


def test_unreachable_host_fails_fast_with_manual_instructions(tmp_path):
    url = _closed_port_url()
    with pytest.raises(DataError) as info:
        download_source(_source(url, b"x"), str(tmp_path), progress=False)
    message = str(info.value)
    host = url.split("/")[2]
    assert message == (
        f"cannot reach {host}: download tiny.tar.gz manually from {url} and place it at "
        f"{tmp_path / 'tiny.tar.gz'} (then rerun to extract)"
    )


def test_checksum_mismatch_is_refused(tmp_path):
    payload = _mvtec_tar(tmp_path)
    (tmp_path / "tiny.tar.gz").write_bytes(payload)
    with pytest.raises(DataError, match="checksum mismatch for .*tiny.tar.gz: expected sha256 0+, got"):
        download_source(_source(_closed_port_url(), payload, sha="0" * 64), str(tmp_path), progress=False)
    assert not (tmp_path / "widget").exists()


def test_zip_with_a_top_folder_and_unsafe_members(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        image = io.BytesIO()
        Image.new("RGB", (4, 4)).save(image, format="PNG")
        zf.writestr("BTech_Dataset_transformed/01/train/ok/0000.png", image.getvalue())
        zf.writestr("BTech_Dataset_transformed/01/test/ok/0000.png", image.getvalue())
    payload = buffer.getvalue()
    root = tmp_path / "btad"
    root.mkdir()
    (root / "btad.zip").write_bytes(payload)
    dataset_root = download_source(
        _source(_closed_port_url(), payload, name="btad", file="btad.zip"), str(root), progress=False
    )
    assert dataset_root == str(root / "BTech_Dataset_transformed")
    assert len(load_samples("btad", dataset_root)) == 2

    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escaped.txt", b"x")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "btad.zip").write_bytes(evil.getvalue())
    with pytest.raises(DataError, match="outside"):
        download_source(
            _source(_closed_port_url(), evil.getvalue(), name="btad", file="btad.zip"),
            str(tmp_path / "evil"),
            progress=False,
        )
    assert not (tmp_path / "escaped.txt").exists()


def test_download_argument_errors(tmp_path):
    with pytest.raises(DataError, match="no official download for 'mvtec3d'"):
        download("mvtec3d", str(tmp_path))
    with pytest.raises(DataError, match="needs a local --root"):
        download("visa", "s3://bucket/visa")


def test_inspect_synthetic_without_root_uses_the_cached_default(agp_cache_dir):
    result = run("data", "inspect", "--dataset", "synthetic", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["root"].startswith(os.path.join(agp_cache_dir, "synthetic"))
    assert [c["name"] for c in report["categories"]] == ["fabric", "metal", "tile"]
    assert [(c["train_good"], c["test_good"], c["test_defect"]) for c in report["categories"]] == [(40, 10, 10)] * 3
