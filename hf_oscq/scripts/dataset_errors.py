"""Unusable data, said in one line: what a dataset load or an image decode raises on data it cannot use (a folder
without data files, an empty split, an undecodable image, text or parquet file) becomes an `OscqValueError` naming
the dataset and how to fix it. Used around every load of a user's dataset: `hf-oscq eval`, the recipes' `--data_dir`,
their text datasets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import OscqError, OscqValueError


def _unusable_data_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "this data cannot be used" rather than a bug: datasets' empty-folder and
    generation errors, PIL's undecodable image, undecodable text, and `ValueError`s of the load itself (pyarrow's
    `ArrowInvalid` for a file that is not parquet, datasets' "corresponds to no data" for an empty split)."""
    import datasets
    from PIL import UnidentifiedImageError

    return (
        datasets.data_files.EmptyDatasetError,
        datasets.exceptions.DatasetGenerationError,
        UnidentifiedImageError,
        UnicodeDecodeError,
        ValueError,
    )


@contextlib.contextmanager
def dataset_errors(source: str, fix: str) -> Iterator[None]:
    """Turns the errors of unusable data raised inside (a dataset load or decode, nothing else) into one-line
    `OscqValueError`s: `<source> cannot be used (<error type>: <its first line>): <fix>`.

    Args:
        source: the dataset as the user named it (`--dataset /data/images`).
        fix: what to do about it.
    """
    try:
        yield
    except OscqError:
        raise
    except _unusable_data_errors() as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        raise OscqValueError(f"{source} cannot be used ({type(error).__name__}: {reason}): {fix}") from None
