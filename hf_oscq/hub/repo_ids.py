"""Hub repository ids of an export's family: `ORG/NAME` for the parent, `ORG/NAME-w{b}` for each bit-width."""

from __future__ import annotations

from collections.abc import Iterable

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..errors import OscqValueError
from ..quantization.variants import FULL_PRECISION, variant_repo_id


def check_repo_id(repo_id: str, variants: Iterable[str] = (FULL_PRECISION,)) -> None:
    """Checks that `repo_id` and the repository of every variant are valid Hub ids (huggingface_hub's rules: no
    `..`, no `--`, at most 96 characters, ...), so that names derived from them are plain names too.

    Raises:
        OscqValueError: naming the id at fault.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise OscqValueError(f"repo_id must be ORG/NAME (a user or organization, then a model name), got {repo_id!r}.")
    for candidate in [variant_repo_id(repo_id, name) for name in variants]:
        try:
            validate_repo_id(candidate)
        except HFValidationError as error:
            raise OscqValueError(f"Invalid Hub repository name {candidate!r}: {error}") from None
