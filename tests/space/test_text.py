"""The Space's Text tab on a language-model family: continuations and prompt perplexity at every bit-width."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_oscq
from hf_oscq import QuantSpec
from hf_oscq.scripts.text import byte_tokenizer

SPACE_DIR = Path(__file__).resolve().parents[2] / "space"
sys.path.insert(0, str(SPACE_DIR))

from oscq_space.families import load_families  # noqa: E402
from oscq_space.text import generate_view  # noqa: E402
from oscq_space.views import accuracy_view  # noqa: E402

SPEC = QuantSpec(3, "group", group_size=16)


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    metrics = {name: {"loss": 5.0, "perplexity": math.exp(5.0)} for name in ("fp", "w3", "w4")}
    out = hf_oscq.export_quantized(
        model, tmp_path_factory.mktemp("lm") / "export", bits=(3, 4), spec=SPEC, tokenizer=tokenizer, metrics=metrics
    )
    return model, tokenizer, out


def test_text_tab_generates_and_scores_the_prompt_at_every_bit_width(lm_export):
    model, tokenizer, out = lm_export
    families, problems = load_families([str(out)])
    assert problems == [] and families[0].tokenizer is not None
    by_name = {family.name: family for family in families}
    message, rows = generate_view(by_name, families[0].name, "And God said", 5)
    assert [row[:2] for row in rows] == [["fp", None], ["w4", 4], ["w3", 3]]
    ids = torch.tensor([list(b"And God said")])
    for _, bits, continuation, perplexity in rows:
        reference = model if bits is None else hf_oscq.quantize_model(model, spec=SPEC.with_bits(bits))
        with torch.no_grad():
            generated = reference.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=256)
            log_probs = torch.log_softmax(reference(ids).logits[0, :-1].double(), dim=-1)
        assert continuation == tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        expected = math.exp(-log_probs.gather(-1, ids[0, 1:, None]).mean().item())
        assert perplexity == pytest.approx(expected, rel=1e-3)
    assert "3 checkpoints" in message


def test_text_tab_bad_input_is_a_message(lm_export):
    families, _ = load_families([str(lm_export[2])])
    by_name = {family.name: family for family in families}
    name = families[0].name
    assert generate_view(by_name, "nope", "hi", 5) == (
        "⚠️ No language-model family named 'nope' is loaded; pick one from the list.",
        [],
    )
    assert generate_view(by_name, name, "   ", 5)[0] == "⚠️ Type a prompt first."
    assert "between 1 and 200" in generate_view(by_name, name, "hi", 0)[0]
    assert "under 2000" in generate_view(by_name, name, "x" * 2001, 5)[0]
    plot, table, message = accuracy_view(families)  # a language model records perplexity, not accuracy
    assert plot is None and table["data"] == [] and "accuracy" in message
