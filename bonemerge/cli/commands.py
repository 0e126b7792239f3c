"""The `bonemerge` command: parse options, call the API, print. No maths, no I/O of its own.

Torch is loaded only by commands that need it, on a thread of its own while the command
starts its work, so `bonemerge --help` answers at once. User errors
print one line and exit 1; usage errors exit 2 (click's convention); Ctrl-C exits 130 and
SIGTERM 143, at any moment, with nothing left behind (`bonemerge.run.interrupts`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from bonemerge import __version__
from bonemerge.checks.dtype_names import HELP as DTYPE_HELP
from bonemerge.cli import PROCESS
from bonemerge.cli.options import (
    DTYPE,
    Checked,
    adapter_name_option,
    adapter_revision_option,
    base_revision_option,
    compute_options,
    dtype_option,
    json_option,
    layers_value,
    model_output_options,
    option_group,
    output_option,
    overwrite_option,
    push_target,
    push_target_options,
    push_to_hub_options,
    quiet_option,
    resume_option,
    rounding_options,
    shard_option,
    streamed_push_target,
)
from bonemerge.cli.render import print_report, print_verification, printable
from bonemerge.cli.runtime import command_line, progress_shown, reported
from bonemerge.methods import conversion_help, conversion_names, method_names
from bonemerge.run import interrupts


class _Command(click.Group):
    """The command group; in the `bonemerge` process it ends through `interrupts.finish`."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not PROCESS:
            return super().main(*args, **kwargs)
        try:
            super().main(*args, **kwargs)
            code = 0
        except SystemExit as exc:
            code = exc.code
        if not isinstance(code, int):  # as Python does: None is success, a message fails
            if code is not None:
                click.echo(code, err=True)
            code = 0 if code is None else 1
        interrupts.finish(code)


_MAIN_HELP = f"""Checkpoint surgery for PEFT {method_names()} adapters, streamed shard by shard.

    Every output records its history in bonemerge.json; merge refuses an adapter already
    merged, unmerge one that was never merged or the wrong order. Run `bonemerge COMMAND --help`
    for each command's options.

    \b
    Examples:
      bonemerge merge ./Llama-3.2-1B ./my-bone-adapter --output ./merged
      bonemerge inspect ./merged
      bonemerge verify ./merged ./my-bone-adapter --base ./Llama-3.2-1B
      bonemerge demo
    """


@click.group(
    cls=_Command,
    help=_MAIN_HELP,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="bonemerge")
def main() -> None:
    """The command group; its help text, `_MAIN_HELP`, names the methods from the registry."""


@main.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, type=click.Path())
@click.option(
    "--allow-remerge",
    is_flag=True,
    help="Merge an adapter even though BASE's bonemerge.json history says it is merged already "
    "(or it is given twice); without it that is refused, since it would apply the adapter twice.",
)
@option_group(
    model_output_options,
    adapter_name_option,
    base_revision_option,
    adapter_revision_option,
    dtype_option,
    shard_option,
    compute_options,
    rounding_options,
    overwrite_option,
    resume_option,
    quiet_option,
    json_option,
    push_to_hub_options,
)
@reported
def merge(base: str, adapters: tuple[str, ...], quiet: bool, as_json: bool, **options: Any) -> None:
    """Merge ADAPTERS, in the order given, into the model at BASE.

    BASE and ADAPTERS are local folders or Hub ids (org/name, org/name@revision). With one
    argument, it is either a full PEFT checkpoint (a PeftModel state dict), whose own blocks
    merge into its own base weights, or an adapter, merged into the base its config names
    (--adapter-revision then picks the adapter's revision, --base-revision the base's).

    \b
    Examples:
      bonemerge merge ./Llama-3.2-1B ./my-bone-adapter --output ./merged
      bonemerge merge meta-llama/Llama-3.2-1B me/bone-adapter@v2 -o ./merged --push-to-hub me/merged
      bonemerge merge me/bone-adapter --output ./merged
      bonemerge merge ./trainer/checkpoint-500 --output ./merged
      bonemerge merge meta-llama/Llama-3.2-1B me/lora --push-to-hub me/merged --stream
    """
    from bonemerge.api import merge as run

    push = streamed_push_target(options)
    report = run(
        base,
        adapters,
        progress=progress_shown(quiet or as_json),
        command=command_line(),
        push=push,
        **options,
    )
    print_report(report, quiet, as_json)


