"""The ``agpctl`` command line: one click group; each sub-command lives in its own module."""

from __future__ import annotations

import importlib
import sys

import click

from agpctl import __version__
from agpctl.console import console, print_error
from agpctl.errors import user_error_types


# Sub-commands are imported only when used, so `agpctl data ...` does not load torch.
LAZY_COMMANDS = {
    "data": "agpctl.data_cli:data",
    "train": "agpctl.train_cli:train",
    "eval": "agpctl.train_cli:evaluate",
    "jobs": "agpctl.jobs_cli:jobs",
    "predict": "agpctl.predict_cli:predict",
    "export": "agpctl.predict_cli:export",
    "tune": "agpctl.tune_cli:tune",
}


class AgpGroup(click.Group):
    """Turns user mistakes anywhere below into one clear line and exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str):
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attr = LAZY_COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

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


def main() -> None:
    cli(prog_name="agpctl")


if __name__ == "__main__":
    sys.exit(main())
