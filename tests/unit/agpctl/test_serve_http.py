"""``agpctl serve`` without Ray: request parsing and limits (agpctl.inference.serve_http), the
options a user gives (serve_options) and how they become Serve's deployment options (serving)."""

from __future__ import annotations

import asyncio
import base64
import io
import socket

import numpy as np
import pytest
from PIL import Image

from agp_data.images import read_image
from agpctl.errors import UserError
from agpctl.inference.detector import Detection
from agpctl.inference.serve_http import (
    ImagePart,
    Outcome,
    PredictOptions,
    RequestError,
    ServeLimits,
    decode_image,
    decode_parts,
    detection_json,
    encode_multipart,
    image_parts,
    predict_answer,
    predict_options,
    read_body,
)
from agpctl.inference.serve_options import ServeConfig
from agpctl.inference.serving import check_port_free, deployment_options, resolved_resources

LIMITS = ServeLimits()


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def status_of(call) -> tuple[int, str]:
    with pytest.raises(RequestError) as caught:
        call()
    assert "\n" not in caught.value.message
    return caught.value.status, caught.value.message


async def chunks(*parts: bytes):
    for part in parts:
        yield part


def body_of(content_length: str | None, *parts: bytes, limits: ServeLimits = LIMITS) -> bytes:
    return asyncio.run(read_body(chunks(*parts), content_length, limits))


# -- the query string ---------------------------------------------------------------------------
def test_query_flags_and_category():
    assert predict_options([]) == PredictOptions()
    assert predict_options([("heatmap", "1"), ("mask", "true"), ("category", "metal")]) == \
        PredictOptions(heatmap=True, mask=True, category="metal")
    assert predict_options([("heatmap", "no"), ("mask", "")]) == PredictOptions()


def test_a_mistyped_query_is_a_400_naming_the_parameters():
    status, message = status_of(lambda: predict_options([("heatmaps", "1")]))
    assert status == 400 and "'heatmaps'" in message and "heatmap, mask, category" in message
    status, message = status_of(lambda: predict_options([("mask", "please")]))
    assert status == 400 and "mask=1" in message


# -- the body ------------------------------------------------------------------------------------
def test_the_body_is_refused_by_its_content_length_before_it_is_read():
    limits = ServeLimits(max_request_bytes=10)
    read = []

    async def never_read():
        read.append(True)
        yield b"x"

    with pytest.raises(RequestError) as caught:
        asyncio.run(read_body(never_read(), "11", limits))
    assert caught.value.status == 413 and "--max-request-bytes" in caught.value.message
    assert not read


def test_a_body_without_content_length_stops_at_the_limit():
    limits = ServeLimits(max_request_bytes=10)
    assert body_of(None, b"12345", b"67890", limits=limits) == b"1234567890"
    status, _ = status_of(lambda: body_of(None, b"123456", b"789012", limits=limits))
    assert status == 413
    status, message = status_of(lambda: body_of("ten", b"1"))
    assert status == 400 and "Content-Length" in message


def test_raw_bytes_are_one_image_and_an_empty_body_is_a_400():
    assert image_parts("image/png", b"abc", LIMITS) == [ImagePart("image", b"abc")]
    assert image_parts(None, b"abc", LIMITS) == [ImagePart("image", b"abc")]
    status, message = status_of(lambda: image_parts("image/png", b"", LIMITS))
    assert status == 400 and "no body" in message


def test_multipart_round_trip_keeps_names_bytes_and_order():
    files = [("a.png", b"\x89PNG first\r\n--not-a-boundary"), ('odd "name".jpg', b""), ("c.bmp", bytes(range(256)))]
    content_type, body = encode_multipart(files)
    parts = image_parts(content_type, body, LIMITS)
    assert [(p.name, p.data) for p in parts] == files


def test_multipart_as_curl_sends_it():
    body = (b"preamble to ignore\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"part 1.png\"\r\n"
            b"Content-Type: image/png\r\n\r\nAAAA\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"second\"\r\n\r\nBB\r\n"
            b"--XyZ--\r\nepilogue")
    parts = image_parts('multipart/form-data; boundary="XyZ"', body, LIMITS)
    assert [(p.name, p.data) for p in parts] == [("part 1.png", b"AAAA"), ("second", b"BB")]


@pytest.mark.parametrize("content_type, body, expected", [
    ("multipart/form-data", b"--x\r\n\r\n--x--", "without a boundary"),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nAAAA", "closing boundary"),
    ("multipart/form-data; boundary=x", b"--x--\r\n", "holds no images"),
    ("multipart/form-data; boundary=x", b"--x\r\nno blank line\r\n--x--", "without headers"),
    ("multipart/mixed; boundary=x", b"--x--", "not supported"),
])
def test_malformed_multipart_is_a_400(content_type, body, expected):
    status, message = status_of(lambda: image_parts(content_type, body, LIMITS))
    assert status == 400 and expected in message


