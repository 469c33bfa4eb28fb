"""Token-level loss of a causal language model over one evaluation pass: the sum of the next-token cross-entropies
over the number of predicted tokens, as `hf-oscq eval` computes it (`metrics.evaluate_perplexity`).

The Trainer's own `eval_loss` is a mean of per-batch means, which moves with the evaluation batch size and with
padding (a batch of short sequences weighs as much as one of long ones); this one does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

IGNORE_INDEX = -100  # transformers' label of positions without a loss (padding)


def shifted_labels(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The label each position predicts, `(batch, sequence)`, as transformers' causal-LM loss reads them:
    `shift_labels` when given, else `labels[..., 1:]` with the last position ignored; `None` without labels."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    labels = inputs.get("labels")
    if labels is None:
        return None
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def sequence_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum of token losses, number of tokens)` per sequence, both `(batch,)` float64.

    Args:
        logits: `(batch, sequence, vocabulary)` next-token logits.
        labels: `(batch, sequence)` the label each position predicts, `IGNORE_INDEX` where none.
    """
    losses = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels.to(logits.device), ignore_index=IGNORE_INDEX, reduction="none"
    )
    counted = labels.to(logits.device) != IGNORE_INDEX
    return losses.sum(-1).double(), counted.sum(-1).double()


class TokenLoss:
    """Accumulates the token-level loss of one evaluation pass; `reset()` starts the next one.

    Args:
        gather: gathers a per-sequence tensor from every process, dropping the samples a distributed sampler repeats
            to even out the last batch (the Trainer's `accelerator.gather_for_metrics`).
    """

    def __init__(self, gather: Callable[[Any], Any]):
        self._gather = gather
        self.reset()

    def reset(self) -> None:
        self.total, self.tokens = 0.0, 0

    def add(self, outputs: Any, labels: torch.Tensor | None) -> None:
        """Adds one batch: the model `outputs` (holding `logits`) and its `shifted_labels`; a batch without either
        is skipped."""
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if labels is None or logits is None:
            return
        with torch.no_grad():
            total, tokens = self._gather(sequence_token_losses(logits.detach(), labels))
        self.total += float(total.sum())
        self.tokens += int(tokens.sum())

    def metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}_loss`, `{prefix}_perplexity` and `{prefix}_tokens` of the pass; `{}` when it counted none."""
        if not self.tokens:
            return {}
        loss = self.total / self.tokens
        # exp overflows float64 past ~709: a diverged model reports an infinite perplexity
        perplexity = math.exp(loss) if loss < 700 else math.inf
        return {f"{prefix}_loss": loss, f"{prefix}_perplexity": perplexity, f"{prefix}_tokens": self.tokens}
