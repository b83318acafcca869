"""The ``agpctl`` command line: one click group; each command group lives in its own module
(``train`` + ``eval``, ``predict`` + ``export``, ``data``, ``tune``, ``jobs``, ``report``, ``serve``; ``run_flags`` is
the table of training flags shared by ``train`` and ``tune``)."""

from __future__ import annotations

import importlib

import click

from agpctl import __version__
from agpctl.console import print_error
from agpctl.console import print_warning
from agpctl.errors import Interrupted, UserError, first_line, user_error_types


# Sub-commands are imported only when used, so `agpctl data ...` does not load torch.
LAZY_COMMANDS = {
    "data": "agpctl.cli.data:data",
    "train": "agpctl.cli.train:train",
    "eval": "agpctl.cli.train:evaluate",
    "jobs": "agpctl.cli.jobs:jobs",
    "predict": "agpctl.cli.predict:predict",
    "export": "agpctl.cli.predict:export",
    "tune": "agpctl.cli.tune:tune",
    "report": "agpctl.cli.report:report",
    "serve": "agpctl.cli.serve:serve",
}


OWN_PACKAGES = ("agpctl", "agp_data", "agp_models", "tuning")
PACKAGE_NAMES = {"torch": "PyTorch", "torchvision": "PyTorch", "timm": "timm", "ray": "Ray"}


def unavailable_command(name: str, error: ImportError) -> click.Command:
    """Stands in for command ``name`` whose module cannot be imported (a package agp needs is
    not installed): listed by --help with what it needs; run, one line and exit code 2."""
    missing = (error.name or "").split(".")[0] if isinstance(error, ModuleNotFoundError) else ""
    if missing:
        needs = f"needs {PACKAGE_NAMES.get(missing, missing)}: pip install agp (with its dependencies)"
    else:
        needs = f"cannot be loaded ({first_line(error)}): pip install agp (with its dependencies)"

    def refuse(args: tuple[str, ...]) -> None:
        raise UserError(f"agpctl {name} {needs}")

    return click.Command(name, callback=refuse, help=needs, short_help=needs,
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
                         context_settings={"ignore_unknown_options": True})


class AgpGroup(click.Group):
    """Turns user mistakes anywhere below into one clear line and exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str):
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                command = getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                # A slim install (e.g. ONNX models without torch) still lists every command and
                # runs those it can; a missing part of agp itself is a bug and is raised.
                if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in OWN_PACKAGES:
                    raise
                command = unavailable_command(name, exc)
            self.add_command(command, name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except user_error_types() as exc:
            print_error(str(exc))
            ctx.exit(2)
        except Interrupted as exc:
            print_warning(str(exc))
            ctx.exit(exc.exit_code)


@click.group(cls=AgpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agpctl")
def cli() -> None:
    """agp: unsupervised industrial anomaly detection (AGPNet, OneNIP, RLR) on Ray."""


def main() -> None:
    cli(prog_name="agpctl")
