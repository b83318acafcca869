"""Requests/s and latency (p50 / p99) of ``agpctl serve`` at several client concurrencies,
next to the model-only rate of ``agpctl predict``'s model on the same run and images.

Starts ``agpctl serve --run RUN`` on a free port of 127.0.0.1 (embedded Ray), sends each image
as one ``POST /predict`` (raw JPEG bytes) from N client threads with keep-alive connections,
then stops the server with SIGTERM. Model-only rates are measured in this process, before and after the server runs (the better counts):
``model.predict`` on tensors already in memory, and ``Detector.predict`` on decoded images
(what a replica runs per batch: resize, model, maps at full size, category, thresholds).

    .venv/bin/python benchmarks/serve_speed.py --run runs/<run> [--images 32] [--size 512x384]
        [--requests 96] [--concurrency 1,8,32] [--max-batch-size 16] [--replicas 1] [--threads N]
"""

from __future__ import annotations

import agp_models  # noqa: F401 - before timm (torchvision compatibility step)

import argparse
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

from agpctl.api import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run directory")
    parser.add_argument("--images", type=int, default=32, help="distinct images sent round-robin")
    parser.add_argument("--size", default="512x384", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level (at least 4 per client)")
    parser.add_argument("--concurrency", default="1,8,32", help="client threads, comma-separated")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--threads", type=int,
                        help="torch threads here and CPUs (so threads) per replica; default: each side's own default "
                             "(on a busy shared machine 1 is fairer: idle threads spin)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(args.images)]
    jpegs = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    decoded = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs]

    detector = load(args.run, batch_size=args.max_batch_size)
    info = f"{detector.model.name}, input {detector.size}px, device {detector.device}, torch threads " \
           f"{torch.get_num_threads()}, {os.cpu_count()} CPUs"
    before = model_rates(detector, decoded, args.max_batch_size)

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as logs:
        server, port = start_server(args, logs)
        try:
            results = {c: measure(port, jpegs, c, max(args.requests, 4 * c)) for c in levels}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    # Again once the server is gone: on a shared machine the better of the two is the model's rate.
    after = model_rates(detector, decoded, args.max_batch_size)
    model_only, detector_rate = max(before[0], after[0]), max(before[1], after[1])

    print(f"model: {args.run} ({info})")
    print(f"images: {args.images} JPEG {width}x{height} ({np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB each); "
          f"serve: {args.replicas} replica(s), batches of up to {args.max_batch_size}, {args.batch_wait_ms:g} ms wait")
    print(f"{'model only (tensors in memory, batch ' + str(args.max_batch_size) + ')':52s} {model_only:8.1f} images/s")
    print(f"{'Detector.predict on decoded images (predict path)':52s} {detector_rate:8.1f} images/s")
    for concurrency, (rate, p50, p99, count) in results.items():
        label = f"agpctl serve, {concurrency} client(s), {count} requests"
        print(f"{label:52s} {rate:8.1f} requests/s   p50 {p50 * 1e3:7.1f} ms   p99 {p99 * 1e3:7.1f} ms")


def model_rates(detector, decoded: list[np.ndarray], batch_size: int) -> tuple[float, float]:
    """(model-only images/s, Detector.predict images/s), each the best of three passes (the machine is shared)."""
    size = detector.size
    batches = [torch.rand(min(batch_size, len(decoded) - i), 3, size, size, device=detector.device)
               for i in range(0, len(decoded), batch_size)]

    def model_pass() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                detector.model.predict(batch)
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        return len(decoded) / (time.perf_counter() - start)

    def detector_pass() -> float:
        start = time.perf_counter()
        detector.predict(decoded)
        return len(decoded) / (time.perf_counter() - start)

    model_pass()  # warm-up (allocator, kernels)
    return max(model_pass() for _ in range(3)), max(detector_pass() for _ in range(3))


def start_server(args, logs: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out_path, err_path = os.path.join(logs, "out.txt"), os.path.join(logs, "err.txt")
    command = [sys.executable, "-m", "agpctl.cli", "serve", "--run", args.run, "--port", str(port),
               "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
               "--replicas", str(args.replicas), *(["--cpus-per-replica", str(args.threads)] if args.threads else [])]
    with open(out_path, "w") as out, open(err_path, "w") as err:
        server = subprocess.Popen(command, stdout=out, stderr=err)
    deadline = time.monotonic() + 300
    while "ready at" not in open(out_path).read():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            sys.exit(f"agpctl serve did not start: {open(err_path).read()[-2000:]}")
        time.sleep(0.5)
    return server, port


def measure(port: int, jpegs: list[bytes], concurrency: int, total: int) -> tuple[float, float, float, int]:
    """(requests/s, p50 s, p99 s, requests) of ``total`` requests from ``concurrency`` threads."""
    # Warm-up: every client's connection and the replica's first batches.
    run_clients(port, jpegs, concurrency, concurrency)
    latencies, seconds = run_clients(port, jpegs, concurrency, total)
    return total / seconds, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), total


def run_clients(port: int, jpegs: list[bytes], concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(total))
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        start.wait()
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            began = time.perf_counter()
            connection.request("POST", "/predict", body=jpegs[index % len(jpegs)],
                               headers={"Content-Type": "image/jpeg"})
            answer = connection.getresponse()
            body = answer.read()
            elapsed = time.perf_counter() - began
            with lock:
                latencies.append(elapsed)
                if answer.status != 200:
                    failures.append(f"{answer.status}: {json.loads(body).get('error')}")
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if failures:
        sys.exit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return latencies, seconds


if __name__ == "__main__":
    main()
