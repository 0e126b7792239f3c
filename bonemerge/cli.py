"""The `bonemerge` command: parse options, call the API, print. No maths, no I/O of its own.

Torch is loaded only by commands that need it, on a thread of its own while the command
starts its work, so `bonemerge --help` answers at once. User errors
print one line and exit 1; usage errors exit 2 (click's convention); Ctrl-C exits 130 and
SIGTERM 143, at any moment, with nothing left behind (`bonemerge.interrupts`).
"""

from __future__ import annotations

import sys

from bonemerge import interrupts

# The `bonemerge` command's own process (not a program that imports this module): it catches
# signals before anything else is imported, so that none arrives with Python's default still
# in place (a traceback, or death by SIGTERM), and it ends through `interrupts.finish`.
_PROCESS = bool(sys.argv) and sys.argv[0].rsplit("/", 1)[-1].startswith("bonemerge")
if _PROCESS:
    interrupts.install()

import gc
import importlib
import json
import os
import re
import shlex
import signal
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from bonemerge import __version__
from bonemerge.checkpoint.layout import parse_size
from bonemerge.dtype_names import HELP as DTYPE_HELP
from bonemerge.dtype_names import parse_dtype
from bonemerge.errors import BonemergeError, shown
from bonemerge.methods import conversion_help, conversion_names, method_names
from bonemerge.units import format_size

# Commands that never need torch, which keeps them quick to start.
_WITHOUT_TORCH = frozenset({"inspect", "push"})


class _TorchLoading:
    """torch imported on a thread of its own while the command reads headers, plans, checks
    and starts copying: its start-up (1.5 s here) is the largest fixed cost of a run, and
    nothing before the first tensor to compute needs it.

    The thread holds back Ctrl-C and SIGTERM, so that their C handler never interrupts
    torch's C++ start-up; Python runs the process's handler on the main thread anyway, and
    that handler (`bonemerge.interrupts`) ends the process without ever joining this thread.
    The garbage collector is off while torch loads and, after, everything torch allocated is
    moved out of its sight (`gc.freeze`): otherwise full collections walking those objects
    cost 0.1 s during the import and stall every thread for as long later. numpy's OpenBLAS,
    which bonemerge never calls, is kept to one thread: its idle threads spin for 0.1 CPU-s.
    """

    def __init__(self) -> None:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        self._thread = threading.Thread(target=self._load, name="bonemerge-torch", daemon=True)
        self._thread.start()

    @staticmethod
    def _load() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(interrupts.SIGNALS))
        gc.disable()
        try:
            importlib.import_module("torch")
        except BaseException:  # the command's own `import torch` raises it where it matters
            pass
        finally:
            gc.freeze()
            gc.enable()

    def wait(self) -> None:
        """Let the import finish before a normal exit: a daemon thread stopped inside torch's
        C++ start-up at interpreter shutdown can abort the process. Signals stay live
        meanwhile: their handler exits at once, with `os._exit`, which stops no thread."""
        self._thread.join()


# Longer than any real path or tensor name a message needs to show whole.
_LONGEST_WORD = 300
_LONG_WORD = re.compile(rf"\S{{{_LONGEST_WORD + 1},}}")


