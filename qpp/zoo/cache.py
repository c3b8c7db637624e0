"""Where the zoo keeps what it derives once (trained weights, rendered data)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QPP_CACHE_DIR``, else ``~/.cache/qpp``; created on first use."""
    path = Path(os.environ.get("QPP_CACHE_DIR", Path.home() / ".cache" / "qpp"))
    path.mkdir(parents=True, exist_ok=True)
    return path
