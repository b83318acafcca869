"""``agpctl data``: generate the built-in dataset, inspect a dataset, download official ones."""

from __future__ import annotations

import json

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agp_data.download import SOURCES, download
from agp_data.generate import CATEGORIES, timed_generate
from agp_data.inspect import inspect_dataset
from agp_data.layouts import DATASETS, FolderLayout
from agp_data.storage import check_writable_dir, configure_s3
from agpctl.console import console, print_warning
from agpctl.errors import UserError

_MAX_PROBLEMS_SHOWN = 50


def _apply_s3_endpoint(endpoint: str | None) -> None:
    if endpoint:
        configure_s3(endpoint)


s3_endpoint_option = click.option(
    "--s3-endpoint",
    metavar="URL",
    default=None,
    help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS_ENDPOINT_URL or AWS).",
)


@click.group("data")
def data() -> None:
    """Datasets: generate the built-in one, inspect a layout, download official archives."""


@data.command("generate")
@click.option(
    "--out",
    required=True,
    metavar="DIR",
    help="Directory (or s3:// URI) to write the dataset to: new, empty, or one this command wrote before.",
)
@click.option("--categories", default=3, show_default=True, type=int, help="Number of categories (1-5).")
@click.option("--train", default=40, show_default=True, type=int, help="Normal training images per category.")
@click.option(
    "--test", default=20, show_default=True, type=int, help="Test images per category (half defective)."
)
@click.option("--size", default=128, show_default=True, type=int, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same bytes).")
@s3_endpoint_option
def generate_command(
    out: str, categories: int, train: int, test: int, size: int, seed: int, s3_endpoint: str | None
) -> None:
    """Write a procedurally generated MVTec-AD-layout dataset (textures and parts with defects).

    A local dataset this command wrote to --out before is replaced as a whole. If that folder
    also holds files it did not write (or is any other non-empty folder), the command refuses
    and changes nothing: pass another --out or move those files away. On s3:// the files are
    written over and nothing is deleted.
    """
    _apply_s3_endpoint(s3_endpoint)
    with Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("generate", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        path, seconds, count = timed_generate(
            out, categories=categories, train=train, test=test, size=size, seed=seed, progress=report
        )
    names = ", ".join(CATEGORIES[:categories])
    console.print(
        f"wrote {count} images ({categories} categories: {escape(names)}; {train} train + {test} test each, "
        f"{size}x{size}) to {escape(path)} in {seconds:.1f}s"
    )
    console.print(f"inspect it with: agpctl data inspect --dataset synthetic --root {escape(path)}")


def _parse_categories(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    return names or None


@data.command("inspect")
@click.option("--dataset", "dataset_name", required=True, type=click.Choice(DATASETS), help="Dataset layout.")
@click.option("--root", default=None, metavar="DIR|s3://…", help="Dataset root (local or s3://bucket/path).")
@click.option("--categories", default=None, metavar="a,b", help="Only these categories (comma-separated).")
@click.option("--normal-dir", default=None, metavar="DIR", help="folder layout: defect-free images.")
@click.option("--abnormal-dir", default=None, metavar="DIR", help="folder layout: defective images.")
@click.option("--mask-dir", default=None, metavar="DIR", help="folder layout: masks, matched by file stem.")
@click.option(
    "--test-fraction",
    default=0.2,
    show_default=True,
    type=float,
    help="folder layout: share of normal images held out for test.",
)
@s3_endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON only.")
def inspect_command(
    dataset_name: str,
    root: str | None,
    categories: str | None,
    normal_dir: str | None,
    abnormal_dir: str | None,
    mask_dir: str | None,
    test_fraction: float,
    s3_endpoint: str | None,
    as_json: bool,
) -> None:
    """Count images and masks per category, decode every image and mask (a few per category on
    s3://), check sizes, and list problems with their paths."""
    _apply_s3_endpoint(s3_endpoint)
    folder = None
    if dataset_name == "folder":
        if not normal_dir:
            raise UserError(
                "--dataset folder needs --normal-dir DIR (and optionally --abnormal-dir, --mask-dir)"
            )
        folder = FolderLayout(normal_dir, abnormal_dir, mask_dir, test_fraction)
    elif normal_dir or abnormal_dir or mask_dir:
        raise UserError("--normal-dir/--abnormal-dir/--mask-dir only apply to --dataset folder")
    elif root is None and dataset_name != "synthetic":
        raise UserError(f"--dataset {dataset_name} needs --root DIR or s3://bucket/path")

    report = inspect_dataset(dataset_name, root, categories=_parse_categories(categories), folder=folder)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print_report(report)


def _size_text(category) -> str:
    if category.min_size is None:
        return "-"
    text = category.min_size
    if category.max_size != category.min_size:
        text = f"{category.min_size}…{category.max_size} ({category.distinct_sizes} sizes)"
    if category.sizes_checked < category.total:
        text += f" [dim]{category.sizes_checked} checked[/]"
    return text


def _print_report(report) -> None:
    table = Table(title=f"{report.dataset} dataset at {escape(str(report.root))}", title_justify="left")
    table.add_column("category")
    for column in ("train", "test good", "test defect", "masks ok/missing"):
        table.add_column(column, justify="right")
    table.add_column("image size")
    for category in report.categories:
        missing = f"[red]{category.masks_missing}[/]" if category.masks_missing else "0"
        table.add_row(
            escape(category.name),
            str(category.train_good),
            str(category.test_good),
            str(category.test_defect),
            f"{category.masks_found}/{missing}",
            _size_text(category),
        )
    totals = report.to_dict()["totals"]
    if len(report.categories) > 1:
        table.add_section()
        table.add_row(
            "all",
            str(totals["train_good"]),
            str(totals["test_good"]),
            str(totals["test_defect"]),
            f"{totals['masks_found']}/{totals['masks_missing']}",
            "",
        )
    console.print(table)
    for category in report.categories:
        if category.defect_types:
            types = ", ".join(f"{name} {count}" for name, count in category.defect_types.items())
            console.print(f"  {escape(category.name)} defects: {escape(types)}", soft_wrap=True)
    if report.ok:
        console.print("[green]no problems found[/]")
        return
    print_warning(f"{len(report.problems)} problem(s):")
    for problem in report.problems[:_MAX_PROBLEMS_SHOWN]:
        console.print(
            f"  [yellow]{problem.kind}[/] {escape(problem.path)}: {escape(problem.detail)}", soft_wrap=True
        )
    if len(report.problems) > _MAX_PROBLEMS_SHOWN:
        console.print(f"  … and {len(report.problems) - _MAX_PROBLEMS_SHOWN} more (see --json)")


@data.command("download")
@click.argument("name", type=click.Choice(sorted(SOURCES)))
@click.option("--root", required=True, metavar="DIR", help="Local directory to download and extract into.")
def download_command(name: str, root: str) -> None:
    """Download, verify and extract an official dataset archive (resumable)."""
    check_writable_dir(root)  # before the download, not after it
    source = SOURCES[name]
    console.print(f"{name}: {source.file} from {source.urls[0]}")
    dataset_root = download(name, root)
    console.print(f"[green]ready:[/] use --dataset {name} --root {escape(dataset_root)}")
