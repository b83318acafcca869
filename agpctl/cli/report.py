"""``agpctl report``: one self-contained HTML page about a trained run."""

from __future__ import annotations

import click
from rich.progress import Progress

from agp_data import storage
from agpctl.console import console, print_warning
from agpctl.inference.report import render_report, report_uri, write_report
from agpctl.inference.report_inputs import gather_report_inputs
from agpctl.strict_json import to_json
from agpctl.tables import metrics_table


@click.command()
@click.option("--run", "run_uri", required=True, help="run directory or s3:// URI written by agpctl train")
@click.option("--out", help="the HTML file to write (local or s3://); default: report.html in a local run, "
                            "required for an s3:// run")
@click.option("--from-maps", "maps_file", help="use the predictions saved by `agpctl eval --save-maps FILE.npz` "
                                               "instead of evaluating the run again")
@click.option("--examples", type=click.IntRange(0, 50), default=3, show_default=True,
              help="example images per group (false positives, false negatives, best detections) and category")
@click.option("--batch-size", type=click.IntRange(min=1), help="evaluation batch size")
@click.option("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
@click.option("--json", "as_json", is_flag=True, help="print where the report went and its metrics as JSON")
def report(run_uri, out, maps_file, examples, batch_size, s3_endpoint, as_json):
    """Write an HTML report of a run: configuration, metrics, curves, score histograms,
    learning curves and example panels, every picture embedded (opens offline)."""
    storage.configure_s3(s3_endpoint)
    out = report_uri(run_uri, out)
    storage.check_writable_file(out)  # before the evaluation, not after it
    if maps_file and batch_size is not None:
        print_warning("--batch-size has no effect with --from-maps: the model is not run")

    def loaded(run) -> None:
        if not as_json:
            console.print(f"evaluating epoch {run.checkpoint.epoch} ([cyan]{run.checkpoint.uri}[/])")

    with Progress(console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("reading saved maps" if maps_file else "evaluating", total=None)
        inputs = gather_report_inputs(run_uri, maps_file=maps_file, batch_size=batch_size,
                                      on_batch=lambda done, total: progress.update(task, completed=done, total=total),
                                      on_load=loaded, on_warning=print_warning)
        progress.update(task, description="building the report", completed=0, total=None)
        page = render_report(inputs, examples,
                             on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    size = write_report(page, out)
    if as_json:
        click.echo(to_json({"report": out, "bytes": size, "run": inputs.run_uri, "predictions": inputs.source,
                            "checkpoints": inputs.checkpoints, "metrics": inputs.table,
                            "thresholds": {name: vars(t) for name, t in inputs.thresholds.items()}}))
        return
    for note in inputs.notes:
        print_warning(note)
    console.print(metrics_table(inputs.table, title=f"{inputs.run_uri} · test split"))
    console.print(f"report written to [cyan]{out}[/] ({size / 1e6:.1f} MB)")
