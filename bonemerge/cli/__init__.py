"""The `bonemerge` command: options (`options.py`), the commands calling the API
(`commands.py`), what they print (`render.py`) and the process they run in (`runtime.py`).
No maths, no I/O of its own.
"""

import sys

from bonemerge.run import interrupts

# The `bonemerge` command's own process (not a program that imports this package): it catches
# signals before anything else is imported, so that none arrives with Python's default still
# in place (a traceback, or death by SIGTERM), and it ends through `interrupts.finish`.
PROCESS = bool(sys.argv) and sys.argv[0].rsplit("/", 1)[-1].startswith("bonemerge")
if PROCESS:
    interrupts.install()

from bonemerge.cli.commands import main  # noqa: E402

__all__ = ["PROCESS", "main"]
