"""``agpctl train`` and ``agpctl eval``."""

from __future__ import annotations

import click
from rich.progress import Progress

from agp_data import storage
from agpctl.cli.jobs import follow_submitted
from agpctl.cli.run_flags import config_from_options, run_options
from agpctl.cluster.connect import address_kind
from agpctl.cluster.jobs import submit_training
from agpctl.console import console, print_warning
from agpctl.inference.evaluate import evaluate_run, merge_predictions
from agpctl.strict_json import to_json
from agpctl.tables import metrics_table
from agpctl.training.launch import launch_training


@click.command()
@run_options
@click.option("--resume", help="continue a run from its last checkpoint: run directory or s3:// URI")
@click.option("--quiet", is_flag=True, help="no progress output")
@click.option("--json", "as_json", is_flag=True, help="print the final metrics as JSON")
def train(resume, quiet, as_json, **options):
    """Train a model as a Ray Train job, then evaluate it on the test split."""
    cfg = config_from_options(options)
    if address_kind(cfg.cluster.address) == "jobs":
        _submit_and_follow(cfg, resume)
        return
    outcome = launch_training(cfg, resume=resume, console=console, quiet=quiet or as_json)
    if as_json:
        click.echo(to_json(outcome))


def _submit_and_follow(cfg, resume) -> None:
    """Ray Jobs: submit agpctl itself, stream its logs; Ctrl-C offers to stop the job."""
    jobs, job_id, where = submit_training(cfg, cfg.cluster.address, resume)
    follow_submitted(jobs, job_id, cfg.cluster.address, where)


@click.command(name="eval")
@click.option("--run", "run_uri", required=True, help="run directory or s3:// URI written by agpctl train")
@click.option("--dataset", help="evaluate on another dataset layout (default: the run's)")
@click.option("--root", help="evaluate on another dataset root (default: the run's)")
@click.option("--batch-size", type=int, help="evaluation batch size")
@click.option("--save-maps", help="write raw maps, scores, masks and labels to this .npz (local or s3://)")
@click.option("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
@click.option("--json", "as_json", is_flag=True, help="print metrics as JSON")
def evaluate(run_uri, dataset, root, batch_size, save_maps, s3_endpoint, as_json):
    """Reload a run and recompute its metrics table on a test split."""
    storage.configure_s3(s3_endpoint)
    if save_maps:
        storage.check_writable_file(save_maps)  # before the evaluation, not after it
    checkpoints: list[dict] = []

    def loaded(run) -> None:
        checkpoints.append({"checkpoint": run.checkpoint.uri, "epoch": run.checkpoint.epoch})
        if not as_json:
            console.print(f"evaluating epoch {run.checkpoint.epoch} ([cyan]{run.checkpoint.uri}[/])")

    with Progress(console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("evaluating", total=None)
        table, predictions = evaluate_run(run_uri, dataset=dataset, root=root, batch_size=batch_size,
                                          on_batch=lambda done, total: progress.update(task, completed=done, total=total),
                                          on_load=loaded, on_warning=print_warning)
    if save_maps:
        merge_predictions(predictions).save_npz(save_maps)
    if as_json:
        click.echo(to_json({"run": run_uri, "checkpoints": checkpoints, "metrics": table}))
        return
    console.print(metrics_table(table, title=f"{run_uri} · test split"))
    if save_maps:
        console.print(f"raw maps written to [cyan]{save_maps}[/]")
