"""``agpctl predict`` and ``agpctl export``."""

from __future__ import annotations

import contextlib

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from agp_data import storage
from agpctl.cluster.connect import address_kind
from agpctl.console import console, print_warning
from agpctl.errors import UserError
from agpctl.inference.predict import run_predict, run_predict_model
from agpctl.inference.thresholds import check_threshold_options
from agpctl.strict_json import to_json

# Modules that load torch (a run's model, Ray jobs, export) are imported inside the commands
# that need them: ``agpctl predict --model model.onnx`` runs where torch is not installed.


@click.command()
@click.argument("source", metavar="INPUT")
@click.option("--run", "run_uri", help="run directory or s3:// URI written by agpctl train")
@click.option("--model", "model_uri", help="an ONNX file written by agpctl export --format onnx (with its .json "
                                           "beside it), in place of --run: runs with onnxruntime, no torch needed")
@click.option("--out", required=True, help="output folder or s3://bucket/prefix")
@click.option("--threshold", default="auto", show_default=True,
              help="'auto' (calibrated on held-out normal training images) or an image-score value")
@click.option("--pixel-threshold", type=float, help="defect-mask threshold (default: --threshold's value, or auto)")
@click.option("--category", help="the images' category: a per-category run's model, or for a multi-class run "
                                  "whose thresholds decide (default: from the path, else the most similar)")
@click.option("--recursive", is_flag=True, help="include sub-folders (and ** in globs)")
@click.option("--batch-size", type=int, help="images per model call (default: the run's eval batch size)")
@click.option("--format", "image_format", type=click.Choice(["png", "jpg"]), default="png", show_default=True,
              help="heatmap and overlay file format (masks are always PNG)")
@click.option("--no-images", is_flag=True, help="write only predictions.csv / predictions.json")
@click.option("--top", type=int, default=5, show_default=True, help="most anomalous images listed in the summary")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Ray tasks sharing the images (more than 1, or --address, runs predict on Ray)")
@click.option("--gpus-per-worker", type=float, help="GPUs per Ray task (default: 1 when the cluster has GPUs)")
@click.option("--address", help="ray://host:10001 (tasks on the cluster), http://host:8265 (submitted as a Ray job) "
                                 "or auto; INPUT, --run and --out must then be s3:// or shared paths")
@click.option("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def predict(source, run_uri, model_uri, out, threshold, pixel_threshold, category, recursive, batch_size, image_format,
            no_images, top, workers, gpus_per_worker, address, s3_endpoint, as_json):
    """Score images with a trained run: CSV/JSON of scores plus heatmaps, overlays and masks.

    INPUT is an image, a folder, a glob ("parts/*.png") or an s3:// prefix. Unreadable files
    are reported and skipped. By default runs in this process (GPU when present); --workers N
    shares the images among N Ray tasks, --address runs them on a Ray cluster. --model
    MODEL.onnx scores with an exported model instead of a run, in this process.
    """
    if (run_uri is None) == (model_uri is None):
        raise UserError("give either --run RUN_DIR (a trained run) or --model MODEL.onnx (an exported model)")
    if model_uri is not None and (workers > 1 or address or gpus_per_worker is not None):
        raise UserError("--model runs in this process: drop --workers/--address/--gpus-per-worker, "
                        "or use --run with the run to predict on Ray")
    if workers < 1:
        raise UserError("--workers must be at least 1")
    storage.configure_s3(s3_endpoint)
    check_threshold_options(threshold, pixel_threshold)
    if address_kind(address) != "jobs":  # a job's paths are the cluster's to check
        storage.check_writable_dir(out)
    if address_kind(address) == "jobs":
        _submit_predict_job(address, source, run_uri, out, threshold, pixel_threshold, category, recursive, batch_size,
                            image_format, no_images, top, workers, gpus_per_worker)
        return
    progress = Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, transient=True, disable=as_json)
    common = dict(
        threshold=threshold, pixel_threshold=pixel_threshold, recursive=recursive, category=category,
        batch_size=batch_size, image_format=image_format, write_images=not no_images,
        on_skip=lambda path, error: None if as_json else print_warning(f"skipped {error}"),
    )
    with progress:
        task = progress.add_task("predict", total=None)
        hooks = dict(on_start=lambda total: progress.update(task, total=total),
                     on_progress=lambda done, total: progress.update(task, completed=done))
        if model_uri is not None:
            report = run_predict_model(source, model_uri, out, on_warning=print_warning, **common, **hooks)
        elif workers > 1 or address:
            from agpctl.inference.predict_ray import run_predict_on_ray

            report = run_predict_on_ray(source, run_uri, out, address=address, workers=workers,
                                        gpus_per_worker=gpus_per_worker, on_warning=print_warning, **common, **hooks)
        else:
            report = run_predict(source, run_uri, out, on_warning=print_warning, **common, **hooks)
    if as_json:
        summary = report.as_dict()
        summary.pop("predictions")
        summary["top"] = report.top(top)
        click.echo(to_json(summary))
        return
    _print_summary(report, top)


