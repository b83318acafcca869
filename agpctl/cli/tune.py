"""``agpctl tune``: Ray Tune sweeps over the training configuration."""

from __future__ import annotations

import click

from agpctl.cli.run_flags import config_from_options, run_options
from agpctl.console import console
from agpctl.strict_json import to_json
from tuning.space import load_space
from tuning.sweep import SweepSettings, run_sweep


@click.command()
@run_options
@click.option("--space", "space_path", help="search space YAML (local or s3://); default: tuning/spaces/<method>.yaml")
@click.option("--samples", type=int, default=8, show_default=True,
              help="trials (random search) or repetitions of the whole grid (grid search)")
@click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default="asha", show_default=True,
              help="asha stops weak trials early on the per-epoch objective")
@click.option("--search", type=click.Choice(["random", "grid"]), default="random", show_default=True)
@click.option("--max-concurrent", type=int, help="trials at a time (default: what the cluster holds; 1 on ≤4 CPUs)")
@click.option("--grace-period", type=int, default=1, show_default=True, help="ASHA: epochs before a trial may be stopped")
@click.option("--objective", type=click.Choice(["synthetic-val", "test"]), default="synthetic-val", show_default=True,
              help="synthetic-val: held-out normals + synthesised anomalies; test: the test split (leaks it; warned)")
@click.option("--resume", "resume_dir", help="continue an interrupted sweep: its directory or s3:// URI")
@click.option("--quiet", is_flag=True, help="no progress output")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def tune(space_path, samples, scheduler, search, max_concurrent, grace_period, objective, resume_dir, quiet, as_json,
         **options):
    """Hyper-parameter sweep: every trial is a full `agpctl train` run (Ray Tune; a trial with
    one worker trains inside the trial, with several on a Ray Train worker group).

    Every train flag is accepted and fixed for all trials; the search space varies only the
    config fields it names (dotted paths such as model.alpha_max). Writes results.json,
    results.csv and best.yaml (usable as `agpctl train --config best.yaml`) to the sweep folder.
    """
    cfg = config_from_options(options)
    if resume_dir:
        outcome = run_sweep(cfg, None, None, resume=resume_dir, console=console, quiet=quiet or as_json)
    else:
        space = load_space(cfg.method, space_path)
        settings = SweepSettings(samples=samples, scheduler=scheduler, search=search, max_concurrent=max_concurrent,
                                 objective=objective, grace_period=grace_period, seed=cfg.train.seed)
        outcome = run_sweep(cfg, space, settings, console=console, quiet=quiet or as_json)
    if as_json:
        click.echo(to_json({"sweep": outcome.sweep_uri, "best": outcome.best, "best_config": outcome.best_config_uri,
                            "trials": outcome.trials, "warnings": outcome.warnings,
                            "wall_seconds": outcome.wall_seconds}))
