"""The `bonemerge` command: parse options, call the API, print. No maths, no I/O of its own.

Torch is loaded only by commands that need it, on a thread of its own while the command
starts its work, so `bonemerge --help` answers at once. User errors
print one line and exit 1; usage errors exit 2 (click's convention); Ctrl-C exits 130 and
SIGTERM 143, at any moment, with nothing left behind (`bonemerge.run.interrupts`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import click

from bonemerge.errors import shown
from bonemerge.units import format_size

# Longer than any real path or tensor name a message needs to show whole.
LONGEST_WORD = 300


LONG_WORD = re.compile(rf"\S{{{LONGEST_WORD + 1},}}")


def printable(text: str) -> str:
    """`text` safe for any terminal: names from hostile files can hold lone surrogates, which
    no encoding can print, and line breaks, which would split the one-line message; and a
    name of kilobytes, which `shown` cuts here too if the message echoed it whole."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return LONG_WORD.sub(lambda word: shown(word.group(), LONGEST_WORD, quote=False), text)


def print_report(report: Any, quiet: bool, as_json: bool) -> None:
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


def print_verification(results: dict[str, Any]) -> None:
    if "checksums" in results:
        report = results["checksums"]
        click.echo(report.counts())
        for name in report.differing:
            click.echo(f"differs: {name}")
        for name in report.missing:
            click.echo(f"missing: {name}")
        print_stray(report.stray)
    if "tensors" in results:
        report = results["tensors"]
        click.echo(printable(f"base: {report.base}"))
        click.echo(f"mode: {report.mode} ({report.reason})")
        click.echo(report.counts())
        print_listed(
            "differing tensors", [f"differs: {d.describe(report.mode == 'exact')}" for d in report.differing]
        )
        print_listed("tensors not checkable", [f"not checkable: {u.describe()}" for u in report.unchecked])
        print_listed("missing tensors", [f"missing: {name}" for name in report.missing])
        print_listed("extra tensors", [f"extra: {name}" for name in report.extra])
        print_listed("mismatched tensors", [f"mismatch: {line}" for line in report.mismatched])
        print_stray(report.stray)


# Text reports list this many items of a kind, then how many more (--json lists all).
SHOWN = 10


def print_listed(what: str, lines: list[str]) -> None:
    for line in lines[:SHOWN]:
        click.echo(printable(line))
    if len(lines) > SHOWN:
        click.echo(f"… and {len(lines) - SHOWN} more {what} (--json lists all)")


def print_stray(names: list[str]) -> None:
    for name in names:
        click.echo(
            printable(
                f"stray: {name} (a weight file that is not part of the checked checkpoint; "
                "a loader may load it)"
            )
        )
