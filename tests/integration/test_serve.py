"""``agpctl serve`` as users run it: a subprocess on a free port of 127.0.0.1 (embedded Ray,
Ray Serve) serving the session's tiny trained run, real HTTP requests (good images, corrupt
bytes, empty bodies, a decompression bomb, oversized bodies, concurrent clients), answers
compared with ``agpctl.api.load(run).predict``, and a SIGTERM that stops it cleanly with no
Ray process of its own left behind. One server for the whole module."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import http.client
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers
from agpctl.api import load
from agpctl.inference.serve_http import encode_multipart

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 240  # embedded Ray + Serve + the replica loading the run, on a busy machine
MAX_IMAGE_BYTES = 2_000_000
MAX_REQUEST_BYTES = 8_000_000
MAX_IMAGE_PIXELS = 1_000_000
MAX_BATCH = 8


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    stdout: Path
    stderr: Path

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            answer = connection.getresponse()
            return answer.status, json.loads(answer.read() or b"null")
        finally:
            connection.close()

    def predict(self, data: bytes, query: str = "") -> tuple[int, dict]:
        return self.request("POST", f"/predict{query}", data, {"Content-Type": "application/octet-stream"})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve")
    port = free_port()
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    command = [*helpers.AGPCTL, "serve", "--run", trained_run, "--port", str(port),
               "--max-batch-size", str(MAX_BATCH), "--batch-wait-ms", "20",
               "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-request-bytes", str(MAX_REQUEST_BYTES),
               "--max-image-pixels", str(MAX_IMAGE_PIXELS)]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
    running_server = Server(process, port, stdout, stderr)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while "ready at" not in stdout.read_text():
            assert process.poll() is None, f"agpctl serve exited {process.returncode}: {stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S}s: {stderr.read_text()[-3000:]}"
            time.sleep(0.5)
        yield running_server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def detector(trained_run):
    return load(trained_run, device="cpu")


@pytest.fixture(scope="module")
def images(image_folder, generated_dataset) -> dict[str, bytes]:
    """File name → bytes: predict's real-world quirks (grey, RGBA, 16-bit, BMP) and dataset images."""
    names = [name for name in helpers.PREDICT_INPUTS]
    found = {os.path.basename(name): Path(image_folder, name).read_bytes() for name in names}
    for path in sorted(Path(generated_dataset).glob("*/test/*/*.png"))[::3]:
        found[f"{path.parent.parent.parent.name}-{path.parent.name}-{path.name}"] = path.read_bytes()
    return found


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def expected_of(detector, data: dict[str, bytes]) -> dict[str, object]:
    """What the Python API decides on the same images (decoded from the same bytes)."""
    from agp_data.images import rgb_array
    from PIL import ImageOps

    arrays = [rgb_array(ImageOps.exif_transpose(Image.open(io.BytesIO(value)))) for value in data.values()]
    return dict(zip(data, detector.predict(arrays)))


