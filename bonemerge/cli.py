"""The `bonemerge` command: parse options, call the API, print. No maths, no I/O of its own.

Torch is imported only inside commands, so `bonemerge --help` answers at once. User errors
print one line and exit 1; usage errors exit 2 (click's convention); Ctrl-C exits 130.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from bonemerge import __version__
from bonemerge.checkpoint.layout import parse_size
from bonemerge.errors import BonemergeError


def _reported(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's errors and interrupts into one line and the documented exit code."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BonemergeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written.", err=True)
            sys.exit(130)

    return run


class _Size(click.ParamType):
    """A size such as 5GB or 500MiB, checked while the command line is parsed (exit 2)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except BonemergeError as exc:
            self.fail(str(exc), param, ctx)


def _command_line() -> str:
    return shlex.join(["bonemerge", *sys.argv[1:]])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bonemerge")
def main() -> None:
    """Checkpoint surgery for PEFT Bone, Bat and MiSS adapters, streamed shard by shard."""


@main.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder to write the merged model to.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
    help="Dtype of every float tensor in the output; auto keeps each tensor's own.",
)
@click.option(
    "--max-shard-size", type=_Size(), help="Re-shard the output into files of at most this size (e.g. 5GB)."
)
@click.option(
    "--safe-merge/--no-safe-merge",
    default=True,
    show_default=True,
    help="Check every merged tensor for NaN/Inf before writing it.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the maths runs (cpu, cuda, cuda:1); I/O stays on the CPU.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp64"]),
    default="auto",
    show_default=True,
    help="Compute dtype; auto uses fp32 for 16-bit outputs and fp64 for fp32 outputs.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically, only on success).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@_reported
def merge(
    base: str,
    adapters: tuple[str, ...],
    output: str,
    dtype: str,
    max_shard_size: int | None,
    safe_merge: bool,
    device: str,
    precision: str,
    overwrite: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Merge ADAPTERS, in the order given, into the model at BASE.

    \b
    Example:
      bonemerge merge ./Llama-3.2-1B ./my-bone-adapter --output ./merged
    """
    from bonemerge.api import merge as run_merge

    report = run_merge(
        base,
        adapters,
        output,
        dtype=dtype,
        max_shard_size=max_shard_size,
        safe_merge=safe_merge,
        device=device,
        precision=precision,
        overwrite=overwrite,
        progress=not quiet and sys.stderr.isatty(),
        command=_command_line(),
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(
            f"merged {len(report.adapters)} adapter(s) into {report.tensors_merged} tensors, "
            f"copied {report.tensors_copied}, converted {report.tensors_converted}: "
            f"{report.bytes_written / 1e9:.2f} GB in {report.seconds:.1f} s -> {report.output}"
        )
        for note in report.notes:
            click.echo(f"note: {note}")


@main.command()
@click.option(
    "-o",
    "--output",
    default="bonemerge-demo",
    show_default=True,
    type=click.Path(),
    help="Folder for the demo's base, adapter and merged model (replaced if it holds an earlier demo).",
)
@_reported
def demo(output: str) -> None:
    """Build a small sharded bf16 Llama-shaped model and a Bone adapter, merge and check them."""
    from bonemerge.demo import run_demo

    run_demo(output, echo=click.echo)
