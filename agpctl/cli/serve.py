"""``agpctl serve``: a trained run as an HTTP service on Ray Serve."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape

from agp_data import storage
from agpctl.cli.jobs import follow_submitted
from agpctl.cluster.connect import address_kind
from agpctl.cluster.jobs import submit_command
from agpctl.console import console, print_warning
from agpctl.inference.serve_http import MB, ServeLimits
from agpctl.inference.serve_options import ServeConfig
from agpctl.inference.serving import serve_forever

DEFAULTS = ServeConfig(run="")
LIMITS = ServeLimits()


@click.command()
@click.option("--run", "run_uri", required=True, help="run directory or s3:// URI written by agpctl train")
@click.option("--category", help="a per-category run's model; for a multi-class run, every image's category")
@click.option("--threshold", default="auto", show_default=True,
              help="'auto' (calibrated on held-out normal training images) or an image-score value")
@click.option("--pixel-threshold", type=float, help="defect-mask threshold (default: --threshold's value, or auto)")
@click.option("--address", help="ray://host:10001, host:port or auto (Serve on that cluster), http://host:8265 "
                                 "(submitted as a Ray job); default: embedded local Ray")
@click.option("--host", default=DEFAULTS.host, show_default=True,
              help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", type=int, default=DEFAULTS.port, show_default=True)
@click.option("--replicas", type=int, help="a fixed number of replicas (default 1)")
@click.option("--min-replicas", type=int, help="autoscaling: fewest replicas (default 1)")
@click.option("--max-replicas", type=int, help="autoscaling: most replicas")
@click.option("--gpus-per-replica", type=float,
              help="GPUs per replica (default: the cluster's GPUs shared by the most replicas, at most 1 each)")
@click.option("--cpus-per-replica", type=float,
              help="CPUs per replica, also its torch threads (default: the embedded Ray's CPUs shared by the "
                   "replicas; 1 on a cluster)")
@click.option("--max-batch-size", type=int, default=DEFAULTS.max_batch_size, show_default=True,
              help="images per model call, gathered from concurrent requests")
@click.option("--batch-wait-ms", type=float, default=DEFAULTS.batch_wait_ms, show_default=True,
              help="how long a batch waits to fill")
@click.option("--max-image-bytes", type=int, default=LIMITS.max_image_bytes, show_default=True,
              help="largest encoded image accepted (larger: 413)")
@click.option("--max-request-bytes", type=int, default=LIMITS.max_request_bytes, show_default=True,
              help="largest request body accepted (larger: 413)")
@click.option("--max-image-pixels", type=int, default=LIMITS.max_image_pixels, show_default=True,
              help="most pixels (width x height) of one image (more: 413; stops decompression bombs)")
@click.option("--max-request-pixels", type=int, default=LIMITS.max_request_pixels, show_default=True,
              help="most pixels of all images of one request together (more: 413)")
@click.option("--max-images-per-request", type=int, default=LIMITS.max_images, show_default=True,
              help="most images in one multipart request")
@click.option("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
def serve(run_uri, category, threshold, pixel_threshold, address, host, port, replicas, min_replicas, max_replicas,
          gpus_per_replica, cpus_per_replica, max_batch_size, batch_wait_ms, max_image_bytes, max_request_bytes,
          max_image_pixels, max_request_pixels, max_images_per_request, s3_endpoint):
    """Serve a trained run over HTTP until Ctrl-C (or SIGTERM).

    POST /predict with an image (raw bytes) or several (multipart/form-data) answers one JSON
    decision per image: score, decision, category, thresholds; ?heatmap=1 and ?mask=1 add
    them as base64 PNG. GET /health and GET /info (model, method, thresholds). Concurrent
    requests are scored in batches; bad requests get a 4xx JSON error.
    """
    storage.configure_s3(s3_endpoint)
    config = ServeConfig(
        run=run_uri, category=category, threshold=threshold, pixel_threshold=pixel_threshold, address=address,
        host=host, port=port, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
        gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, s3_endpoint=s3_endpoint,
        limits=ServeLimits(max_image_bytes=max_image_bytes, max_request_bytes=max_request_bytes,
                           max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
                           max_images=max_images_per_request),
    )
    if address_kind(address) == "jobs":
        config.check()
        _submit_serve_job(config)
        return
    serve_forever(config, on_ready=_print_ready, on_warning=print_warning)
    console.print("stopped: the service and its replicas are shut down")


def _print_ready(url: str, info: dict[str, Any]) -> None:
    model = info["model"]
    default = info["thresholds"]
    categories = ", ".join(model["categories"]) or "not recorded"
    console.print(f"serving [cyan]{escape(model['run'])}[/] ({escape(model['method'])}, epoch {model['epoch']}, "
                  f"{model['image_size']} px, categories {escape(categories)}) on {escape(model['device'])}")
    console.print(f"thresholds: image {default['image']:.6g}, pixel {default['pixel']:.6g} "
                  f"({escape(default['source'])}); {len(info['category_thresholds'])} categories with their own")
    batching, limits, replicas = info["batching"], info["limits"], info["replicas"]
    count = str(replicas["min"]) if replicas["min"] == replicas["max"] else f"{replicas['min']}-{replicas['max']} (autoscaled)"
    console.print(f"{count} replica(s), each {replicas['cpus_each']:g} CPUs and {replicas['gpus_each']:g} GPUs; "
                  f"batches of up to {batching['max_batch_size']} images ({batching['batch_wait_ms']:g} ms wait); "
                  f"limits: {limits['max_image_bytes'] / MB:g} MB and {limits['max_image_pixels'] / 1e6:g} MP per "
                  f"image, {limits['max_images']} images, {limits['max_request_bytes'] / MB:g} MB and "
                  f"{limits['max_request_pixels'] / 1e6:g} MP per request")
    console.print(f"[bold green]ready[/] at [bold]{url}[/]: POST {url}/predict (?heatmap=1&mask=1&category=NAME), "
                  f"GET {url}/health, GET {url}/info; Ctrl-C to stop")


def _submit_serve_job(config: ServeConfig) -> None:
    """Ray Jobs: the service runs on the cluster (from paths as the cluster sees them) until the job is stopped."""
    limits = config.limits
    args = ["serve", "--run", config.run, "--address", "auto", "--threshold", str(config.threshold),
            "--host", config.host, "--port", str(config.port), "--max-batch-size", str(config.max_batch_size),
            "--batch-wait-ms", str(config.batch_wait_ms), "--max-image-bytes", str(limits.max_image_bytes),
            "--max-request-bytes", str(limits.max_request_bytes), "--max-image-pixels", str(limits.max_image_pixels),
            "--max-request-pixels", str(limits.max_request_pixels), "--max-images-per-request", str(limits.max_images)]
    for flag, value in (("--category", config.category), ("--pixel-threshold", config.pixel_threshold),
                        ("--replicas", config.replicas), ("--min-replicas", config.min_replicas),
                        ("--max-replicas", config.max_replicas), ("--gpus-per-replica", config.gpus_per_replica),
                        ("--cpus-per-replica", config.cpus_per_replica), ("--s3-endpoint", config.s3_endpoint)):
        if value is not None:
            args += [flag, str(value)]
    if config.host in ("127.0.0.1", "localhost"):
        print_warning(f"--host {config.host}: the service is reachable only on the cluster's own machines; "
                      "pass --host 0.0.0.0 to reach it from elsewhere")
    jobs, job_id = submit_command(config.address, args, metadata={"agp_run": f"serve {config.run}"})
    follow_submitted(jobs, job_id, config.address, f"port {config.port} of the cluster's nodes")
