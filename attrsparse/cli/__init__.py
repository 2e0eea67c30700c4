"""The command-line interface: ``attrsparse <command> ...``."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
