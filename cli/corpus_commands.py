"""`elasticfleet corpus build`: the offline calibration and evaluation corpus
(elasticfleet.agent.corpus), from Python's own docs and sources and Debian
packages fetched with apt."""

from __future__ import annotations

import argparse

from elasticfleet.cli.options import Commands, cache_dir_option, command_group, no_progress_option


def register(commands: Commands) -> None:
    """Add `corpus build`."""
    group = command_group(commands, "corpus", "the offline calibration and evaluation corpus")
    build = group.add_parser(
        "build", help="fetch the sources and build the splits (a no-op when already valid)"
    )
    cache_dir_option(build)
    build.add_argument("--force", action="store_true", help="rebuild even if the corpus is valid")
    build.add_argument(
        "--sources",
        type=lambda text: tuple(part for part in text.split(",") if part),
        help="comma-separated sources (default: all; 'python' needs no apt packages)",
    )
    no_progress_option(build)
    build.set_defaults(handler=_build_corpus)


def _build_corpus(args: argparse.Namespace) -> int:
    from elasticfleet.agent.corpus import ALL_SOURCES, build_corpus, summary

    path = build_corpus(
        args.cache_dir,
        force=args.force,
        sources=args.sources or ALL_SOURCES,
        progress=not args.no_progress,
    )
    print(path)
    print(summary(path))
    return 0
