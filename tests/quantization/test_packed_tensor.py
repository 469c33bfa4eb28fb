import copy
import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from hf_oscq import OscqValueError, dequantize, pack_codes, quantize_codes
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
    with pytest.raises(OscqValueError, match="max_norm"):
        embedding = torch.nn.Embedding(5, 8, max_norm=1.0)
        _pack(embedding, 3, per_channel=False)
        embedding(torch.tensor([1]))


# The codec: from a float weight, to and from the two checkpoint tensors, and the checks on the way in.

LAYOUTS = [  # (weight shape, out_dim, spec fields)
    ((6, 16), 0, {}),
    ((6, 16), 0, {"granularity": "per_channel"}),
    ((6, 16), 0, {"granularity": "group", "group_size": 4}),
    ((16, 6), 1, {"granularity": "per_channel"}),  # GPT-2's Conv1D, stored (in, out)
    ((16, 6), 1, {"granularity": "group", "group_size": 4}),
    ((4, 2, 3, 3), 0, {"granularity": "group", "group_size": 9}),  # Conv2d
    ((13,), 0, {}),  # a 1-D weight: codes stored (1, bytes)
]


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize(("shape", "out_dim", "fields"), LAYOUTS)
def test_from_float_writes_and_reads_back_the_checkpoint_tensors(bits, shape, out_dim, fields):
    from hf_oscq import QuantSpec, unpack_codes
    from hf_oscq.quantization.packed_tensor import SCALE_SUFFIX

    spec = QuantSpec(bits, **fields)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    codes, scale = quantize_codes(weight, spec=spec, out_dim=out_dim)  # the reference quantizer
    tensors = PackedWeight.from_float(weight, spec, out_dim).checkpoint_tensors("layer.weight")
    assert set(tensors) == {"layer.weight", "layer.weight" + SCALE_SUFFIX}
    stored = tensors["layer.weight"]
    size = math.ceil(weight.numel() * bits / 8)
    assert stored.dtype == torch.uint8 and stored.shape == ((1, size) if len(shape) == 1 else (size,))
    assert torch.equal(unpack_codes(stored.reshape(-1), bits, shape), codes)
    assert torch.equal(tensors["layer.weight" + SCALE_SUFFIX], scale)
    loaded = PackedWeight.from_checkpoint(stored, scale, bits, shape, torch.float32, out_dim)
    assert loaded.shape == shape and loaded.out_dim == out_dim and loaded.bits == bits
    assert torch.equal(loaded.dequantize(), dequantize(codes, scale, out_dim=out_dim))


def _zero_a_block(codes, scale, out_dim):
    """The scales with the first output channel's (first group's) scale set to 0 over its non-zero codes."""
    broken = scale.clone()
    broken.reshape(broken.shape[0], -1)[0, 0] = 0.0
    assert bool((codes.movedim(out_dim, 0)[0] != 0).any())
    return broken


@pytest.mark.parametrize(("shape", "out_dim", "fields"), LAYOUTS[1:5])
def test_every_stored_fault_is_named_for_every_layout(shape, out_dim, fields):
    """Checked for per-channel and group-wise scales of weights whose output channels are dim 0 and dim 1: corrupted
    codes, non-finite, negative and zero scales (a zero scale is valid only over zero codes), a scale count no
    layout has."""
    from hf_oscq import QuantSpec
    from hf_oscq.quantization.packed_tensor import checkpoint_problem

    spec = QuantSpec(3, **fields)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    codes, scale = quantize_codes(weight, spec=spec, out_dim=out_dim)
    stored = pack_codes(codes, 3)
    assert checkpoint_problem(stored, scale, 3, shape, out_dim) is None
    corrupted = stored.clone()
    corrupted[0] = 0xFF  # all-ones 3-bit patterns
    faults = {
        "which no 3-bit code produces": (corrupted, scale),
        "holds NaN or Inf": (stored, scale.masked_fill(scale == scale.max(), float("nan"))),
        "holds a negative value": (stored, -scale),
        "is 0 where its codes are not all 0": (stored, _zero_a_block(codes, scale, out_dim)),
        "which no layout of a weight of shape": (stored, scale.reshape(-1)[:5]),
    }
    for message, (stored_codes, stored_scale) in faults.items():
        assert message in checkpoint_problem(stored_codes, stored_scale, 3, shape, out_dim), message
        with pytest.raises(OscqValueError, match=f"'layer.weight' is invalid: .*{message}"):
            PackedWeight.from_checkpoint(stored_codes, stored_scale, 3, shape, torch.float32, out_dim, "layer.weight")
    zero_weight = weight.clone()
    zero_weight.movedim(out_dim, 0)[0] = 0.0  # an all-zero output channel has scale 0, which is valid
    codes, scale = quantize_codes(zero_weight, spec=spec, out_dim=out_dim)
    assert bool((scale == 0).any()) and checkpoint_problem(pack_codes(codes, 3), scale, 3, shape, out_dim) is None


def test_load_state_dict_copies_packed_weights_and_fills_float_models():
    from hf_oscq import QuantSpec

    source, target, float_model = torch.nn.Linear(16, 4), torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)
    for module in (source, target):
        module.weight = torch.nn.Parameter(PackedWeight.from_float(module.weight, QuantSpec(4)), requires_grad=False)
    target.load_state_dict(source.state_dict())  # a packed model takes a packed state dict of the same format
    assert isinstance(target.weight, PackedWeight)
    assert torch.equal(target.weight.packed, source.weight.packed) and torch.equal(
        target.weight.scale, source.weight.scale
    )
    float_model.load_state_dict(source.state_dict())  # a float model takes the dequantized values
    assert type(float_model.weight) is torch.nn.Parameter and torch.equal(
        float_model.weight, source.weight.dequantize()
    )
    other_format = torch.nn.Linear(16, 4)
    other_format.weight = torch.nn.Parameter(PackedWeight.from_float(other_format.weight, QuantSpec(3)), False)
    with pytest.raises(RuntimeError, match="would write into a packed weight"):
        other_format.load_state_dict(source.state_dict())