@main.command()
@click.argument("merged", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option(
    "--allow-lossy",
    is_flag=True,
    help="Keep trained modules_to_save copies and biases, whose originals cannot be recovered.",
)
@option_group(
    model_output_options,
    adapter_revision_option,
    dtype_option,
    shard_option,
    compute_options,
    overwrite_option,
    resume_option,
    quiet_option,
    json_option,
    push_to_hub_options,
)
@reported
def unmerge(merged: str, adapters: tuple[str, ...], quiet: bool, as_json: bool, **options: Any) -> None:
    """Take ADAPTERS back out of the merged model at MERGED.

    List the adapters in the order they were merged; they are taken out last first. Bat blocks
    are inverted per tile, which is refused when I + B is singular or ill-conditioned.

    \b
    Example:
      bonemerge unmerge ./merged ./my-bone-adapter --output ./base-again
    """
    from bonemerge.api import unmerge as run

    push = streamed_push_target(options)
    report = run(
        merged,
        adapters,
        progress=progress_shown(quiet or as_json),
        command=command_line(),
        push=push,
        **options,
    )
    print_report(report, quiet, as_json)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--original-modules",
    is_flag=True,
    help="Keep the original modules_to_save modules, not the trained copies.",
)
@option_group(
    model_output_options,
    adapter_name_option,
    dtype_option,
    shard_option,
    overwrite_option,
    resume_option,
    quiet_option,
    json_option,
    push_to_hub_options,
)
@reported
def unload(checkpoint: str, quiet: bool, as_json: bool, **options: Any) -> None:
    """Write the plain base model inside a full PEFT CHECKPOINT, without merging its blocks.

    \b
    Example:
      bonemerge unload ./trainer/checkpoint-500 --output ./base
    """
    from bonemerge.api import unload as run

    push = streamed_push_target(options)
    report = run(
        checkpoint, progress=progress_shown(quiet or as_json), command=command_line(), push=push, **options
    )
    print_report(report, quiet, as_json)


@main.command()
@click.argument("source", type=click.Path())
@click.option(
    "--include",
    metavar="REGEX",
    help="Keep only modules whose path contains a match of REGEX (searched, not anchored: "
    "q_proj matches model.layers.0.self_attn.q_proj).",
)
@click.option(
    "--exclude",
    metavar="REGEX",
    help="Drop modules whose path contains a match of REGEX (searched, not anchored).",
)
@click.option(
    "--layers", type=Checked("layers", layers_value), help="Keep only these layer indices, e.g. 0-11,20."
)
@click.option(
    "--dtype",
    type=DTYPE,
    default="auto",
    show_default=True,
    help=f"Dtype of the written tensors: {DTYPE_HELP}; auto keeps each tensor's own.",
)
@click.option("--drop-modules-to-save", is_flag=True, help="Leave out modules_to_save copies.")
@click.option(
    "--to",
    type=click.Choice(conversion_names()),
    help=f"Convert the adapter: {conversion_help()}.",
)
@click.option(
    "--base",
    type=click.Path(),
    help="For --to lora: the base model (default: the one the adapter's config names); its shapes "
    "size LoRA's factors, and Bat's update is computed from its weights.",
)
@click.option(
    "--rank",
    metavar="K|auto",
    help="For --to lora from Bat: keep the best rank-K approximation of each update (truncated "
    "SVD), or with auto the smallest rank per module that meets --max-error.",
)
@click.option(
    "--max-error",
    type=float,
    metavar="E",
    help="With --rank auto: the largest relative Frobenius error allowed per module (e.g. 0.01).",
)
@option_group(
    output_option, adapter_name_option, overwrite_option, quiet_option, json_option, push_to_hub_options
)
@reported
def strip(source: str, quiet: bool, as_json: bool, **options: Any) -> None:
    """Write a reduced adapter from SOURCE, an adapter folder or a full PEFT checkpoint.

    \b
    Examples:
      bonemerge strip ./adapter --layers 0-11 --output ./adapter-first-half
      bonemerge strip ./bone-adapter --to miss --dtype bfloat16 --output ./miss-adapter
      bonemerge strip ./miss-adapter --to lora --base ./Llama-3.2-1B --output ./lora-adapter
      bonemerge strip ./bat-adapter --to lora --rank auto --max-error 0.01 --output ./lora-adapter
      bonemerge strip ./trainer/checkpoint-500 --output ./adapter
    """
    from bonemerge.api import strip as run

    push = push_target(options)
    report = run(
        source, progress=progress_shown(quiet or as_json), command=command_line(), push=push, **options
    )
    print_report(report, quiet, as_json)


