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


def shown(value: object, limit: int = 80, quote: bool = True) -> str:
    """`value` as a message quotes it (its `repr`, or a string as it is without `quote`), cut to
    `limit` characters by an ellipsis in the middle, which keeps both ends of a long name.

    Messages echo what a file or an option says so that the user sees what is wrong; a hostile
    or broken file can say kilobytes, which would bury the one sentence. Every message that
    echoes a value read from an input goes through here."""
    text = repr(value) if quote or not isinstance(value, str) else value
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]
