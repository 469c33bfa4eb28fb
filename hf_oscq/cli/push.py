"""`hf-oscq push EXPORT_DIR --repo_id ORG/NAME`: publish an export folder on the Hugging Face Hub."""

from __future__ import annotations

import argparse
import sys

from ..hub import DEFAULT_LICENSE
from . import add_flag


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Publish an export folder: ORG/NAME (full precision), ORG/NAME-w{b} per bit-width, one collection.",
        description="Publish an export folder written by hf_oscq.export_quantized. The token comes from "
        "`hf auth login` or HF_TOKEN. Running the same command again after a failure resumes the push.",
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by export_quantized")
    add_flag(parser, "repo_id", required=True, metavar="ORG/NAME", help="Hub id of the full-precision parent")
    add_flag(parser, "dry_run", action="store_true", help="print what would be sent; send nothing")
    add_flag(parser, "private", action="store_true", help="create the repositories and collection as private")
    add_flag(parser, "license", default=DEFAULT_LICENSE, help="license id in the model cards")
    add_flag(parser, "collection_title", default=None, help="collection title (default: 'NAME (hf_oscq)')")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..hub.push import push_to_hub

    plan = push_to_hub(
        args.export_dir,
        args.repo_id,
        private=args.private,
        dry_run=args.dry_run,
        license=args.license,
        collection_title=args.collection_title,
    )
    if args.dry_run:
        sys.stdout.write("Dry run: nothing was created or uploaded. A push would do this:\n" + plan.describe() + "\n")
    else:
        pushed = ", ".join(f"https://huggingface.co/{repo.repo_id}" for repo in plan.repos)
        sys.stdout.write(f"Pushed {len(plan.repos)} repositories: {pushed}\n")
    return 0
