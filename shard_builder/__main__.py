"""Command line of the shard builder: one subcommand per stage module.

    python -m shard_builder {build,verify,download,demo-tree} --help

Each stage module exposes ``add_parser(subparsers)`` which registers its subcommand and
sets ``func`` to a ``run(args) -> int`` callable; the return value is the exit code.
Errors a user can fix are raised as ``common.errors.UserError`` and printed as one line
(common.cli).
"""
from __future__ import annotations

import argparse
import sys

from common import cli


def build_parser() -> argparse.ArgumentParser:
    from shard_builder import build, demo_tree, download, verify

    parser = argparse.ArgumentParser(prog="python -m shard_builder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (build, verify, download, demo_tree):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: args.func(args), interrupted="rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