def printable(text: str) -> str:
    """`text` safe for any terminal: names from hostile files can hold lone surrogates, which
    no encoding can print, and line breaks, which would split the one-line message; and a
    name of kilobytes, which `shown` cuts here too if the message echoed it whole."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return _LONG_WORD.sub(lambda word: shown(word.group(), _LONGEST_WORD, quote=False), text)


def _reported(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's errors into one line and the documented exit code; signals are
    `bonemerge.interrupts`' (installed here too when the CLI runs inside another program)."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        restore = interrupts.install()
        loading = None if command.__name__ in _WITHOUT_TORCH else _TorchLoading()
        try:
            return command(*args, **kwargs)
        except BonemergeError as exc:
            click.echo(f"error: {printable(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:  # raised by code, not by a signal: the handler never raises
            click.echo("interrupted; the output was left as it was.", err=True)
            sys.exit(130)
        finally:
            if loading is not None and not _PROCESS:  # the process ends with os._exit instead
                loading.wait()
            restore()

    return run


class _Checked(click.ParamType):
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


def _layers(text: str) -> Any:
    from bonemerge.adapter_reduction import parse_layers

    return parse_layers(text)


def _command_line() -> str:
    return shlex.join(["bonemerge", *sys.argv[1:]])


def _options(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(function: Any) -> Any:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


_output = click.option("-o", "--output", required=True, type=click.Path(), help="Folder to create.")
_model_output = _options(
    click.option("-o", "--output", type=click.Path(), help="Folder to create (required unless --stream)."),
    click.option(
        "--stream",
        is_flag=True,
        help="With --push-to-hub and no --output: read a Hub base in place and upload the output "
        "shard by shard (at most two shards on disk), committing once at the end.",
    ),
)
_overwrite = click.option(
    "--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically, only on success)."
)
_resume = click.option(
    "--resume",
    is_flag=True,
    help="Reuse the shards an interrupted or crashed run of the same command finished (checked by "
    "their BLAKE3 digests); on failure, keep this run's finished shards for the next --resume.",
)
_quiet = click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
_as_json = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
_adapter_name = click.option(
    "--adapter-name", help="Which adapter of a full PEFT checkpoint to use, when it holds several."
)
_dtype_type = _Checked("dtype", parse_dtype)
_dtype = click.option(
    "--dtype",
    type=_dtype_type,
    default="auto",
    show_default=True,
    help=f"Dtype of every float tensor in the output: {DTYPE_HELP}; auto keeps each tensor's own "
    "(and a block-FP8 model's format), a dtype also dequantizes every quantized weight.",
)
_shard = click.option(
    "--max-shard-size",
    type=_Checked("size", parse_size),
    help="Re-shard the output into files of at most this size: 5GB (GB = 10⁹ bytes), 500MiB "
    "(2²⁰ bytes) or plain bytes; a tensor larger than that gets a file of its own, and the summary "
    "says so. [default: keep the base's files and tensor-to-file map]",
)
_base_revision = click.option(
    "--base-revision",
    metavar="REV",
    help="Branch, tag or commit of a BASE given as a Hub id (or write org/name@REV).",
)
_adapter_revision = click.option(
    "--adapter-revision", metavar="REV", help="Branch, tag or commit of adapters given as Hub ids."
)
_push_target = _options(
    click.option("--private", is_flag=True, help="Create the Hub repo as private."),
    click.option(
        "--revision", metavar="BRANCH", help="Push to this branch (created if missing) or refs/pr/N."
    ),
    click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to main."),
    click.option("--commit-message", metavar="TEXT", help="Commit message on the Hub."),
    click.option("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or the saved login)."),
)
_push_to_hub = _options(
    click.option(
        "--push-to-hub", metavar="REPO_ID", help="Publish the output to this Hub repo once it is complete."
    ),
    _push_target,
)


def _streamed_push(options: dict[str, Any]) -> Any:
    """`_push` for a command that writes a model: `--output`, or `--stream` with `--push-to-hub`."""
    if options["stream"] and not options.get("push_to_hub"):
        raise click.UsageError("--stream writes straight to the Hub; pass --push-to-hub REPO_ID with it.")
    if options["stream"] and options["output"] is not None:
        raise click.UsageError("--stream keeps no local output; drop --output (or drop --stream).")
    if not options["stream"] and options["output"] is None:
        raise click.UsageError("Missing option '-o' / '--output' (or --stream with --push-to-hub).")
    return _push(options)


def _push(options: dict[str, Any], repo_id: str | None = None) -> Any:
    """Pop the push options from a command's keyword arguments into a `Push`, or None."""
    from bonemerge.hub import Push

    repo_id = options.pop("push_to_hub", repo_id)
    settings = {k: options.pop(k) for k in ("private", "revision", "create_pr", "commit_message", "token")}
    if repo_id is None:
        used = [f"--{k.replace('_', '-')}" for k, v in settings.items() if v]
        if used:
            raise click.UsageError(f"{', '.join(used)} only apply with --push-to-hub.")
        return None
    return Push(repo_id, **settings, progress=sys.stderr.isatty())


