"""Rewrite a generated section of a Markdown file: the lines between ``<!-- NAME:start -->``
and ``<!-- NAME:end -->``, so tables derived from data never drift from it."""

from __future__ import annotations

from pathlib import Path


def marked_section(path: Path, name: str) -> str:
    """The text between the markers ``name`` (ValueError if they are missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} section")
    return text.partition(start)[2].partition(end)[0]


def rewrite_marked_section(path: Path, name: str, body: str) -> None:
    """Replace the text between the markers ``name`` with ``body``."""
    old = marked_section(path, name)
    start = f"<!-- {name}:start -->"
    path.write_text(path.read_text().replace(start + old, start + body, 1))
