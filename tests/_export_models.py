"""Tiny seeded models the export, checkpoint and CLI tests quantize: a ViT, timm's ResNet-18 (narrow), a Llama-style
decoder and GPT-2 (hidden size 32)."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

ALL_BITS = (2, 3, 4, 5, 6, 7, 8)


def tiny_vit(num_channels: int = 1, num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=num_channels,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def tiny_resnet18() -> TimmWrapperForImageClassification:
    """timm's resnet18 (BasicBlock, layers 2-2-2-2) with narrow channels, built from the config alone (no Hub)."""
    import timm

    torch.manual_seed(0)
    config = TimmWrapperConfig(
        architecture="resnet18",
        num_labels=5,
        model_args={"channels": (8, 16, 32, 64), "stem_width": 8},
        pretrained_cfg=timm.models.get_pretrained_cfg("resnet18").to_dict(),
    )
    model = TimmWrapperForImageClassification(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that re-estimating them changes the logits
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def tiny_llama(vocab_size: int = 257, tie_word_embeddings: bool = True) -> LlamaForCausalLM:
    """A 2-layer Llama-style decoder, hidden size 32, grouped-query attention; by default sized for the byte-level
    tokenizer (`hf_oscq.scripts.text.byte_tokenizer`, 257 tokens) with its input and output embeddings tied."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(tie_word_embeddings: bool = True) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (its Conv1D layers store weights `(in, out)`), hidden size 32, 50 tokens."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie_word_embeddings,
    )
    return GPT2LMHeadModel(config).eval()


def logits_of(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


# Outputs of a model holding packed weights agree with `quantize_model`'s to float32 reassociation: the compiled CPU
# kernels (hf_oscq/quantization/packed_ops.py) sum `scale * sum(code * x)` in another order than torch's matrix
# products, each output within 2 * fan_in * 2**-24 * sum(|w| |x|) of it. For the tiny models of the tests, that is
# far below PACKED_TOLERANCE of the largest output magnitude, while a wrong code or scale moves outputs by percents.
PACKED_TOLERANCE = 1e-5


def assert_packed_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """`actual` (a packed model's output) equals `expected` (the float model's with `quantize_model`'s weights) to
    float32 reassociation: within PACKED_TOLERANCE times the largest |expected|, element by element."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=PACKED_TOLERANCE * float(expected.abs().max()))