_compute = _options(
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


_rounding = _options(
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


def _print_report(report: Any, quiet: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(
            f"{report.operation}: {report.counts()}; "
            f"{format_size(report.bytes_written)} in {report.seconds:.1f} s -> {report.output}"
        )
        for note in report.notes:
            click.echo(f"note: {note}")
    if report.pushed_to and not as_json:
        click.echo(f"pushed: {report.pushed_to}")


def _progress(hidden: bool) -> bool:
    """A bar only for a person at a terminal: not with -q, nor with --json (a script reads it)."""
    return not hidden and sys.stderr.isatty()


class _Command(click.Group):
    """The command group; in the `bonemerge` process it ends through `interrupts.finish`."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not _PROCESS:
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
@_options(
    _model_output,
    _adapter_name,
    _base_revision,
    _adapter_revision,
    _dtype,
    _shard,
    _compute,
    _rounding,
    _overwrite,
    _resume,
    _quiet,
    _as_json,
    _push_to_hub,
)
@_reported
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

    push = _streamed_push(options)
    report = run(
        base, adapters, progress=_progress(quiet or as_json), command=_command_line(), push=push, **options
    )
    _print_report(report, quiet, as_json)


@main.command()
@click.argument("merged", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option(
    "--allow-lossy",
    is_flag=True,
    help="Keep trained modules_to_save copies and biases, whose originals cannot be recovered.",
)
@_options(
    _model_output,
    _adapter_revision,
    _dtype,
    _shard,
    _compute,
    _overwrite,
    _resume,
    _quiet,
    _as_json,
    _push_to_hub,
)
@_reported
def unmerge(merged: str, adapters: tuple[str, ...], quiet: bool, as_json: bool, **options: Any) -> None:
    """Take ADAPTERS back out of the merged model at MERGED.

    List the adapters in the order they were merged; they are taken out last first. Bat blocks
    are inverted per tile, which is refused when I + B is singular or ill-conditioned.

    \b
    Example:
      bonemerge unmerge ./merged ./my-bone-adapter --output ./base-again
    """
    from bonemerge.api import unmerge as run

    push = _streamed_push(options)
    report = run(
        merged, adapters, progress=_progress(quiet or as_json), command=_command_line(), push=push, **options
    )
    _print_report(report, quiet, as_json)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--original-modules",
    is_flag=True,
    help="Keep the original modules_to_save modules, not the trained copies.",
)
@_options(_model_output, _adapter_name, _dtype, _shard, _overwrite, _resume, _quiet, _as_json, _push_to_hub)
@_reported
def unload(checkpoint: str, quiet: bool, as_json: bool, **options: Any) -> None:
    """Write the plain base model inside a full PEFT CHECKPOINT, without merging its blocks.

    \b
    Example:
      bonemerge unload ./trainer/checkpoint-500 --output ./base
    """
    from bonemerge.api import unload as run

    push = _streamed_push(options)
    report = run(
        checkpoint, progress=_progress(quiet or as_json), command=_command_line(), push=push, **options
    )
    _print_report(report, quiet, as_json)


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
    "--layers", type=_Checked("layers", _layers), help="Keep only these layer indices, e.g. 0-11,20."
)
@click.option(
    "--dtype",
    type=_dtype_type,
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
@_options(_output, _adapter_name, _overwrite, _quiet, _as_json, _push_to_hub)
@_reported
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

    push = _push(options)
    report = run(source, progress=_progress(quiet or as_json), command=_command_line(), push=push, **options)
    _print_report(report, quiet, as_json)


@main.command()
@click.argument("path", type=click.Path())
@click.option(
    "--base",
    type=click.Path(),
    help="Plan the adapter at PATH against this base model: what it touches, the merged size, or "
    "the mismatch that would stop a merge (exit 1).",
)
@_as_json
@_reported
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
        from bonemerge.inspect_text import render_inspection

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
@_options(_adapter_name, _base_revision, _adapter_revision, _as_json)
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
@_reported
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
        _print_verification(results)
    if not all(r.ok for r in results.values()):
        sys.exit(1)


def _print_verification(results: dict[str, Any]) -> None:
    if "checksums" in results:
        report = results["checksums"]
        click.echo(report.counts())
        for name in report.differing:
            click.echo(f"differs: {name}")
        for name in report.missing:
            click.echo(f"missing: {name}")
        _print_stray(report.stray)
    if "tensors" in results:
        report = results["tensors"]
        click.echo(printable(f"base: {report.base}"))
        click.echo(f"mode: {report.mode} ({report.reason})")
        click.echo(report.counts())
        _listed(
            "differing tensors", [f"differs: {d.describe(report.mode == 'exact')}" for d in report.differing]
        )
        _listed("tensors not checkable", [f"not checkable: {u.describe()}" for u in report.unchecked])
        _listed("missing tensors", [f"missing: {name}" for name in report.missing])
        _listed("extra tensors", [f"extra: {name}" for name in report.extra])
        _listed("mismatched tensors", [f"mismatch: {line}" for line in report.mismatched])
        _print_stray(report.stray)


# Text reports list this many items of a kind, then how many more (--json lists all).
_SHOWN = 10


def _listed(what: str, lines: list[str]) -> None:
    for line in lines[:_SHOWN]:
        click.echo(printable(line))
    if len(lines) > _SHOWN:
        click.echo(f"… and {len(lines) - _SHOWN} more {what} (--json lists all)")


def _print_stray(names: list[str]) -> None:
    for name in names:
        click.echo(
            printable(
                f"stray: {name} (a weight file that is not part of the checked checkpoint; "
                "a loader may load it)"
            )
        )


@main.command()
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@_push_target
@_reported
def push(folder: str, repo_id: str, **options: Any) -> None:
    """Publish FOLDER, an output of bonemerge, to the Hub repo REPO_ID (created if missing).

    A failed upload can be rerun with the same command; files already uploaded are skipped.

    \b
    Example:
      bonemerge push ./merged me/Llama-3.2-1B-bone --private
    """
    from bonemerge.api import push as run

    click.echo(f"pushed: {run(folder, _push(options, repo_id))}")


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
    """Build a small sharded bf16 Llama-shaped model and a Bone adapter, merge and check them.

    \b
    Example:
      bonemerge demo --output ./bonemerge-demo
    """
    from bonemerge.demo import run_demo

    run_demo(output, echo=click.echo)
