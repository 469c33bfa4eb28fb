"""The Text tab: one prompt, every bit-width of a language-model family side by side: its greedy continuation and the
perplexity it gives the prompt."""

from __future__ import annotations

import math

import torch

from .boundary import on_page
from .families import Family

TEXT_HEADERS = ["checkpoint", "bits", "continuation", "prompt perplexity"]
MAX_PROMPT_CHARACTERS = 2000
MAX_NEW_TOKENS = 200


def is_language_model(family: Family) -> bool:
    """Whether the family is a causal language model with its tokenizer."""
    return family.tokenizer is not None


def prompt_perplexity(model, ids: torch.Tensor) -> float | None:
    """`exp` of the mean next-token cross-entropy of `ids` (1, n) under `model`; `None` for fewer than 2 tokens."""
    if ids.shape[1] < 2:
        return None
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(float(loss))


@on_page(lambda message: (message, []))
def generate_view(
    families: dict[str, Family], family_name: str | None, prompt: str | None, max_new_tokens: int | float | None
) -> tuple[str, list[list]]:
    """The Text tab: `(message, rows [checkpoint, bits, continuation, prompt perplexity])`, full precision first."""
    family = families.get(family_name or "")
    if family is None or not is_language_model(family):
        return f"⚠️ No language-model family named {family_name!r} is loaded; pick one from the list.", []
    prompt = (prompt or "").strip()
    if not prompt:
        return "⚠️ Type a prompt first.", []
    if len(prompt) > MAX_PROMPT_CHARACTERS:
        return f"⚠️ The prompt has {len(prompt)} characters; keep it under {MAX_PROMPT_CHARACTERS}.", []
    try:
        new_tokens = int(max_new_tokens or 0)
    except (TypeError, ValueError):
        new_tokens = 0
    if not 1 <= new_tokens <= MAX_NEW_TOKENS:
        return f"⚠️ Pick between 1 and {MAX_NEW_TOKENS} new tokens (got {max_new_tokens!r}).", []
    tokenizer = family.tokenizer
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    rows = []
    for variant in family.loaded:
        with torch.no_grad():
            out = variant.model.generate(
                ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        continuation = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        perplexity = prompt_perplexity(variant.model, ids)
        rows.append([variant.name, variant.bits, continuation, None if perplexity is None else round(perplexity, 3)])
    return f"{family.name}: greedy continuations of a {ids.shape[1]}-token prompt by {len(rows)} checkpoints.", rows
