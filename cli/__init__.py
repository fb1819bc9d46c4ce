"""The `elasticfleet` command line (the console script runs `main`)."""

from elasticfleet.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
