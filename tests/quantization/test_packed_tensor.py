import copy
import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from hf_oscq import dequantize, pack_codes, quantize_codes
from hf_oscq.quantization.packed_tensor import PackedWeight, weight_storage_bytes


def _modules_and_inputs():
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.nn.Linear(13, 7), torch.randn(4, 13, generator=generator)),
        (torch.nn.Conv1d(3, 5, 3), torch.randn(2, 3, 9, generator=generator)),
        (torch.nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6, generator=generator)),
        (torch.nn.Conv3d(2, 3, 2), torch.randn(1, 2, 4, 4, 4, generator=generator)),
        (torch.nn.Embedding(11, 6), torch.randint(0, 11, (3, 4), generator=generator)),
        (Conv1D(9, 5), torch.randn(2, 3, 5, generator=generator)),  # GPT-2's transposed Linear
    ]


def _pack(module: torch.nn.Module, bits: int, per_channel: bool) -> torch.Tensor:
    """Replaces the module's weight by its packed codes; returns the float weight `codes * scale`."""
    weight = module.weight.detach()
    codes, scale = quantize_codes(weight, bits, per_channel, out_dim=0)
    packed = PackedWeight(pack_codes(codes, bits), scale, bits, weight.shape, weight.dtype)
    module.weight = torch.nn.Parameter(packed, requires_grad=False)
    return dequantize(codes, scale, out_dim=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_layer_type_computes_with_the_dequantized_weight(bits, per_channel):
    for module, inputs in _modules_and_inputs():
        reference = copy.deepcopy(module)
        values = _pack(module, bits, per_channel)
        with torch.no_grad():
            reference.weight.copy_(values)
            assert torch.equal(module(inputs), reference(inputs)), type(module).__name__
        assert isinstance(module.weight, torch.nn.Parameter) and isinstance(module.weight, PackedWeight)
        assert module.weight.shape == reference.weight.shape and module.weight.dtype == torch.float32
        assert set(module.state_dict()) == set(reference.state_dict())  # same names, same module tree


def test_memory_is_the_packed_codes_and_scales():
    module = torch.nn.Linear(100, 30, bias=False)
    _pack(module, 3, per_channel=True)
    assert module.weight.storage_bytes == math.ceil(3000 * 3 / 8) + 30 * 4
    assert weight_storage_bytes(module) == module.weight.storage_bytes


def test_dtype_casts_moves_and_copies_keep_it_packed_and_tied():
    embedding, head = torch.nn.Embedding(10, 16), torch.nn.Linear(16, 10, bias=False)
    values = _pack(embedding, 4, per_channel=False)
    head.weight = embedding.weight  # tied, as GPT-2's lm_head
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    copied = copy.deepcopy(model)
    assert copied["head"].weight is copied["embedding"].weight and isinstance(copied["head"].weight, PackedWeight)
    model.to(torch.bfloat16)
    weight = model["head"].weight
    assert weight is model["embedding"].weight and isinstance(weight, PackedWeight)
    assert weight.dtype == torch.bfloat16 and weight.scale.dtype == torch.float32  # the exact scale is kept
    assert torch.equal(weight.dequantize(), values.to(torch.bfloat16))
    out = model["head"](torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_other_operations_see_the_values_and_writes_are_refused():
    module = torch.nn.Linear(8, 4)
    values = _pack(module, 3, per_channel=False)
    assert torch.equal(module.weight.T, values.T) and torch.equal(module.weight * 2, values * 2)
    assert len(torch.unique(module.weight)) <= 7
    with pytest.raises(RuntimeError, match="model.dequantize"):
        module.weight.normal_()
    with pytest.raises(NotImplementedError, match="max_norm"):
        embedding = torch.nn.Embedding(5, 8, max_norm=1.0)
        _pack(embedding, 3, per_channel=False)
        embedding(torch.tensor([1]))
