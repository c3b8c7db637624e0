"""What every bench shares: its section of docs/benchmarks.md, between its own markers."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(section: str, start_mark: str, end_mark: str, docs: Path = DOCS) -> None:
    """Replace the text from ``start_mark`` to ``end_mark`` with ``section`` (which holds both
    marks), or append it; the rest of the file stays as it is."""
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start_mark) + ".*?" + re.escape(end_mark), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
