"""Publishes the Space: `python space/deploy.py --space ORG/NAME --models ORG/vit-digits,ORG/vit-digits-qat`.

hf_oscq is not on PyPI, so the package source is uploaded next to `app.py` (Python imports it from there), and the
models are written into the README front matter, where the app reads them. Everything is prepared locally before the
single commit; run it again to update the Space.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, SpaceCard
from huggingface_hub.utils import validate_repo_id

from hf_oscq.errors import OscqValueError

SPACE_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = SPACE_DIR.parent / "hf_oscq"
SPACE_FILES = ("app.py", "requirements.txt", "oscq_space/*.py", "examples/*.png", "examples/examples.json")
PACKAGE_FILES = ("**/*.py", "templates/*")


def plan_upload(models: list[str]) -> list[CommitOperationAdd]:
    """The files of the Space: the app, its README with `models` set, the examples and the hf_oscq source.

    Raises:
        OscqValueError: for an invalid repo id in `models`, or no models.
    """
    if not models:
        raise OscqValueError(
            "Pass the Hub repo ids of the parent models the Space shows: --models ORG/NAME[,ORG/NAME2]."
        )
    for repo_id in models:
        try:
            validate_repo_id(repo_id)
        except ValueError as error:
            raise OscqValueError(f"--models {repo_id!r} is not a Hub repo id (ORG/NAME): {error}") from None
    card = SpaceCard.load(SPACE_DIR / "README.md")
    card.data.models = list(models)
    operations = [CommitOperationAdd("README.md", str(card).encode())]
    for root, patterns, prefix in ((SPACE_DIR, SPACE_FILES, ""), (PACKAGE_DIR, PACKAGE_FILES, "hf_oscq/")):
        for path in sorted({path for pattern in patterns for path in root.glob(pattern) if path.is_file()}):
            operations.append(CommitOperationAdd(prefix + path.relative_to(root).as_posix(), str(path)))
    return operations


def deploy(space_id: str, models: list[str], private: bool = False) -> str:
    """Creates (or updates) the Gradio Space `space_id` in one commit and returns its URL."""
    validate_repo_id(space_id)
    operations = plan_upload(models)
    api = HfApi()
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    api.create_commit(space_id, operations, commit_message="Update the hf_oscq Space", repo_type="space")
    return f"https://huggingface.co/spaces/{space_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="the Space's repo id, ORG/NAME")
    parser.add_argument("--models", required=True, help="comma-separated parent model repo ids")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    models = [model.strip() for model in args.models.split(",") if model.strip()]
    sys.stdout.write(deploy(args.space, models, args.private) + "\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("deploy.py", main))
