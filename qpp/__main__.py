"""``python -m qpp``: the CLI."""

from qpp.cli import main

main()
