"""``agpctl predict`` on Ray: ``--workers N`` tasks on the embedded Ray or a cluster (``--address``).

The driver lists the inputs and splits them into N contiguous shards; each Ray task loads the
run itself (from its directory or ``s3://``), scores its shard with the same loop as local
predict and writes the per-image files below ``--out``. The driver gathers the rows in input
order and writes ``predictions.csv`` / ``predictions.json`` once. On a remote cluster the
tasks read INPUT and the run and write ``--out`` from the cluster's machines, so those must be
``s3://`` URIs or paths every machine shares.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from agp_data import storage
from agpctl import runs
from agpctl.cluster.connect import address_kind, local_cpu_share, ray_session, use_assigned_cpus
from agpctl.cluster.events import drain, make_channel, send
from agpctl.config import auto_gpus_per_worker
from agpctl.errors import UserError, remote_error_line
from agpctl.inference.detection import check_category
from agpctl.inference.detector import Detector
from agpctl.inference.predict import (
    InputImage,
    PredictReport,
    discover_inputs,
    note_unreadable,
    predict_images,
    write_tables,
)
from agpctl.inference.thresholds import check_threshold_options, is_auto, resolve_thresholds
from agpctl.models import default_device
from agpctl.paths import absolute


def predict_shard(model_uri: str, items: list[InputImage], out: str, options: dict[str, Any], channel=None,
                  shard: int = 0) -> PredictReport:
    """One Ray task: load the run, predict ``items``, write their files (not the tables)."""
    storage.configure_s3(options.get("s3_endpoint"))
    use_assigned_cpus()
    device = default_device()

    def warn(text: str) -> None:
        send(channel, (shard, "warning", text))

    run = runs.load_run(model_uri, device, warn=warn)
    detector = Detector.from_run(run, category=options.get("category"), threshold=options["threshold"],
                                 pixel_threshold=options["pixel_threshold"], batch_size=options["batch_size"],
                                 device=device, warn=warn)
    return predict_images(
        detector, items, out, image_format=options["image_format"], write_images=options["write_images"],
        write_summary=False,
        on_progress=lambda done, total: send(channel, (shard, "progress", done)),
        on_skip=lambda path, error: send(channel, (shard, "skip", path, error)),
        model_info=run.info(),
    )


def shards(items: list[InputImage], count: int) -> list[list[InputImage]]:
    """``count`` contiguous, nearly equal shards (none empty), in input order."""
    count = max(1, min(count, len(items)))
    size, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def run_predict_on_ray(source: str, run_uri: str, out: str, *, address: str | None, workers: int,
                       gpus_per_worker: float | None = None, threshold: str = "auto",
                       pixel_threshold: float | None = None, recursive: bool = False, category: str | None = None,
                       batch_size: int | None = None, image_format: str = "png", write_images: bool = True,
                       on_start: Callable[[int], None] | None = None,
                       on_progress: Callable[[int, int], None] | None = None,
                       on_skip: Callable[[str, str], None] | None = None,
                       on_warning: Callable[[str], None] | None = None) -> PredictReport:
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    remote = address_kind(address) != "local"
    # The tasks run in directories of their own: local paths must be absolute to reach them.
    source, run_uri, out = absolute(source), absolute(run_uri), absolute(out)
    local_paths = [p for p in (source, run_uri, out) if not storage.is_s3(p)]
    # Through Ray Client the driver is here and the tasks are there (inside a Ray job both are there).
    if address_kind(address) == "client" and local_paths and on_warning is not None:
        on_warning(f"{', '.join(local_paths)}: the cluster's machines must see these paths too "
                   "(use s3:// URIs unless they share a file system with this one)")
    model_uri = runs.select_model_run(run_uri, category)
    _check_thresholds(model_uri, threshold, pixel_threshold)  # fail here, before any task starts
    check_category(category, runs.stored_categories(model_uri) or [], model_uri)
    unreadable: list[tuple[str, str]] = []
    inputs = discover_inputs(source, recursive, exclude=out, skipped=unreadable)
    if on_start is not None:
        on_start(len(inputs))
    options = {"threshold": threshold, "pixel_threshold": pixel_threshold, "batch_size": batch_size,
               "category": category, "image_format": image_format, "write_images": write_images,
               "s3_endpoint": storage.s3_endpoint()}
    started = time.perf_counter()
    parts = shards(inputs, workers)
    with ray_session(address) as ray:
        resources = ray.cluster_resources()
        gpus = gpus_per_worker if gpus_per_worker is not None else auto_gpus_per_worker(resources.get("GPU", 0))
        cpus = 1.0 if remote else local_cpu_share(resources.get("CPU", 1), len(parts))
        channel = make_channel()
        task = ray.remote(predict_shard).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
        refs = [task.remote(model_uri, part, out, options, channel, i) for i, part in enumerate(parts)]
        done_per_shard = [0] * len(parts)
        warned: set[str] = set()
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, timeout=0.5)
            for event in drain(channel):
                shard, kind = event[0], event[1]
                if kind == "progress":
                    done_per_shard[shard] = event[2]
                    if on_progress is not None:
                        on_progress(sum(done_per_shard), len(inputs))
                elif kind == "skip" and on_skip is not None:
                    on_skip(event[2], event[3])
                elif kind == "warning" and on_warning is not None and event[2] not in warned:
                    warned.add(event[2])
                    on_warning(event[2])
        try:
            reports: list[PredictReport] = ray.get(refs)
        except Exception as exc:
            raise UserError(f"predict failed on the cluster: {remote_error_line(exc)}") from None
    report = reports[0]  # shards() always yields at least one (possibly empty) shard
    for other in reports[1:]:
        report.rows.extend(other.rows)
        report.skipped.extend(other.skipped)
    report.seconds = time.perf_counter() - started
    report.model = {**report.model, "workers": len(parts)}
    note_unreadable(report, unreadable, on_skip)
    write_tables(report, out)
    return report


def _check_thresholds(model_uri: str, threshold: str, pixel_threshold: float | None) -> None:
    if not is_auto(threshold):
        check_threshold_options(threshold, pixel_threshold)
        return
    stored = runs.stored_thresholds(model_uri)
    if stored is not None:  # else the tasks read them from the checkpoint
        resolve_thresholds(stored, threshold, pixel_threshold)
