"""What the command-line entry points share: bad input ends as one line on stderr and exit status 2."""

import argparse
import contextlib
import math
import sys


class InputError(Exception):
    """Bad input the user can fix: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are InputErrors: one line, no usage block, exit status 2."""

    def error(self, message):
        raise InputError(message)


@contextlib.contextmanager
def bad_input(prefix: str = ""):
    """Inside it, a ValueError or TypeError (what library code raises on bad arguments, rrhf_fast.data.DataError
    included) is the user's input: re-raised as an InputError, `prefix` before its message.

    Used around the calls that check user input, not around a whole command, where it would hide bugs."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise InputError(f"{prefix}{err}") from None


def number(kind=float, low=None, low_inclusive=True):
    """An argparse type: a finite `kind` (int or float), at least (or, with low_inclusive=False, above) low."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value < low if low_inclusive else value <= low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if low_inclusive else '>'} {low}")
        return value

    return parse


def run(main, prog: str, argv=None) -> int:
    """main(argv) -> exit status, with an InputError printed as `<prog>: error: <what>` and status 2."""
    try:
        return main(argv)
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