@main.command()
@click.argument("path", type=click.Path())
@click.option(
    "--base",
    type=click.Path(),
    help="Plan the adapter at PATH against this base model: what it touches, the merged size, or "
    "the mismatch that would stop a merge (exit 1).",
)
@json_option
@reported
def inspect(path: str, base: str | None, as_json: bool) -> None:
    """Tell what PATH is and holds (headers only): model, adapter, or full PEFT checkpoint,
    and for models bonemerge made, their history (what was merged, when, by which command).

    \b
    Examples:
      bonemerge inspect ./my-bone-adapter
      bonemerge inspect ./my-bone-adapter --base meta-llama/Llama-3.2-1B
      bonemerge inspect ./merged --json
    """
    from bonemerge.api import inspect as run

    report = run(path, base)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from bonemerge.report.inspect_text import render_inspection

        click.echo("\n".join(printable(line) for line in render_inspection(report.to_dict())))
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("merged", type=click.Path())
@click.argument("adapters", nargs=-1, type=click.Path())
@click.option(
    "--base",
    type=click.Path(),
    help="The model the adapters were merged into. [default: the one the first adapter's config names]",
)
@click.option(
    "--checksums",
    is_flag=True,
    help="Check every file against the digest recorded in bonemerge.json (no base needed).",
)
@option_group(adapter_name_option, base_revision_option, adapter_revision_option, json_option)
@click.option(
    "--device", default="cpu", show_default=True, help="Where the recomputation runs (cpu, cuda, cuda:1)."
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp64"]),
    default="auto",
    show_default=True,
    help="Compute dtype of the recomputation, as for merge; exact mode needs the one the merge used.",
)
@reported
def verify(
    merged: str, adapters: tuple[str, ...], base: str | None, checksums: bool, as_json: bool, **options: Any
) -> None:
    """Check MERGED: recompute the merge of ADAPTERS into --base (by default the base the first
    adapter's config names, as for merge) and compare tensor by tensor, and/or (--checksums)
    compare its files with the checksums bonemerge recorded.

    Untouched tensors must be identical. When MERGED's history says bonemerge merged exactly
    these adapters with the same maths, precision, device and torch version, every merged
    tensor must match bit for bit (exact mode); otherwise (PEFT, other tools) each element may
    differ only by its own rounding error, bounded from the values that went into it
    (tolerance mode). A tensor of another dtype or shape than the merge gives fails before
    any value is compared; an element whose rounding bound exceeds 1/16 of its value (an
    adapter whose factors cancel) is not checkable and fails too. Exits 0 only when
    everything matches and, with --checksums, every recorded file is intact. At most 10
    tensors of each kind are listed; --json lists all.

    \b
    Examples:
      bonemerge verify ./merged ./my-bone-adapter --base ./Llama-3.2-1B
      bonemerge verify ./merged ./my-bone-adapter
      bonemerge verify ./merged --checksums
    """
    from bonemerge.api import verify as run
    from bonemerge.api import verify_checksums

    if base is None and not adapters and not checksums:
        raise click.UsageError(
            "pass the adapters (and --base BASE unless their config names it) to recompute the merge, "
            "or --checksums."
        )
    results = {}
    if checksums:
        results["checksums"] = verify_checksums(merged)
    if adapters or base is not None:
        results["tensors"] = run(merged, base, adapters, **options)
    if as_json:
        click.echo(json.dumps({k: v.to_dict() for k, v in results.items()}, indent=2))
    else:
        print_verification(results)
    if not all(r.ok for r in results.values()):
        sys.exit(1)


@main.command()
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@push_target_options
@reported
def push(folder: str, repo_id: str, **options: Any) -> None:
    """Publish FOLDER, an output of bonemerge, to the Hub repo REPO_ID (created if missing).

    A failed upload can be rerun with the same command; files already uploaded are skipped.

    \b
    Example:
      bonemerge push ./merged me/Llama-3.2-1B-bone --private
    """
    from bonemerge.api import push as run

    click.echo(f"pushed: {run(folder, push_target(options, repo_id))}")


@main.command()
@click.option(
    "-o",
    "--output",
    default="bonemerge-demo",
    show_default=True,
    type=click.Path(),
    help="Folder for the demo's base, adapter and merged model (replaced if it holds an earlier demo).",
)
@reported
def demo(output: str) -> None:
    """Build a small sharded bf16 Llama-shaped model and a Bone adapter, merge and check them.

    \b
    Example:
      bonemerge demo --output ./bonemerge-demo
    """
    from bonemerge.commands.demo import run_demo

    run_demo(output, echo=click.echo)
