"""The `bonemerge` command: parse options, call the API, print. No maths, no I/O of its own.

Torch is loaded only by commands that need it, on a thread of its own while the command
starts its work, so `bonemerge --help` answers at once. User errors
print one line and exit 1; usage errors exit 2 (click's convention); Ctrl-C exits 130 and
SIGTERM 143, at any moment, with nothing left behind (`bonemerge.run.interrupts`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from bonemerge.checkpoint.layout import parse_size
from bonemerge.checks.dtype_names import HELP as DTYPE_HELP
from bonemerge.checks.dtype_names import parse_dtype
from bonemerge.errors import BonemergeError


class Checked(click.ParamType):
    """A value checked by one of bonemerge's parsers while the command line is read (exit 2)."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            self._parse(value)
        except BonemergeError as exc:
            self.fail(str(exc), param, ctx)
        return value


def layers_value(text: str) -> Any:
    from bonemerge.plan.reduction import parse_layers

    return parse_layers(text)


def option_group(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(function: Any) -> Any:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


output_option = click.option("-o", "--output", required=True, type=click.Path(), help="Folder to create.")


model_output_options = option_group(
    click.option("-o", "--output", type=click.Path(), help="Folder to create (required unless --stream)."),
    click.option(
        "--stream",
        is_flag=True,
        help="With --push-to-hub and no --output: read a Hub base in place and upload the output "
        "shard by shard (at most two shards on disk), committing once at the end.",
    ),
)


overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically, only on success)."
)


resume_option = click.option(
    "--resume",
    is_flag=True,
    help="Reuse the shards an interrupted or crashed run of the same command finished (checked by "
    "their checksums); on failure, keep this run's finished shards for the next --resume.",
)


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")


json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")


adapter_name_option = click.option(
    "--adapter-name", help="Which adapter of a full PEFT checkpoint to use, when it holds several."
)


DTYPE = Checked("dtype", parse_dtype)


dtype_option = click.option(
    "--dtype",
    type=DTYPE,
    default="auto",
    show_default=True,
    help=f"Dtype of every float tensor in the output: {DTYPE_HELP}; auto keeps each tensor's own "
    "(and a block-FP8 model's format), a dtype also dequantizes every quantized weight.",
)


shard_option = click.option(
    "--max-shard-size",
    type=Checked("size", parse_size),
    help="Re-shard the output into files of at most this size: 5GB (GB = 10⁹ bytes), 500MiB "
    "(2²⁰ bytes) or plain bytes; a tensor larger than that gets a file of its own, and the summary "
    "says so. [default: keep the base's files and tensor-to-file map]",
)


base_revision_option = click.option(
    "--base-revision",
    metavar="REV",
    help="Branch, tag or commit of a BASE given as a Hub id (or write org/name@REV).",
)


adapter_revision_option = click.option(
    "--adapter-revision", metavar="REV", help="Branch, tag or commit of adapters given as Hub ids."
)


push_target_options = option_group(
    click.option("--private", is_flag=True, help="Create the Hub repo as private."),
    click.option(
        "--revision", metavar="BRANCH", help="Push to this branch (created if missing) or refs/pr/N."
    ),
    click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to main."),
    click.option("--commit-message", metavar="TEXT", help="Commit message on the Hub."),
    click.option("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or the saved login)."),
)


push_to_hub_options = option_group(
    click.option(
        "--push-to-hub", metavar="REPO_ID", help="Publish the output to this Hub repo once it is complete."
    ),
    push_target_options,
)


def streamed_push_target(options: dict[str, Any]) -> Any:
    """`push_target` for a command that writes a model: `--output`, or `--stream` with `--push-to-hub`."""
    if options["stream"] and not options.get("push_to_hub"):
        raise click.UsageError("--stream writes straight to the Hub; pass --push-to-hub REPO_ID with it.")
    if options["stream"] and options["output"] is not None:
        raise click.UsageError("--stream keeps no local output; drop --output (or drop --stream).")
    if not options["stream"] and options["output"] is None:
        raise click.UsageError("Missing option '-o' / '--output' (or --stream with --push-to-hub).")
    return push_target(options)


def push_target(options: dict[str, Any], repo_id: str | None = None) -> Any:
    """Pop the push options from a command's keyword arguments into a `Push`, or None."""
    from bonemerge.output.push import Push

    repo_id = options.pop("push_to_hub", repo_id)
    settings = {k: options.pop(k) for k in ("private", "revision", "create_pr", "commit_message", "token")}
    if repo_id is None:
        used = [f"--{k.replace('_', '-')}" for k, v in settings.items() if v]
        if used:
            raise click.UsageError(f"{', '.join(used)} only apply with --push-to-hub.")
        return None
    return Push(repo_id, **settings, progress=sys.stderr.isatty())


compute_options = option_group(
    click.option(
        "--safe-merge/--no-safe-merge",
        default=True,
        show_default=True,
        help="Check every computed tensor for NaN/Inf before writing it.",
    ),
    click.option(
        "--device",
        default="cpu",
        show_default=True,
        help="Where the maths runs (cpu, cuda, cuda:1); I/O stays on the CPU.",
    ),
    click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "fp64"]),
        default="auto",
        show_default=True,
        help="Compute dtype; auto uses fp32 for 16-bit outputs and fp64 for fp32 outputs.",
    ),
)


rounding_options = option_group(
    click.option(
        "--rounding",
        type=click.Choice(["nearest", "stochastic"]),
        default="nearest",
        show_default=True,
        help="How merged weights of a quantized (block FP8) model become codes again: nearest "
        "(each as close as it can be; updates smaller than half a code step vanish) or stochastic "
        "(up or down at random in proportion, so the update survives on average; adds noise).",
    ),
    click.option(
        "--seed", type=int, default=0, show_default=True, help="Seed of --rounding stochastic (reproducible)."
    ),
)
