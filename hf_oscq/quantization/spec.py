"""`QuantSpec`: how to quantize which weights, as one frozen value.

Every function that quantizes (quantizer, penalty, QAT, PTQ, export, tracking, the checkpoint loader) takes a
`QuantSpec` as `spec=`; `OscillationConfig.quant_spec` builds it from the `osc_*` settings, and export manifests and
`quantization_config` serialize it (`to_dict` / `from_dict`). Where users call by hand, `bits=` and the loose keywords
(`per_channel`, `target_modules`, `exclude_modules`) remain a shorthand for it: `quantize_model(model, 3)` is
`quantize_model(model, spec=QuantSpec(bits=3))`. A new way to quantize (asymmetric grids, say) is a new field or
granularity here, validated in `__post_init__`.

Pure Python: importing this module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import OscqValueError

MIN_BITS = 2
MAX_BITS = 8
DEFAULT_EVAL_BITS = (2, 3, 4, 5, 6, 7, 8)
# Training images forwarded to re-estimate BatchNorm statistics after rounding, by default (Trainer, recipes, CLI):
# a few hundred give the statistics of the rounded network (docs/RESULTS.md uses 250 and 500).
DEFAULT_BN_RECALIBRATION_SAMPLES = 512
# Preset matching the paper's reference code: every module that owns a `.weight` (norm layers included).
ALL_WEIGHTS = "all-weights"
# Every Linear / Conv / Embedding layer, the token embeddings and LM head of a language model included.
ALL_LAYERS = "all-layers"
PER_TENSOR = "per_tensor"
PER_CHANNEL = "per_channel"
GROUP = "group"
GRANULARITIES = (PER_TENSOR, PER_CHANNEL, GROUP)

Patterns = str | Sequence[str] | None


def validate_bits(bits: object) -> int:
    """Checks that `bits` is an integer bit-width the quantizer supports and returns it as `int`.

    Raises:
        OscqValueError: when `bits` is not an integer in [2, 8].
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise OscqValueError(
            f"bits must be an integer between {MIN_BITS} and {MAX_BITS} (2 = ternary, 8 = 255 levels), got {bits!r}."
        )
    return int(bits)


def max_code(bits: int) -> int:
    """Largest integer code at `bits` bits: codes lie in [-max_code, +max_code], i.e. 2**bits - 1 levels."""
    return 2 ** (validate_bits(bits) - 1) - 1


