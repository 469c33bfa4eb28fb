"""The `hf-oscq` command line: one subcommand per module, each with an `add_parser(subparsers)` function."""

from __future__ import annotations

import argparse
import importlib
import logging

# Modules providing subcommands; each defines add_parser(subparsers) and sets `func` on its parser.
COMMAND_MODULES = ("hf_oscq.export_cli", "hf_oscq.hub_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-oscq", description="Oscillation-regularized training and low-bit PTQ.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
