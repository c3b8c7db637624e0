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


def write_model_section(
    bench: str, name: str, models: tuple[str, ...], section: str, docs: Path = DOCS
) -> None:
    """Write one model's part of a bench's results between ``<!-- bench:name:start/end -->``.

    Models are run one at a time (each with its own budget, on a shared machine), so a run
    replaces only the tables of the models it ran; a new one goes after the bench's own section
    and the models before it in ``models`` order. ``section`` is the text without the marks.
    """
    start, end = model_marks(bench, name)
    marked = f"{start}\n{section.strip()}\n{end}"
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    if start in text:
        write_section(marked, start, end, docs)
        return
    earlier = [model_marks(bench, model)[1] for model in models[: models.index(name)]]
    anchor = max(
        (
            text.index(mark) + len(mark)
            for mark in [f"<!-- {bench}:end -->", *earlier]
            if mark in text
        ),
        default=len(text),
    )
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text[:anchor] + f"\n\n{marked}" + text[anchor:])


def model_marks(bench: str, name: str) -> tuple[str, str]:
    """The marks around model ``name``'s part of ``bench``'s results."""
    return f"<!-- {bench}:{name}:start -->", f"<!-- {bench}:{name}:end -->"
