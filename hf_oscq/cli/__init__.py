"""The `hf-oscq` command line: one subcommand module each, with an `add_parser(subparsers)` function.

Flags follow transformers' `HfArgumentParser`: words joined by underscores (`--repo_id`, `--max_eval_samples`), the
dashed spelling accepted as an alias (`--repo-id`); every flag has a help text. Every error hf_oscq raises on purpose
(`OscqError`: bad arguments, incomplete export folders, corrupted checkpoints, failed pushes) is printed as one line on
stderr, `hf-oscq <command>: error: <message>`, with exit code 1. Building the parser imports no heavy library, so
`hf-oscq --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib

from ..errors import OscqValueError, configure_logging, exit_code
from ..versions import __version__

# Modules providing subcommands; each defines add_parser(subparsers) and sets `func` on its parser.
COMMAND_MODULES = ("hf_oscq.cli.export", "hf_oscq.cli.eval", "hf_oscq.cli.push")


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> argparse.Action:
    """Adds `--name` (words joined by underscores) and, as HfArgumentParser does, its dashed alias `--na-me`.

    Raises:
        ValueError: for a flag without a help text or a name spelled with dashes.
    """
    if "-" in name or not kwargs.get("help"):
        raise ValueError(f"--{name}: flags are spelled with underscores and carry a help text.")
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    return parser.add_argument(*names, **kwargs)


def check_counts(args: argparse.Namespace, **minimums: int) -> None:
    """Checks integer flags before anything is loaded: each flag named in `minimums` that was given (not None) must be
    at least its minimum.

    Raises:
        OscqValueError: naming the first flag below its minimum.
    """
    for name, minimum in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise OscqValueError(f"--{name} must be at least {minimum}, got {value}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-oscq", description="Oscillation-regularized training and low-bit PTQ.")
    parser.add_argument("--version", action="version", version=f"hf-oscq {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `hf-oscq`; returns the exit code (1 for an `OscqError`, printed as one line on stderr)."""
    configure_logging()
    args = build_parser().parse_args(argv)
    return exit_code(f"hf-oscq {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
