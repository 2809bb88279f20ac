"""argparse types for numbers: they refuse what llama.cpp would silently turn into something else
(-c -5 is a 256-token context, --seed -5 wraps around, -t 0 means every core), with a message
that says the range."""

from __future__ import annotations

import argparse
import math


def int_arg(low: int | None = None, high: int | None = None, also: tuple[int, ...] = (), what: str = "a whole number"):
    """An argparse type: an int in [low, high] or one of also; ArgumentTypeError says the range."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
        if value in also or ((low is None or value >= low) and (high is None or value <= high)):
            return value
        if high is None:
            allowed = f"at least {low}"
        elif low is None:
            allowed = f"at most {high}"
        else:
            allowed = f"from {low} to {high}"
        if also:
            allowed += " (or " + ", ".join(map(str, also)) + ")"
        raise argparse.ArgumentTypeError(f"{value} is out of range: {what} {allowed}")
    parse.__name__ = what
    return parse


def float_arg(low: float = 0.0, what: str = "a number"):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what} of at least {low}")
        return value
    parse.__name__ = what
    return parse


context_size = int_arg(1, what="a context size in tokens")
thread_count = int_arg(1, what="a thread count")
port_number = int_arg(1, 65535, what="a TCP port")
seed_value = int_arg(0, 2**32 - 1, also=(-1,), what="a seed (-1: random)")