def assert_same(answer: dict, expected) -> None:
    assert answer["score"] == pytest.approx(expected.score, rel=1e-5, abs=1e-6), answer["name"]
    assert answer["anomalous"] == expected.anomalous and answer["decision"] == ("anomalous" if expected.anomalous else "normal")
    assert (answer["category"], answer["category_source"]) == (expected.category, expected.category_source)
    assert (answer["image_threshold"], answer["pixel_threshold"]) == (expected.image_threshold, expected.pixel_threshold)
    assert (answer["height"], answer["width"]) == expected.map.shape
    assert abs(answer["defect_area_px"] - int(expected.mask.sum())) <= max(2, expected.mask.size // 1000)


def test_health_and_info_describe_the_run(server, trained_run):
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    status, info = server.request("GET", "/info")
    assert status == 200
    assert info["model"]["method"] == "agpnet" and info["model"]["run"] == trained_run
    assert info["model"]["categories"] == ["fabric", "metal"] and info["model"]["image_size"] == 64
    stored = json.loads(Path(trained_run, "thresholds.json").read_text())
    assert (info["thresholds"]["image"], info["thresholds"]["pixel"]) == (stored["image"], stored["pixel"])
    assert info["limits"]["max_image_pixels"] == MAX_IMAGE_PIXELS
    assert info["replicas"]["min"] == info["replicas"]["max"] == 1 and info["replicas"]["gpus_each"] == 0
    out = server.stdout.read_text()
    assert "agpnet" in out and f"http://127.0.0.1:{server.port}" in out


def test_one_image_per_request_scores_as_the_python_api(server, detector, images):
    expected = expected_of(detector, images)
    for name, data in images.items():
        status, body = server.predict(data)
        assert status == 200, body
        [answer] = body["predictions"]
        assert "heatmap_png" not in answer and "mask_png" not in answer
        assert_same({**answer, "name": name}, expected[name])


def test_the_python_api_on_files_gives_the_same_scores(server, detector, image_folder):
    paths = [os.path.join(image_folder, name) for name in helpers.PREDICT_INPUTS]
    for path, reference in zip(paths, detector.predict(paths)):
        status, body = server.predict(Path(path).read_bytes())
        assert status == 200 and body["predictions"][0]["score"] == pytest.approx(reference.score, rel=1e-5)


def test_several_images_in_one_multipart_request_with_heatmaps_and_masks(server, detector, images):
    expected = expected_of(detector, images)
    files = list(images.items())
    content_type, body = encode_multipart([*files[:3], ("notes.txt", b"not an image"), *files[3:6]])
    status, answer = server.request("POST", "/predict?heatmap=1&mask=1", body, {"Content-Type": content_type})
    assert status == 200, answer
    entries = answer["predictions"]
    assert [e["name"] for e in entries] == [n for n, _ in files[:3]] + ["notes.txt"] + [n for n, _ in files[3:6]]
    assert entries[3]["status"] == 415 and "not an image" in entries[3]["error"]
    for entry in entries[:3] + entries[4:]:
        reference = expected[entry["name"]]
        assert_same(entry, reference)
        mask = decoded(base64.b64decode(entry["mask_png"])) > 0
        assert mask.shape == reference.mask.shape and (mask != reference.mask).mean() < 0.001
        assert decoded(base64.b64decode(entry["heatmap_png"])).shape == (*reference.map.shape, 3)


def test_a_given_category_decides_the_images(server, images):
    data = next(iter(images.values()))
    status, body = server.predict(data, "?category=metal")
    assert status == 200 and (body["predictions"][0]["category"], body["predictions"][0]["category_source"]) == \
        ("metal", "given")
    status, body = server.predict(data, "?category=wood")
    assert status == 400 and body["error"] == "?category=wood: the model has no such category; choose one of fabric, metal"


def test_bad_requests_get_one_clear_4xx_and_the_service_keeps_serving(server, images, tmp_path):
    good = next(iter(images.values()))
    png = images["color.png"]
    bomb = io.BytesIO()
    Image.new("L", (1200, 1000)).save(bomb, format="PNG")  # 1.2 MP in a few kB
    content_type, _ = encode_multipart([("a.png", png)])
    cases = {
        "empty body": (server.predict(b""), 400, "no body"),
        "text": (server.predict(b"hello, this is not an image"), 415, "not an image"),
        "corrupt PNG": (server.predict(b"\x89PNG\r\n\x1a\n not really a png"), 415, "not an image"),
        "truncated PNG": (server.predict(png[: len(png) // 2]), 422, "cannot decode"),
        "decompression bomb": (server.predict(bomb.getvalue()), 413, "--max-image-pixels"),
        "oversized image": (server.predict(os.urandom(MAX_IMAGE_BYTES + 1)), 413, "--max-image-bytes"),
        "oversized body": (server.predict(os.urandom(MAX_REQUEST_BYTES + 1)), 413, "--max-request-bytes"),
        "cut multipart": (server.request("POST", "/predict", b"--" + content_type.split("=")[1].encode() + b"\r\n",
                                         {"Content-Type": content_type}), 400, "multipart"),
        "typo in query": (server.predict(good, "?heatmaps=1"), 400, "unknown query parameter"),
        "unknown route": (server.request("GET", "/predictions"), 404, "no route"),
        "wrong method": (server.request("GET", "/predict"), 405, "takes POST"),
    }
    for case, ((status, body), expected_status, expected_text) in cases.items():
        assert status == expected_status, (case, body)
        assert set(body) == {"error"} and expected_text in body["error"], (case, body)
        assert "\n" not in body["error"] and "Traceback" not in body["error"], case
        assert server.request("GET", "/health")[0] == 200, f"not serving after: {case}"
    status, body = server.predict(good)
    assert status == 200 and body["predictions"][0]["score"] > 0
    assert "Traceback" not in server.stderr.read_text()


def test_concurrent_clients_get_their_own_answers_in_batches(server, detector, images):
    expected = expected_of(detector, images)
    names = list(images)
    clients, per_client = 8, 4
    _, before = server.request("GET", "/info")
    results: list[tuple[str, int, dict]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(clients)

    def client(index: int) -> None:
        try:
            start.wait()
            for k in range(per_client):
                name = names[(index * per_client + k) % len(names)]
                status, body = server.predict(images[name])
                results.append((name, status, body))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == clients * per_client
    for name, status, body in results:
        assert status == 200, body
        assert_same({**body["predictions"][0], "name": name}, expected[name])
    _, after = server.request("GET", "/info")
    images_scored = after["replica"]["scored"]["images"] - before["replica"]["scored"]["images"]
    batches = after["replica"]["scored"]["batches"] - before["replica"]["scored"]["batches"]
    assert images_scored == clients * per_client
    assert batches < images_scored, "concurrent requests were never scored together"


def test_a_busy_port_or_a_bad_run_is_one_line_before_ray_starts(server, trained_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    for checkpoint in broken.glob("checkpoint_*/model.pt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    cases = {
        f"port {server.port} on 127.0.0.1 is in use": ["--run", trained_run, "--port", str(server.port)],
        "not an agp run directory": ["--run", str(tmp_path / "no-such-run")],
        "every checkpoint is unreadable": ["--run", str(broken)],
    }
    for expected, args in cases.items():
        proc = helpers.agpctl("serve", *args, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]


def test_sigterm_stops_the_service_cleanly_and_leaves_no_ray_processes(server):
    # Last in the module: the server stops here.
    ours = descendants(server.process.pid)
    assert ours, "agpctl serve started no processes (no embedded Ray?)"
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=90)
    err = server.stderr.read_text()
    assert server.process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "*** SIGTERM received" not in err
    assert "stopped" in server.stdout.read_text()
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in ours) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in ours if running(pid)]
    assert not left, f"Ray processes left behind: {left}"
