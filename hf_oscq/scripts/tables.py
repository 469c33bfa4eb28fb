"""The recipes' cross-bit tables as they print and write them (`cross_bit.md`), and which baselines an export may
record next to the main run: only those measured alike (`hf_oscq.provenance`)."""

from __future__ import annotations

import logging

from ..provenance import ACCURACY, describe, group_by_provenance, sentence
from ..quantization.ptq import format_cross_bit_table
from ..training.methods import comparison_key

logger = logging.getLogger(__name__)


def comparable_runs(tables: dict, provenances: dict, main: str) -> dict:
    """The baselines' tables measured as the main run's was (`provenance.matches`): what an export may record as
    its comparisons; any other is left out, with a warning."""
    kept = {}
    for method, table in tables.items():
        if method == main:
            continue
        if provenances[method].matches(provenances[main]):
            kept[comparison_key(method)] = table
        else:
            logger.warning(
                "%s was measured on %s, not as %s was: left out of the export's comparisons",
                method,
                provenances[method].describe(),
                main,
            )
    return kept


def cross_bit_markdown(tables: dict, provenances: dict, training, tags: dict[str, str] | None = None) -> str:
    """The recipe's tables as it prints them and writes them to `cross_bit.md`: the runs measured alike in one table
    (one row per run, labelled as in the docs: `oscillation regularizer @3`, `QAT @3`, `FP + PTQ`, `KURE (lambda
    1.0)`: `tags[method]`, by default the tag of the run's arguments `runs.run_arguments` makes), captioned with what
    they were measured on; a run measured otherwise gets its own captioned table."""
    from pathlib import Path

    from .runs import run_arguments, run_tag

    tags = tags or {}
    labelled = [
        (
            tags.get(method) or run_tag(run_arguments(training, Path(training.output_dir), method)),
            table,
            provenances[method],
        )
        for method, table in tables.items()
    ]
    blocks = []
    for provenance, rows in group_by_provenance(labelled):
        metric = provenance.metric if provenance is not None else ACCURACY
        caption = (
            f"{sentence(describe(provenance, metric))}. Columns: full precision (fp) and post-training rounded to "
            "each bit-width (w2 = 2 bits, ...)."
        )
        blocks.append(f"{caption}\n\n{format_cross_bit_table(rows, metric)}")
    return "\n\n".join(blocks)