def _patterns(name: str, patterns: Patterns) -> tuple[str, ...] | None:
    """`patterns` as a tuple of strings, `None` for none (an empty list selects like `None`)."""
    if patterns is None:
        return None
    listed = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not all(isinstance(pattern, str) and pattern for pattern in listed):
        raise OscqValueError(
            f"{name} must be a module name, dotted suffix or regex, or a list of them, got {patterns!r}."
        )
    return listed or None


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized, and which: the paper's symmetric uniform quantizer `q_b(W) = s * round(W / s)`
    with a max-magnitude scale `s = max|W| / (2**(b-1) - 1)` (PAPER.md section 1), round-half-to-even.

    Parameters:
        bits (`int`, defaults to 3):
            Bit-width in [2, 8]: integer codes in [-(2**(bits-1) - 1), 2**(bits-1) - 1], i.e. `2**bits - 1` levels.
        granularity (`str`, defaults to `"per_tensor"`):
            `"per_tensor"`: one scale per weight tensor (the paper's); `"per_channel"`: one scale per output
            channel; `"group"`: one scale per `group_size` consecutive input features of each output channel (the
            group-wise scales of LLM quantizers). The output channel is dim 0 of Linear, Conv and Embedding weights
            and dim 1 of GPT-2's `Conv1D` (stored `(in, out)`); input features are the other dimensions, flattened
            (for a Conv, `in * kernel` per output channel).
        target_modules (`str` or `list[str]`, *optional*):
            Modules whose weights are quantized: module names, dotted suffixes or regexes matching whole module
            names; `"all-weights"` for every module with a `.weight` (the paper's reference code). `None`: the
            weights of Linear, Conv1d/2d/3d, Embedding (and GPT-2's Conv1D) layers, in a language model only its
            Linear / Conv1D layers without `lm_head` (`"all-layers"` adds the embeddings and `lm_head`). Stored as
            a tuple.
        exclude_modules (`str` or `list[str]`, *optional*):
            Modules left in float, same syntax. Stored as a tuple.
        group_size (`int`, *optional*):
            Input features per scale with `granularity="group"` (32-128 is usual for language models); must divide
            the input features of every selected weight. Only with `"group"`.

    Raises:
        OscqValueError: for a bit-width outside [2, 8], an unknown granularity or patterns that are not strings.
    """

    bits: int = 3
    granularity: str = PER_TENSOR
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | None = None
    group_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "bits", validate_bits(self.bits))
        if self.granularity not in GRANULARITIES:
            raise OscqValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}.")
        if self.granularity == GROUP:
            size = self.group_size
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise OscqValueError(
                    f"granularity='group' needs group_size, a positive integer number of input features per scale "
                    f"(e.g. 32, 64 or 128), got {size!r}."
                )
            object.__setattr__(self, "group_size", int(size))
        elif self.group_size is not None:
            raise OscqValueError(
                f"group_size={self.group_size!r} is only used with granularity='group', not {self.granularity!r}: "
                "pass granularity='group' or drop group_size."
            )
        object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules))
        object.__setattr__(self, "exclude_modules", _patterns("exclude_modules", self.exclude_modules))

    @property
    def per_channel(self) -> bool:
        """Whether each output channel has its own scale."""
        return self.granularity == PER_CHANNEL

    @property
    def per_tensor(self) -> bool:
        """Whether the whole tensor shares one scale."""
        return self.granularity == PER_TENSOR

    @property
    def describe_granularity(self) -> str:
        """The scale granularity in words, for cards and logs."""
        if self.granularity == GROUP:
            return f"one scale per group of {self.group_size} input features of each output channel"
        return "one scale per output channel" if self.per_channel else "one scale per tensor"

    @property
    def max_code(self) -> int:
        """The largest integer code, `2**(bits-1) - 1`."""
        return 2 ** (self.bits - 1) - 1

    def with_bits(self, bits: int) -> QuantSpec:
        """The same spec at another bit-width (how cross-bit evaluation and export go through the bit-widths)."""
        return self if bits == self.bits else dataclasses.replace(self, bits=bits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields. `per_channel` repeats the granularity for readers of the first format version;
        `group_size` is written for group-wise specs only."""
        fields = {
            "bits": self.bits,
            "granularity": self.granularity,
            "per_channel": self.per_channel,
            "target_modules": list(self.target_modules) if self.target_modules is not None else None,
            "exclude_modules": list(self.exclude_modules) if self.exclude_modules is not None else None,
        }
        if self.group_size is not None:
            fields["group_size"] = self.group_size
        return fields

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """The spec `to_dict` wrote, or the fields of a manifest / `quantization_config` that predates
        `granularity` (only `per_channel`). Other keys are ignored.

        Raises:
            OscqValueError: for invalid fields, or a `granularity` contradicting `per_channel`.
        """
        if "bits" not in data:
            raise OscqValueError(f"A quantization spec needs its bit-width; got only {sorted(data)}.")
        granularity = data.get("granularity")
        per_channel = data.get("per_channel")
        if granularity is None:
            granularity = PER_CHANNEL if per_channel else PER_TENSOR
        elif per_channel is not None and bool(per_channel) != (granularity == PER_CHANNEL):
            raise OscqValueError(f"granularity {granularity!r} contradicts per_channel={per_channel!r}.")
        return cls(
            data["bits"], granularity, data.get("target_modules"), data.get("exclude_modules"), data.get("group_size")
        )


def resolve_spec(
    caller: str,
    spec: QuantSpec | None,
    bits: int | None = None,
    per_channel: bool | None = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
) -> QuantSpec:
    """The spec of a call: `spec` itself, or one built from the shorthand keywords (never both).

    Raises:
        TypeError: when both are given, or `spec` is not a `QuantSpec`.
        OscqValueError: when neither is given, or for invalid shorthand values.
    """
    loose = {
        name: value
        for name, value in (
            ("bits", bits),
            ("per_channel", per_channel),
            ("target_modules", target_modules),
            ("exclude_modules", exclude_modules),
        )
        if value is not None
    }
    if isinstance(bits, QuantSpec):
        raise TypeError(f"{caller}: pass the QuantSpec as spec=..., not as bits.")
    if spec is not None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"{caller}: spec must be a QuantSpec, got {type(spec).__name__}.")
        if loose:
            raise TypeError(f"{caller}: pass spec=QuantSpec(...) or {', '.join(loose)}=..., not both.")
        return spec
    if bits is None:
        raise OscqValueError(
            f"{caller} needs bits (an integer between {MIN_BITS} and {MAX_BITS}) or spec=QuantSpec(...), got neither."
        )
    return QuantSpec(bits, PER_CHANNEL if per_channel else PER_TENSOR, target_modules, exclude_modules)
