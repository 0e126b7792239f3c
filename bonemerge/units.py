"""One way to write sizes everywhere (summaries, inspect, notes, the progress bar): decimal
units (1 GB = 10⁹ bytes, as `--max-shard-size` and the Hub count) with 3 significant digits,
so that the same number never appears as `1.00G` in one place and `1.07 GB` in another."""

from __future__ import annotations

# What tqdm needs to print sizes in the same convention.
PROGRESS_DIVISOR = 1000


def _scaled(number: float, units: tuple[str, ...]) -> str:
    """`number` divided by 1000 until it is below 1000, with 3 significant digits and its unit;
    the first unit (no scaling) is written as a whole number."""
    value = float(number)
    for position, unit in enumerate(units):
        if abs(value) < 999.5 or position == len(units) - 1:
            if position == 0:
                return f"{int(value)}{unit}"
            digits = f"{value:.0f}" if abs(value) >= 99.95 else f"{value:#.3g}"
            return f"{digits}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_size(nbytes: float) -> str:
    """`6_291_456` -> `6.29 MB`; `512` -> `512 B`; `1_070_000_000` -> `1.07 GB`."""
    return _scaled(nbytes, (" B", " kB", " MB", " GB", " TB", " PB"))


def format_count(number: float) -> str:
    """`124_439_808` -> `124 M`: parameter counts in the same style."""
    return _scaled(number, ("", " k", " M", " B", " T"))
