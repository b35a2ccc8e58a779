"""What the command-line entry points share: bad input ends as one line on stderr and exit status 2."""

import argparse
import math
import sys


class InputError(Exception):
    """Bad input the user can fix: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are InputErrors: one line, no usage block, exit status 2."""

    def error(self, message):
        raise InputError(message)


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
