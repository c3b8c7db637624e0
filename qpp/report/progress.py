"""Progress bars that stay out of the way: silent when asked, or when stderr is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], label: str, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on stderr when ``enabled`` and stderr is a terminal."""
    show = enabled and sys.stderr.isatty()
    yield from tqdm(items, desc=label, disable=not show, leave=False, file=sys.stderr)
