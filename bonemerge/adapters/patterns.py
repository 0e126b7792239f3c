"""PEFT's regular-expression matching of module names, in time linear in the name.

PEFT applies config strings as Python regexes: `rank_pattern`/`alpha_pattern` keys through
`get_pattern_key` (`re.match(rf"(.*\\.)?({key})$", module)`), a string `target_modules` or
`exclude_modules` through `re.fullmatch`. Python's `re` backtracks, so a key such as
`(.|.)*Z` takes exponential time on a long name: a hostile adapter could keep bonemerge busy
for hours. The same expressions are run here with RE2 (google-re2), whose automata match in
time linear in the name and memory bounded by `max_mem`, and so keep the promise of bounded
work for any adapter.

`scope` matches `target_modules`, `exclude_modules` and `layers_pattern` with the same
programs. The two engines agree on whether a name matches for every expression both accept
(tested against PEFT's own functions), with two documented edges that PEFT's module names never
reach: RE2's `$` is the end of the name only (Python's also matches before a final newline),
and `\\d`, `\\w`, `\\s`, `\\b` are ASCII in RE2. Python syntax that RE2 lacks (backreferences,
lookarounds, `\\Z`, repetition counts over 1000) is refused in one sentence rather than run on
the backtracking engine: no fallback can bound its time.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import re2

from bonemerge.errors import AdapterError, shown

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the refusal below says it once; RE2 would also print to stderr


@functools.lru_cache(maxsize=4096)
def compiled(expression: str) -> re2._Regexp | None:
    """The RE2 program of `expression`, or None when RE2 cannot run it."""
    try:
        return re2.compile(expression, _OPTIONS)
    except re2.error:
        return None


def check_pattern(pattern: str, what: str, where: object, wrapped: str | None = None) -> None:
    """Refuse `pattern` (or the expression `wrapped` that PEFT builds around it) in one
    sentence when Python cannot compile it (PEFT would fail loading it) or RE2 cannot run it."""
    expression = pattern if wrapped is None else wrapped
    try:
        re.compile(expression)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(
            f"{where} has {what} {shown(pattern)}, which is not a valid regular expression ({exc}); "
            "PEFT cannot load it either, fix the config."
        ) from None
    if compiled(expression) is None:
        raise AdapterError(
            f"{where} has {what} {shown(pattern)}, whose regular-expression syntax (backreferences, "
            "lookarounds, \\Z, counts over 1000, or a program over 8 MiB) bonemerge does not run, as it "
            "matches names in linear time only; rewrite it without them."
        )


def key_expression(key: str) -> str:
    """The expression `get_pattern_key` builds around a `rank_pattern`/`alpha_pattern` key."""
    return rf"(.*\.)?({key})$"


def pattern_key(keys: Iterable[str], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first key that matches a dotted suffix of `module`, or
    None (PEFT returns the module itself, which no key equals unless it matched). Keys must
    have passed `check_pattern` with `key_expression`."""
    for key in keys:
        program = compiled(key_expression(key))
        if program is not None and program.match(module):
            return key
    return None
