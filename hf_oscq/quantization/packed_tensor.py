"""`PackedWeight`: a weight held in memory as its b-bit packed codes and scales, dequantized where it is used.

A `PackedWeight` is a tensor subclass (the torchao weight-only pattern): a module keeps its class and its `weight`
parameter, whose shape and dtype stay the logical float ones, while the storage is the uint8 bit stream of the
checkpoint (quantization/packing.py) plus the float32 scales. `F.linear`, `F.conv1d/2d/3d`, `torch.addmm` (GPT-2's
`Conv1D`) and `torch.matmul` dequantize the whole weight into a temporary; `F.embedding` dequantizes only the rows it
looks up. Any other operation sees the dequantized values; operations that would write into the weight are refused.

Scales cover equal consecutive blocks of the output-channel-first codes (quantization/layout.py): one block per
tensor (`scale.numel() == 1`), per output channel (`(out, 1, ...)`), or per group of input features (`(out, groups)`);
for GPT-2's `Conv1D` (`out_dim=1`) the output channels are the weight's columns. Dequantization multiplies in
float32, then casts to the logical dtype, which gives exactly `quantize_model`'s weights in every dtype.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map

from .packing import dequantize_packed, dequantize_packed_rows

_aten = torch.ops.aten
# Functions whose weight argument is used whole: they run on the dequantized weight.
_DENSE_FUNCTIONS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d, torch.addmm, torch.matmul, torch.mm})
# aten operations that return the same packed weight (views, copies, moves, casts of the logical dtype).
_ALIASING = frozenset({_aten.detach.default, _aten.alias.default, _aten.clone.default})


class PackedWeight(torch.Tensor):
    """A weight stored as b-bit packed codes and scales that behaves as its dequantized float tensor.

    Args:
        packed: 1-D uint8 bit stream of the codes (the layout of hf_oscq/packing.py).
        scale: float scales (float32 as written; older checkpoints carry the weight's dtype).
        bits: bit-width in [2, 8].
        shape: the logical weight shape.
        dtype: the logical float dtype (what forward passes compute in).
        out_dim: the output-channel dimension of the weight (1 for GPT-2's `Conv1D`), which per-channel and group-wise
            scales follow.

    Example:
        ```python
        codes, scale = hf_oscq.quantize_codes(linear.weight, 3)
        weight = PackedWeight(hf_oscq.pack_codes(codes, 3), scale, 3, linear.weight.shape, linear.weight.dtype)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)  # linear(x) now unpacks on the fly
        ```
    """

    packed: torch.Tensor
    scale: torch.Tensor
    bits: int
    out_dim: int

    @staticmethod
    def __new__(cls, packed, scale, bits, shape, dtype, out_dim=0):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device, requires_grad=False)

    def __init__(
        self, packed: torch.Tensor, scale: torch.Tensor, bits: int, shape, dtype: torch.dtype, out_dim: int = 0
    ):
        self.packed = packed
        self.scale = scale
        self.bits = bits
        self.out_dim = out_dim

    def __repr__(self) -> str:
        return (
            f"PackedWeight(shape={list(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
            f"scale_shape={list(self.scale.shape)})"
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight `codes * scale`, in `dtype` (default: the logical dtype)."""
        return dequantize_packed(self.packed, self.bits, self.scale, self.shape, dtype or self.dtype, self.out_dim)

    @property
    def storage_bytes(self) -> int:
        """Bytes held in memory: the packed codes plus the scales."""
        return self.packed.untyped_storage().nbytes() + self.scale.untyped_storage().nbytes()

    # Traceable wrapper subclass protocol: `nn.Module.to()` swaps such parameters in place (ties survive).
    def __tensor_flatten__(self):
        return ["packed", "scale"], (self.bits, tuple(self.shape), self.dtype, self.out_dim)

    @classmethod
    def __tensor_unflatten__(cls, inner, metadata, outer_size, outer_stride):
        bits, shape, dtype, out_dim = metadata
        return cls(inner["packed"], inner["scale"], bits, shape, dtype, out_dim)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and isinstance(args[1], PackedWeight) and args[1].out_dim == 0:
            indices, weight = args[0], args[1]
            if kwargs.get("max_norm") is not None:
                raise NotImplementedError(
                    "Embedding(max_norm=...) renormalizes its weight in place, which a packed weight cannot do: "
                    "call model.dequantize() first."
                )
            return dequantize_packed_rows(
                weight.packed, weight.bits, weight.scale, weight.shape, weight.dtype, indices
            )
        if func is torch._has_compatible_shallow_copy_type:
            return type(args[0]) is type(args[1]) and args[0].shape == args[1].shape
        if func in _DENSE_FUNCTIONS:
            args, kwargs = tree_map(_dequantized, (args, kwargs))
            return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[0]
        if func in _ALIASING and isinstance(weight, PackedWeight):
            result = PackedWeight(
                func(weight.packed), func(weight.scale), weight.bits, weight.shape, weight.dtype, weight.out_dim
            )
            return return_and_correct_aliasing(func, args, kwargs, result)
        if func is _aten._to_copy.default and isinstance(weight, PackedWeight):
            device = kwargs.get("device") or weight.device
            dtype = kwargs.get("dtype") or weight.dtype
            if not dtype.is_floating_point:
                raise TypeError(f"A packed weight holds float values; it cannot be cast to {dtype}.")
            moved = PackedWeight(
                weight.packed.to(device), weight.scale.to(device), weight.bits, weight.shape, dtype, weight.out_dim
            )
            return return_and_correct_aliasing(func, args, kwargs, moved)
        if func._schema.is_mutable:
            raise RuntimeError(
                f"{func} would write into a packed weight, which holds read-only b-bit codes: call "
                "model.dequantize() first for float weights that can be trained or changed."
            )
        args, kwargs = tree_map(_dequantized, (args, kwargs))
        return func(*args, **kwargs)


def _dequantized(value):
    return value.dequantize() if isinstance(value, PackedWeight) else value


def weight_storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer storage of `model`, packed weights counted by what they hold."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if isinstance(tensor, PackedWeight):
            key, size = tensor.packed.untyped_storage().data_ptr(), tensor.storage_bytes
        else:
            key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        if key not in seen:
            seen.add(key)
            total += size
    return total
