"""The command line: argparse wiring only; the work happens in the layers below."""

from .main import main

__all__ = ["main"]