def test_too_many_images_is_a_413():
    content_type, body = encode_multipart([(f"{i}.png", b"x") for i in range(3)])
    status, message = status_of(lambda: image_parts(content_type, body, ServeLimits(max_images=2)))
    assert status == 413 and "--max-images-per-request" in message


def test_too_many_images_is_a_413_before_any_part_is_parsed():
    # A part the parser would refuse (400) after the limit: the count decides first.
    minimal = b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n\r\n"
    body = minimal * 65 + b"--b\r\nno headers here\r\n--b--\r\n"
    content_type = "multipart/form-data; boundary=b"
    status, message = status_of(lambda: image_parts(content_type, body, ServeLimits(max_images=64)))
    assert status == 413 and "66 images" in message and "--max-images-per-request" in message
    assert len(image_parts(content_type, minimal * 64 + b"--b--", LIMITS)) == 64


# -- decoding -------------------------------------------------------------------------------------
def test_decoding_converts_as_files_are_read(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        "rgb.png": Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)),
        "grey.png": Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), mode="L"),
        "rgba.png": Image.fromarray(rng.integers(0, 255, (20, 30, 4), dtype=np.uint8), mode="RGBA"),
        "deep.tif": Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)),
        "photo.jpg": Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)),
    }
    for name, image in images.items():
        path = tmp_path / name
        if name.endswith(".jpg"):
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated 90°: decoded upright, as predict reads the file
            image.save(path, exif=exif)
        else:
            image.save(path)
        decoded = decode_image(path.read_bytes(), LIMITS)
        expected = np.asarray(read_image(str(path)))
        assert decoded.dtype == np.uint8 and decoded.shape[2] == 3, name
        np.testing.assert_array_equal(decoded, expected, err_msg=name)
    assert decode_image((tmp_path / "photo.jpg").read_bytes(), LIMITS).shape == (30, 20, 3)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = png_bytes(np.zeros((2000, 1500), dtype=np.uint8), mode="L")  # 3 MP in a few kB
    assert len(bomb) < 50_000
    status, message = status_of(lambda: decode_image(bomb, ServeLimits(max_image_pixels=1_000_000)))
    assert status == 413 and "1500x2000" in message and "--max-image-pixels" in message


def test_the_images_of_one_request_share_a_pixel_budget():
    one_megapixel = png_bytes(np.zeros((1000, 1000), dtype=np.uint8), mode="L")  # a few kB
    limits = ServeLimits(max_image_pixels=1_000_000, max_request_pixels=2_500_000)
    parts = [ImagePart(f"{i}.png", one_megapixel) for i in range(3)]
    status, message = status_of(lambda: decode_parts(parts, limits))
    assert status == 413 and "3.0 megapixels" in message and "--max-request-pixels" in message
    assert [d.rgb.shape for d in decode_parts(parts[:2], limits)] == [(1000, 1000, 3)] * 2
    # Images refused on their own do not count against the others.
    mixed = decode_parts([*parts[:2], ImagePart("big.png", png_bytes(np.zeros((1001, 1000), np.uint8), "L"))], limits)
    assert [d.error.status if d.error else 200 for d in mixed] == [200, 200, 413]


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n")


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["eps", "gif"])
def test_only_the_accepted_formats_are_opened(name):
    data = EPS if name == "eps" else gif_bytes()  # PIL would hand the EPS to Ghostscript
    assert Image.open(io.BytesIO(data)).format == name.upper()  # an image PIL could open
    status, message = status_of(lambda: decode_image(data, LIMITS))
    assert status == 415 and "PNG, JPEG, BMP, TIFF or WebP" in message


@pytest.mark.parametrize("data, status, expected", [
    (b"", 400, "empty"),
    (b"just some text", 415, "not an image"),
    (b"\x89PNG\r\n\x1a\n not really a png", 415, "not an image"),
])
def test_what_is_not_an_image_is_a_4xx(data, status, expected):
    got, message = status_of(lambda: decode_image(data, LIMITS))
    assert got == status and expected in message