def _submit_predict_job(address, source, run_uri, out, threshold, pixel_threshold, category, recursive, batch_size,
                        image_format, no_images, top, workers, gpus_per_worker) -> None:
    """Ray Jobs: the whole predict runs on the cluster, from the paths as the cluster sees them."""
    from agpctl.cli.jobs import follow_submitted
    from agpctl.cluster.jobs import submit_command

    args = ["predict", source, "--run", run_uri, "--out", out, "--threshold", str(threshold), "--address", "auto",
            "--workers", str(workers), "--format", image_format, "--top", str(top)]
    for flag, value in (("--pixel-threshold", pixel_threshold), ("--category", category),
                        ("--batch-size", batch_size), ("--gpus-per-worker", gpus_per_worker)):
        if value is not None:
            args += [flag, str(value)]
    args += ["--recursive"] * bool(recursive) + ["--no-images"] * bool(no_images)
    jobs, job_id = submit_command(address, args, metadata={"agp_run": f"predict {run_uri}"})
    follow_submitted(jobs, job_id, address, out)


def _print_summary(report, top: int) -> None:
    t = report.thresholds
    console.print(f"[bold]{len(report.rows)}[/] images scored in {report.seconds:.1f}s · "
                  f"[bold red]{report.anomalous} anomalous[/] · {len(report.rows) - report.anomalous} normal · "
                  f"{len(report.skipped)} skipped")
    console.print(f"threshold: image {t.image:.6g}, pixel {t.pixel:.6g} ({escape(t.source)})")
    if report.category_thresholds:
        own = "; ".join(f"{escape(name)} image {c.image:.6g}, pixel {c.pixel:.6g}"
                        for name, c in report.category_thresholds.items())
        console.print(f"per-category thresholds (the one above decides other images): {own}")
    if report.rows and top > 0:
        table = Table(title=f"top {min(top, len(report.rows))} most anomalous")
        for column in ("path", "category", "score", "anomalous", "defect px"):
            table.add_column(column, justify="right" if column not in ("path", "category") else "left")
        for row in report.top(top):
            category = f"{row['category'] or '?'} ({row['category_source']})"
            table.add_row(escape(row["path"]), escape(category), f"{row['score']:.4g}", row["anomalous"],
                          str(row["defect_area_px"]))
        console.print(table)
    if report.skipped:
        console.print(f"[yellow]skipped {len(report.skipped)} unreadable file(s):[/]")
        for item in report.skipped:
            console.print(f"  {escape(item['path'])}")
    console.print(f"results: [cyan]{escape(report.out)}[/] (predictions.csv, predictions.json"
                  f"{', heatmaps/, overlays/, masks/' if any(r['heatmap'] for r in report.rows) else ''})")


@click.command()
@click.option("--run", "run_uri", required=True, help="run directory or s3:// URI written by agpctl train")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), required=True)
@click.option("--out", required=True, help="model file to write (local or s3://)")
@click.option("--image-size", type=int, help="input side S (default: the run's image size; else resized inside)")
@click.option("--category", help="per-category runs: which category's model to export")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (>= 17)")
@click.option("--batch-size", type=int,
              help="ONNX: fix the batch size (default: dynamic when the method allows, else 1)")
@click.option("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def export(run_uri, fmt, out, image_size, category, opset, batch_size, s3_endpoint, as_json):
    """Export a run as one self-contained model file and verify it against PyTorch.

    Input: float32 RGB in [0, 1], shape (B, 3, S, S) (normalisation is inside). Outputs: the
    anomaly map (B, S, S) and the image score (B,). The run's thresholds are stored in the
    file's metadata. ONNX: OUT.json beside it holds what inference needs besides the graph
    (input size, map resizing, thresholds per category, category prototypes), for
    agpctl predict --model OUT and agpctl.api.load(OUT) without torch.
    """
    from agpctl.inference.export import export_run

    storage.configure_s3(s3_endpoint)
    storage.check_writable_file(out)
    with console.status(f"exporting to {fmt}", spinner="dots") if not as_json else contextlib.nullcontext():
        result = export_run(run_uri, out, fmt, image_size=image_size, category=category, opset=opset,
                            batch_size=batch_size, on_warning=print_warning)
    if as_json:
        click.echo(to_json(result.as_dict()))
        return
    batch = "any batch size" if result.batch_size is None else f"fixed batch size {result.batch_size}"
    console.print(f"wrote [cyan]{result.path}[/] ({result.format}, {result.method}, {result.bytes / 1e6:.1f} MB, "
                  f"input (B,3,{result.image_size},{result.image_size}) RGB in [0,1], {batch})")
    console.print(f"verified on {result.verified_images} images (batch sizes {result.verified_batch_sizes}): "
                  f"max abs diff map {result.map_max_abs_diff:.3g}, score {result.score_max_abs_diff:.3g} "
                  f"(tolerance {result.tolerance:.3g})")
    if result.sidecar:
        console.print(f"inference settings: [cyan]{result.sidecar}[/] (keep it beside the model; "
                      f"agpctl predict --model {result.path} runs both without torch)")

