"""The ``pyqueue`` command (placeholder until the operations work lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    return 0