def test_a_truncated_image_is_a_422_and_an_oversized_one_a_413():
    data = png_bytes(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    status, message = status_of(lambda: decode_image(data[: len(data) // 2], LIMITS))
    assert status == 422 and "PNG" in message
    status, message = status_of(lambda: decode_image(data, ServeLimits(max_image_bytes=len(data) - 1)))
    assert status == 413 and "--max-image-bytes" in message


def test_one_bad_part_never_fails_the_others():
    good = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
    decoded = decode_parts([ImagePart("a", good), ImagePart("b", b"nope"), ImagePart("c", good)], LIMITS)
    assert [d.rgb is not None for d in decoded] == [True, False, True]
    assert decoded[1].error.status == 415


# -- the answer ---------------------------------------------------------------------------------
def detection(score: float = 2.0) -> Detection:
    full_map = np.zeros((6, 9), dtype=np.float32)
    full_map[1:3, 2:5] = 3.0
    return Detection(score=score, map=full_map, mask=full_map > 1.0, anomalous=score > 1.5, category="metal",
                     category_source="inferred", category_similarity=0.9, image_threshold=1.5, pixel_threshold=1.0)


def test_a_decision_as_json_with_heatmap_and_mask():
    plain = detection_json("a.png", detection(), PredictOptions())
    assert plain["decision"] == "anomalous" and plain["anomalous"] is True
    assert (plain["width"], plain["height"], plain["defect_area_px"]) == (9, 6, 6)
    assert "heatmap_png" not in plain and "mask_png" not in plain
    full = detection_json("a.png", detection(), PredictOptions(heatmap=True, mask=True))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(full["mask_png"]))))
    np.testing.assert_array_equal(mask > 0, detection().mask)
    heat = Image.open(io.BytesIO(base64.b64decode(full["heatmap_png"])))
    assert heat.size == (9, 6) and heat.mode == "RGB"
    assert detection_json("b", detection(1.0), PredictOptions())["decision"] == "normal"


def test_the_answer_status_follows_what_could_be_scored():
    bad = RequestError(415, "not an image")
    status, body = predict_answer([Outcome("a", error=bad)], PredictOptions())
    assert (status, body) == (415, {"error": "not an image"})
    status, body = predict_answer([Outcome("a", detection()), Outcome("b", error=bad)], PredictOptions())
    assert status == 200 and body["predictions"][1] == {"name": "b", "error": "not an image", "status": 415}
    status, body = predict_answer([Outcome("a", error=bad), Outcome("b", error=RequestError(413, "big"))],
                                  PredictOptions())
    assert status == 415 and body["error"].startswith("none of the 2 images") and len(body["predictions"]) == 2


# -- options and deployment ------------------------------------------------------------------
@pytest.mark.parametrize("changes, expected", [
    ({"replicas": 2, "max_replicas": 3}, "not both"),
    ({"min_replicas": 3, "max_replicas": 2}, "more than --max-replicas"),
    ({"replicas": 0}, "--replicas must be at least 1"),
    ({"port": 0}, "--port"),
    ({"max_batch_size": 0}, "--max-batch-size"),
    ({"batch_wait_ms": -1}, "--batch-wait-ms"),
    ({"gpus_per_replica": -1}, "--gpus-per-replica"),
    ({"limits": ServeLimits(max_image_pixels=0)}, "--max-image-pixels"),
    ({"limits": ServeLimits(max_request_pixels=0)}, "--max-request-pixels"),
    ({"threshold": "high"}, "--threshold"),
])
def test_impossible_options_are_one_line_naming_the_flag(changes, expected):
    with pytest.raises(UserError, match=expected):
        ServeConfig(run="r", **changes).check()


def test_fixed_and_autoscaled_replicas_become_serve_options():
    fixed = resolved_resources(ServeConfig(run="r", replicas=2), {"CPU": 8.0}, remote=False)
    options = deployment_options(fixed)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 0.0}
    assert options["max_ongoing_requests"] == 2 * fixed.max_batch_size
    scaled = resolved_resources(ServeConfig(run="r", max_replicas=3, max_batch_size=8), {"CPU": 8.0, "GPU": 2.0},
                                remote=True)
    options = deployment_options(scaled)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8}
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.6666}  # 3 replicas on 2 GPUs


@pytest.mark.parametrize("changes, gpus, expected", [
    ({"replicas": 2}, 1.0, 0.5),  # one GPU shared, not two asked for
    ({"replicas": 3}, 1.0, 0.3333),
    ({"min_replicas": 1, "max_replicas": 4}, 2.0, 0.5),  # room for the most replicas
    ({}, 4.0, 1.0),  # never more than one each
    ({"replicas": 2}, 0.0, 0.0),
    ({"replicas": 2, "gpus_per_replica": 0.25}, 1.0, 0.25),  # the user's choice stays
])
def test_gpus_per_replica_share_the_clusters_gpus(changes, gpus, expected):
    resolved = resolved_resources(ServeConfig(run="r", **changes), {"CPU": 8.0, "GPU": gpus}, remote=False)
    assert resolved.gpus_per_replica == expected


