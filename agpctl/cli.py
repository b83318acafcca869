"""The ``agpctl`` command line: one click group; each sub-command lives in its own module."""

from __future__ import annotations

import sys

import click

from agpctl import __version__
from agpctl.console import console, print_error
from agpctl.errors import user_error_types


class AgpGroup(click.Group):
    """Turns user mistakes anywhere below into one clear line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except user_error_types() as exc:
            print_error(str(exc))
            ctx.exit(2)


@click.group(cls=AgpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agpctl")
def cli() -> None:
    """agp: unsupervised industrial anomaly detection (AGPNet, OneNIP, RLR) on Ray."""


def _register_commands() -> None:
    from agpctl.data_cli import data
    from agpctl.train_cli import evaluate, train

    cli.add_command(data)
    cli.add_command(train)
    cli.add_command(evaluate)


_register_commands()


def main() -> None:
    cli(prog_name="agpctl")


if __name__ == "__main__":
    sys.exit(main())
