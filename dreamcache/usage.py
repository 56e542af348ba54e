"""The command-line convention of every entry point: a user's mistake is one line, ``error: ...``, exit 2.

``Parser`` is an ``argparse.ArgumentParser`` whose errors follow it (argparse's own print the usage block
first). ``positive`` is an argparse type for counts (config fields are checked by their dataclasses).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

USAGE_ERROR = 2
INTERRUPTED = 130  # the shell's code for Ctrl-C


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def fail(message: object) -> int:
    """Prints the one line (a message's own lines joined, bullets too) and returns the exit status for ``main``."""
    text = " ".join(line.strip().removeprefix("- ") for line in str(message).splitlines() if line.strip())
    print(f"error: {text}", file=sys.stderr, flush=True)
    return USAGE_ERROR


def positive(text: str) -> int:
    return _int(text, 1, "a whole number >= 1")


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text} must be {what}")
    return value
