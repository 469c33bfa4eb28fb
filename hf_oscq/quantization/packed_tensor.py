"""`PackedWeight`, the packed-weight codec: a weight held as its b-bit packed codes and scales, which owns the format.

* **Format.** Built from a float weight and a `QuantSpec` (`from_float`), or from the two tensors a checkpoint stores
  (`from_checkpoint`: `NAME` holds the codes in the bit stream of packing.py, shaped `packed_shape`, and
  `NAME_scale` the float32 scales in layout.py's shape), checked on the way in (`checkpoint_problem`); written back
  as those two tensors (`checkpoint_tensors`). Nothing else in hf_oscq packs codes.
* **Runtime.** A tensor subclass (the torchao weight-only pattern): a module keeps its class and its `weight`
  parameter, whose shape and dtype stay the logical float ones, while memory holds only the packed codes and
  scales. `F.linear`, `torch.addmm` / `torch.matmul` (GPT-2's `Conv1D`) and the convolutions run on packed_ops.py
  (compiled CPU kernels that never form the float weight at small batch sizes, torch operations otherwise);
  `F.embedding` dequantizes only the rows it looks up; any other operation sees the dequantized values; operations
  that would write into the weight are refused, except copying another packed weight of the same format into it
  (`load_state_dict`). Casts keep it packed and change its logical dtype.

Scales cover equal consecutive blocks of the output-channel-first codes (layout.py): one block per tensor, per
output channel, or per group of input features; for GPT-2's `Conv1D` (`out_dim=1`) the output channels are the
weight's columns. Dequantization multiplies in float32, then casts to the logical dtype, which gives exactly
`quantize_model`'s weights in every dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map

from . import packed_ops
from .layout import expand_scale
from .packing import dequantize_packed_rows, pack_codes, packed_size, unpack_unsigned
from .primitives import quantize_codes
from .spec import QuantSpec, max_code

SCALE_SUFFIX = "_scale"  # "conv1.weight" holds the packed codes, "conv1.weight_scale" the scale(s)

_aten = torch.ops.aten
# Functions whose weight argument is used whole: they run on the dequantized weight (or a packed_ops kernel).
_DENSE_FUNCTIONS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d, torch.addmm, torch.matmul, torch.mm})
# aten operations that return the same packed weight (views, copies, moves, casts of the logical dtype).
_ALIASING = frozenset({_aten.detach.default, _aten.alias.default, _aten.clone.default})


def packed_shape(weight_shape: Sequence[int], bits: int) -> tuple[int, ...]:
    """Shape of the stored codes: `(bytes,)`, or `(1, bytes)` for a 1-D weight.

    The number of dimensions always differs from the weight's, so a plain `load_state_dict` (strict or not)
    raises a size mismatch instead of copying codes into a float weight.
    """
    shape = tuple(weight_shape)
    size = packed_size(math.prod(shape), bits)
    return (1, size) if len(shape) == 1 else (size,)


def scale_problem(
    scale: torch.Tensor, codes: torch.Tensor, bits: int, shape: Sequence[int], out_dim: int = 0
) -> str | None:
    """What is wrong with the scales of a packed weight of logical `shape` (ending the sentence "The scale ..."),
    `None` when nothing is: they must have a float dtype and a number of values some layout of `shape` has, be
    finite and non-negative, and be 0 only where every code they multiply is 0 (a zero scale over other codes would
    zero those weights). Checked for every layout: per tensor, per channel and group-wise, `out_dim` 0 and 1. Whether
    their shape is the one the checkpoint's spec gives is the loader's check (`layout.scale_shape`).
    """
    shape = tuple(shape)
    numel, out = math.prod(shape), (shape[out_dim] if shape else 1)
    if not scale.is_floating_point():
        return f"has dtype {scale.dtype}, not a float dtype"
    if scale.numel() != 1 and not (out and scale.numel() % out == 0 and (numel // out) % (scale.numel() // out) == 0):
        return f"holds {scale.numel()} values, which no layout of a weight of shape {list(shape)} has"
    if not bool(torch.isfinite(scale).all()):
        return "holds NaN or Inf"
    if bool((scale < 0).any()):
        return f"holds a negative value ({float(scale.min()):.3g})"
    zero = scale == 0
    if bool(zero.any()) and numel:
        unsigned = unpack_unsigned(codes.reshape(-1), bits, numel).reshape(shape)
        covered = expand_scale(zero.to(torch.uint8), shape, out_dim).expand(shape).bool()
        if bool((unsigned[covered] != max_code(bits)).any()):
            return "is 0 where its codes are not all 0, which would zero those weights"
    return None


def checkpoint_problem(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, shape: Sequence[int], out_dim: int = 0
) -> str | None:
    """What is wrong with the two stored tensors of one packed weight, `None` when nothing is: the codes (dtype,
    byte count, values past `2 * max_code(bits)`, non-zero padding bits: `packing.invalid_packed_codes`), then the
    scales (`scale_problem`)."""
    problem = packed_ops.invalid_codes(codes, bits, math.prod(tuple(shape)))
    if problem is not None:
        return f"its codes hold {problem}"
    problem = scale_problem(scale, codes, bits, shape, out_dim)
    return None if problem is None else f"its scale {problem}"


class PackedWeight(torch.Tensor):
    """A weight stored as b-bit packed codes and scales that behaves as its dequantized float tensor.

    Args:
        packed: 1-D uint8 bit stream of the codes (the layout of hf_oscq/quantization/packing.py).
        scale: float scales (float32 as written; older checkpoints carry the weight's dtype).
        bits: bit-width in [2, 8].
        shape: the logical weight shape.
        dtype: the logical float dtype (what forward passes compute in).
        out_dim: the output-channel dimension of the weight (1 for GPT-2's `Conv1D`), which per-channel and group-wise
            scales follow.

    Example:
        ```python
        weight = PackedWeight.from_float(linear.weight, QuantSpec(3))
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)  # linear(x) now reads the packed codes
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

    @classmethod
    def from_float(cls, weight: torch.Tensor, spec: QuantSpec, out_dim: int = 0) -> PackedWeight:
        """The packed weight of `weight` under `spec` (its bit-width and granularity): the codes and scales of
        `quantize_codes`, so that it dequantizes to exactly `quantize_model`'s weight.

        Args:
            weight: the float weight (any float dtype; the logical dtype of the result).
            spec: how to quantize (its module patterns are not used here).
            out_dim: the output-channel dimension of `weight` (`selection.output_dim`).
        """
        codes, scale = quantize_codes(weight.detach(), spec=spec, out_dim=out_dim)
        packed = pack_codes(codes, spec.bits).to(weight.device)
        return cls(packed, scale, spec.bits, weight.shape, weight.dtype, out_dim)

    @classmethod
    def from_checkpoint(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bits: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out_dim: int = 0,
        name: str = "weight",
    ) -> PackedWeight:
        """The packed weight of the checkpoint tensors `NAME` (`codes`) and `NAME_scale` (`scale`).

        Raises:
            OscqValueError: naming `name`, for what `checkpoint_problem` finds.
        """
        from ..errors import OscqValueError

        problem = checkpoint_problem(codes, scale, bits, shape, out_dim)
        if problem is not None:
            raise OscqValueError(
                f"The packed weight {name!r} is invalid: {problem}. The file is corrupted or was packed at another "
                "bit-width: export the model again."
            )
        return cls(codes.reshape(-1), scale, bits, tuple(shape), dtype, out_dim)

    def checkpoint_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """`{name: codes, name + "_scale": scales}` as a checkpoint stores them (views of this weight's storage)."""
        return {name: self.packed.view(packed_shape(self.shape, self.bits)), name + SCALE_SUFFIX: self.scale}

    def __repr__(self) -> str:
        return (
            f"PackedWeight(shape={list(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
            f"scale_shape={list(self.scale.shape)})"
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight `codes * scale`, in `dtype` (default: the logical dtype)."""
        return packed_ops.dequantize(self, dtype or self.dtype)

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
                from ..errors import OscqValueError

                raise OscqValueError(
                    "Embedding(max_norm=...) renormalizes its weight in place, which a packed weight cannot do: "
                    "call model.dequantize() first."
                )
            return dequantize_packed_rows(
                weight.packed, weight.bits, weight.scale, weight.shape, weight.dtype, indices
            )
        if func is torch._has_compatible_shallow_copy_type:
            return type(args[0]) is type(args[1]) and args[0].shape == args[1].shape
        if func in _DENSE_FUNCTIONS:
            product = _packed_product(func, args, kwargs)
            if product is not None:
                return product
            args, kwargs = tree_map(_dequantized, (args, kwargs))
            return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[0] if args else None
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
        if func is _aten.copy_.default and isinstance(weight, PackedWeight) and _same_format(weight, args[1]):
            weight.packed.copy_(args[1].packed)  # load_state_dict of a packed state dict into a packed model
            weight.scale.copy_(args[1].scale)
            packed_ops.forget(weight)
            return weight
        if func._schema.is_mutable and _writes_packed(func, args, kwargs):
            raise RuntimeError(
                f"{func} would write into a packed weight, which holds read-only b-bit codes: call "
                "model.dequantize() first for float weights that can be trained or changed."
            )
        args, kwargs = tree_map(_dequantized, (args, kwargs))
        return func(*args, **kwargs)


def _packed_product(func, args, kwargs) -> torch.Tensor | None:
    """`func` on packed_ops when it is a plain product of an input with a packed weight, else None."""
    if func is F.linear and len(args) >= 2 and not isinstance(args[0], PackedWeight):
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if isinstance(args[1], PackedWeight) and not isinstance(bias, PackedWeight) and set(kwargs) <= {"bias"}:
            return packed_ops.linear(args[0], args[1], bias)
    if func is torch.addmm and len(args) == 3 and not kwargs and not isinstance(args[1], PackedWeight):
        if isinstance(args[2], PackedWeight) and args[2].out_dim == 1 and not isinstance(args[0], PackedWeight):
            return packed_ops.matmul(args[1], args[2]) + args[0]
    if func in (torch.matmul, torch.mm) and len(args) == 2 and not kwargs and not isinstance(args[0], PackedWeight):
        if isinstance(args[1], PackedWeight) and args[1].out_dim == 1:
            return packed_ops.matmul(args[0], args[1])
    return None


def _same_format(weight: PackedWeight, source) -> bool:
    return (
        isinstance(source, PackedWeight)
        and (source.bits, source.out_dim, tuple(source.shape)) == (weight.bits, weight.out_dim, tuple(weight.shape))
        and source.packed.shape == weight.packed.shape
        and source.scale.shape == weight.scale.shape
    )


def _writes_packed(func, args, kwargs) -> bool:
    """Whether `func` writes into a packed weight argument (its mutated arguments per the schema)."""
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        if isinstance(value, PackedWeight):
            return True
    return False


def _dequantized(value):
    return value.dequantize() if isinstance(value, PackedWeight) else value


def weight_storage_bytes(model: torch.nn.Module, buffers: bool = True) -> int:
    """Bytes of every distinct parameter (and buffer) storage of `model`, packed weights counted by what they hold:
    their codes and scales."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + (list(model.buffers()) if buffers else []):
        if isinstance(tensor, PackedWeight):
            key, size = tensor.packed.untyped_storage().data_ptr(), tensor.storage_bytes
        else:
            key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        if key not in seen:
            seen.add(key)
            total += size
    return total


# `torch.load` (`weights_only=True`, torch's default) may rebuild `PackedWeight`s of a saved state dict: rebuilding
# one sets only its codes, scales, bit-width and output dimension. `import hf_oscq` imports this module as soon as
# torch is imported (hf_oscq/__init__.py).
torch.serialization.add_safe_globals([PackedWeight])