def test_fixed_replicas_needing_more_gpus_than_the_machine_has_are_one_line():
    config = ServeConfig(run="r", replicas=2, gpus_per_replica=1.0)
    with pytest.raises(UserError, match=r"--replicas 2 with --gpus-per-replica 1 need 2 GPUs but this machine "
                                        r"has 1; .*--gpus-per-replica 0.5\)"):
        resolved_resources(config, {"CPU": 8.0, "GPU": 1.0}, remote=False)
    # A remote cluster may add GPU nodes; autoscaled replicas start as the GPUs allow.
    assert resolved_resources(config, {"CPU": 8.0, "GPU": 1.0}, remote=True).gpus_per_replica == 1.0
    scaled = ServeConfig(run="r", max_replicas=2, gpus_per_replica=1.0)
    assert resolved_resources(scaled, {"CPU": 8.0, "GPU": 1.0}, remote=False).gpus_per_replica == 1.0


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again once closed


@pytest.mark.parametrize("args, expected", [
    (["--replicas", "2", "--max-replicas", "3"], "not both"),
    (["--max-image-bytes", "0"], "--max-image-bytes must be at least 1"),
    (["--max-request-pixels", "0"], "--max-request-pixels must be at least 1"),
    (["--run", "/nonexistent/agp-run"], "not an agp run directory"),
])
def test_agpctl_serve_mistakes_are_one_line_before_ray_starts(args, expected, monkeypatch):
    from click.testing import CliRunner

    from agpctl.cli import cli
    from agpctl.inference import serving

    monkeypatch.setattr(serving, "ray_session", lambda *a, **k: pytest.fail("Ray started"))
    run = [] if "--run" in args else ["--run", "/nonexistent/agp-run"]
    result = CliRunner().invoke(cli, ["serve", *run, *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr


def test_a_replica_that_fails_to_start_is_named_by_its_own_error():
    from types import SimpleNamespace

    from agpctl.inference.serving import APP_NAME, startup_error

    def serve_reporting(message: str):
        deployment = SimpleNamespace(message=message)
        app = SimpleNamespace(deployments={"detector": deployment})
        return SimpleNamespace(status=lambda: SimpleNamespace(applications={APP_NAME: app}))

    failed = RuntimeError("Deploying application agp failed: Failed to update the deployments ['detector'].")
    traceback_text = ("The replica failed to start:\nTraceback (most recent call last):\n  File \"x.py\"\n"
                      "agpctl.errors.UserError: run r: every checkpoint is unreadable (r/c); retrain\n")
    assert str(startup_error(serve_reporting(traceback_text), failed)) == \
        "run r: every checkpoint is unreadable (r/c); retrain"
    other = startup_error(serve_reporting("Traceback ...\nMemoryError: out of memory\n"), failed)
    assert str(other) == "the service did not start: MemoryError: out of memory"
    no_status = SimpleNamespace(status=lambda: (_ for _ in ()).throw(ConnectionError("gone")))
    assert "Failed to update the deployments" in str(startup_error(no_status, failed))


# -- the replica's event loop ---------------------------------------------------------------------
def test_the_replica_keeps_answering_while_a_request_is_parsed(monkeypatch):
    import threading
    import time
    from types import SimpleNamespace

    from agpctl.inference import serve_replica

    parsing = threading.Event()

    def slow_image_parts(*args):  # as a multipart body of many parts would be
        parsing.set()
        time.sleep(0.3)
        parsing.clear()
        return image_parts(*args)

    async def detect(item):
        return detection()

    monkeypatch.setattr(serve_replica, "image_parts", slow_image_parts)
    service = serve_replica.DetectorService.__new__(serve_replica.DetectorService)
    service.config, service._detect = ServeConfig(run="r"), detect
    content_type, body = encode_multipart([("a.png", png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)))])
    request = SimpleNamespace(query_params=SimpleNamespace(multi_items=lambda: []),
                              headers={"content-type": content_type}, stream=lambda: chunks(body))

    async def scenario():
        ticks_while_parsing = 0
        answer = asyncio.ensure_future(service._predict(request))
        while not answer.done():
            await asyncio.sleep(0.01)
            ticks_while_parsing += parsing.is_set()
        return ticks_while_parsing, answer.result()

    ticks, (status, answer) = asyncio.run(scenario())
    assert status == 200 and answer["predictions"][0]["name"] == "a.png"
    assert ticks >= 3
