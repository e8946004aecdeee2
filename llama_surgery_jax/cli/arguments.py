"""Command-line argument types that check their range as argparse parses, so a bad setting stops the command before
any work with a message that names it (`error: argument --top-k: must be at least 1, got 0`), and output paths that
are checked the same way (a JSON file that would land on a folder, a folder that is a file, a parent that cannot be
made), so that a result is never lost after the work; and `command`, the `main` of a command line.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path


def command(parse: Callable[[list[str] | None], argparse.Namespace],
            run: Callable[[argparse.Namespace], int]) -> Callable[[list[str] | None], int]:
    """A command line's `main(argv) -> exit status`: `parse(argv)`, then `run(args)`. argparse's own exit (a bad
    setting: 2, its message printed; --help: 0) is returned as the status like run's failures, not raised, so that
    `sys.exit(main())` and a test calling `main([...])` see one kind of result."""
    def main(argv: list[str] | None = None) -> int:
        try:
            args = parse(argv)
        except SystemExit as stop:
            return stop.code or 0
        return run(args)

    return main


def integer(minimum: int) -> Callable[[str], int]:
    """An int ≥ minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def real(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


density = real(0.0, 1.0, low_open=True)  # a block density ρ: some tiles, at most all


def listed(item: Callable[[str], object]) -> Callable[[str], list]:
    """A comma-separated list, each item checked by `item` (empty items skipped)."""
    def parse(text: str) -> list:
        return [item(part) for part in text.split(",") if part.strip()]

    return parse


def unchanged(check: Callable[[str], object]) -> Callable[[str], str]:
    """The text as given, once `check` accepts it (for settings that the library still parses itself)."""
    def parse(text: str) -> str:
        check(text)
        return text

    return parse


def names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma-separated list of names out of `allowed`."""
    def parse(text: str) -> list[str]:
        given = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in given if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}: choose among "
                                             f"{', '.join(allowed)}")
        return given

    return parse


def _creatable(path: Path) -> None:
    """Raises ArgumentTypeError unless the folders up to `path` exist as folders or can be made, writably."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path} cannot be written: {parent} is not writable")


def output_file(text: str) -> str:
    """A file to write at the end: not a folder, its folder makeable and writable."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: give a file name, e.g. {path / 'result.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} is not writable")
    _creatable(path)
    return text


def output_folder(text: str) -> str:
    """A folder to write into: a folder already or makeable, writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path} is not writable")
    _creatable(path / "x")
    return text
