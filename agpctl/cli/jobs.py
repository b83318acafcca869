"""``agpctl jobs list|logs|stop`` for runs submitted to a Ray cluster's Jobs API."""

from __future__ import annotations

import click
from rich.table import Table

from agpctl.cluster.jobs import client, follow_logs
from agpctl.console import console
from agpctl.errors import UserError

ADDRESS = click.option("--address", required=True, envvar="RAY_ADDRESS",
                       help="Ray Jobs address, e.g. http://head:8265 (or $RAY_ADDRESS)")


def follow_submitted(jobs_client, job_id: str, address: str, where: str) -> None:
    """Streams a submitted job's logs until it ends; Ctrl-C asks whether to stop it."""
    console.print(f"submitted job [bold]{job_id}[/] to {address}; results: [cyan]{where}[/]")
    try:
        status = follow_logs(jobs_client, job_id, lambda text: click.echo(text, nl=False))
    except KeyboardInterrupt:
        if click.confirm(f"\nstop job {job_id} on the cluster?", default=False):
            jobs_client.stop_job(job_id)
            console.print(f"job {job_id}: stop requested")
        else:
            console.print(f"job {job_id} keeps running; follow it with: agpctl jobs logs {job_id} --follow "
                          f"--address {address}")
        return
    if status != "SUCCEEDED":
        raise UserError(f"job {job_id} ended {status}; see: agpctl jobs logs {job_id} --address {address}")
    console.print(f"job {job_id} succeeded; results: [cyan]{where}[/]")


@click.group()
def jobs():
    """Training and predict jobs submitted to a remote Ray cluster."""


@jobs.command(name="list")
@ADDRESS
def list_jobs(address):
    """Jobs on the cluster, newest first."""
    table = Table()
    for column in ("job id", "status", "run", "entrypoint"):
        table.add_column(column)
    found = client(address).list_jobs()
    for job in sorted(found, key=lambda j: j.start_time or 0, reverse=True):
        table.add_row(job.submission_id or job.job_id or "?", str(getattr(job.status, "value", job.status)),
                      (job.metadata or {}).get("agp_run", ""), job.entrypoint)
    console.print(table)


@jobs.command()
@ADDRESS
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="keep streaming until the job ends")
def logs(address, job_id, follow):
    """Print a job's logs."""
    jobs_client = client(address)
    if follow:
        follow_logs(jobs_client, job_id, lambda text: click.echo(text, nl=False))
    else:
        click.echo(jobs_client.get_job_logs(job_id), nl=False)


@jobs.command()
@ADDRESS
@click.argument("job_id")
def stop(address, job_id):
    """Stop a running job."""
    stopped = client(address).stop_job(job_id)
    console.print(f"job {job_id}: {'stop requested' if stopped else 'was not running'}")
