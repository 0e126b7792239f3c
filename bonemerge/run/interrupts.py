"""How the `bonemerge` process ends on Ctrl-C or SIGTERM: within moments, at any point of a
run, with nothing of the run left behind, whatever else arrives meanwhile.

Python's own Ctrl-C raises KeyboardInterrupt wherever the main thread happens to be, and that
is unsafe in a process that imports torch on another thread: raised inside importlib while
the main thread holds a module lock, it leaves the lock held and the import thread waits on it
for ever (and anything that joins that thread with it); raised inside the clean-up, a second
signal stops the clean-up half way. So the handler installed here never raises. It runs the
clean-up actions registered by whatever owns something on disk (a staging folder, its lock,
the parent folders a run created), each to its end with further signals ignored, writes one
line and leaves with `os._exit` (130 for SIGINT, 143 for SIGTERM) without joining any thread:
a thread inside an import or inside torch's C++ start-up cannot hold the exit back. Steps
that must not be cut in two (the renames that publish an output, the clean-up itself) run
under `deferred()`: a signal there is acted on as soon as the step ends.

Only the command line installs the handler; a program that calls the Python API keeps its
own signal handling (KeyboardInterrupt, and the `with` blocks that clean up after it).
"""

from __future__ import annotations

# Only modules the interpreter has already loaded at start-up: this module is imported before
# anything else, and the handlers should be in place as early as can be.
import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_actions: dict[int, Callable[[], None]] = {}
_installed = False
_exiting = False
_deferring = 0
_pending: int | None = None
_outcome = "the output was left as it was"


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


def install() -> Callable[[], None]:
    """Make SIGINT and SIGTERM end the process cleanly (see the module docstring); returns a
    function that puts the previous handlers back. A signal the process was started with
    ignored (`nohup`, a background job of a script) stays ignored. Only the main thread can
    install handlers; elsewhere this does nothing."""
    global _installed, _pending, _outcome
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        for sig, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(sig, _handle)
    except ValueError:  # not the main thread
        return lambda: None
    was_installed, _installed = _installed, True
    if not was_installed:
        _pending, _outcome = None, "the output was left as it was"

    def restore() -> None:
        global _installed
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        _installed = was_installed

    return restore


def on_signal(action: Callable[[], None]) -> Callable[[], None]:
    """Run `action` if a signal ends the process (it must be idempotent: it may also be what
    the interrupted code was doing); returns the function that unregisters it."""
    key = id(action)
    _actions[key] = action
    return lambda: _actions.pop(key, None)


def set_outcome(text: str) -> None:
    """What the exit line says happened to the output (e.g. that it was already published)."""
    global _outcome
    _outcome = text


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold back a signal until the block ends, then act on it: for steps that must never be
    cut in two. Blocks nest; only the outermost end acts."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None and _installed and not _exiting:
            _exit(_pending)


def finish(code: int) -> None:
    """End the command's process with `code` once its work is done, keeping the handlers to
    the last instant: the interpreter's own shutdown first puts the kernel's defaults back,
    so a signal during it (torch's teardown takes a while) would kill a process that had just
    succeeded with -2 or -15. Exit functions run and output is flushed as on a normal exit;
    no thread is waited for (one may still be importing torch after an early error)."""
    with deferred():
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                if stream is not None:
                    stream.flush()
        os._exit(code)


def _handle(signum: int, frame: object) -> None:
    global _pending
    if _exiting:
        return
    if _deferring:
        _pending = _pending or signum
        return
    _exit(signum)


def _exit(signum: int) -> None:
    """Clean up, say so in one line, and end the process without waiting for any thread."""
    global _exiting
    _exiting = True
    for sig in SIGNALS:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN)
    for action in reversed(list(_actions.values())):
        with contextlib.suppress(BaseException):
            action()
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    with contextlib.suppress(BaseException):
        tty = sys.stderr is not None and sys.stderr.isatty()
        os.write(2, f"{chr(10) if tty else ''}{word}; {_outcome}.\n".encode())
    os._exit(exit_code(signum))
