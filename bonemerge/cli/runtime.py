"""The `bonemerge` command: parse options, call the API, print. No maths, no I/O of its own.

Torch is loaded only by commands that need it, on a thread of its own while the command
starts its work, so `bonemerge --help` answers at once. User errors
print one line and exit 1; usage errors exit 2 (click's convention); Ctrl-C exits 130 and
SIGTERM 143, at any moment, with nothing left behind (`bonemerge.run.interrupts`).
"""

from __future__ import annotations

import gc
import importlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from bonemerge.cli import PROCESS
from bonemerge.cli.render import printable
from bonemerge.errors import BonemergeError
from bonemerge.run import interrupts

# Commands that never need torch, which keeps them quick to start.
WITHOUT_TORCH = frozenset({"inspect", "push"})


class TorchLoading:
    """torch imported on a thread of its own while the command reads headers, plans, checks
    and starts copying: its start-up is the largest fixed cost of a run, and
    nothing before the first tensor to compute needs it.

    The thread holds back Ctrl-C and SIGTERM, so that their C handler never interrupts
    torch's C++ start-up; Python runs the process's handler on the main thread anyway, and
    that handler (`bonemerge.run.interrupts`) ends the process without ever joining this thread.
    The garbage collector is off while torch loads and, after, everything torch allocated is
    moved out of its sight (`gc.freeze`): otherwise full collections walking those objects
    slow the import and stall every thread later. numpy's OpenBLAS, which bonemerge never
    calls, is kept to one thread: its idle threads would spin.
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


def reported(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's errors into one line and the documented exit code; signals are
    `bonemerge.run.interrupts`' (installed here too when the CLI runs inside another program)."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        restore = interrupts.install()
        loading = None if command.__name__ in WITHOUT_TORCH else TorchLoading()
        try:
            return command(*args, **kwargs)
        except BonemergeError as exc:
            click.echo(f"error: {printable(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:  # raised by code, not by a signal: the handler never raises
            click.echo("interrupted; the output was left as it was.", err=True)
            sys.exit(130)
        finally:
            if loading is not None and not PROCESS:  # the process ends with os._exit instead
                loading.wait()
            restore()

    return run


def command_line() -> str:
    return shlex.join(["bonemerge", *sys.argv[1:]])


def progress_shown(hidden: bool) -> bool:
    """A bar only for a person at a terminal: not with -q, nor with --json (a script reads it)."""
    return not hidden and sys.stderr.isatty()
