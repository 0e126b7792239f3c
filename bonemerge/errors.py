"""The one exception family bonemerge raises for problems a user can fix.

Everything else that escapes is a bug. The CLI prints a `BonemergeError` as a single
sentence with no traceback and exits with `exit_code`; library users can catch the
subclasses to tell a broken file from a bad option.
"""

from __future__ import annotations


class BonemergeError(Exception):
    """A problem with the input, the options or the environment, told in one sentence."""

    exit_code = 1


class CheckpointError(BonemergeError):
    """A model folder or safetensors file is missing, malformed or inconsistent."""


class AdapterError(BonemergeError):
    """An adapter folder is missing, of another PEFT type, or contradicts itself or the base."""


class MergeError(BonemergeError):
    """The maths cannot be carried out safely (non-finite values, singular blocks)."""


class OutputError(BonemergeError):
    """The output path is unsafe, already taken, or the disk cannot hold the result."""
