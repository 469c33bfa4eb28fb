"""The forward operations of packed weights on both paths: the compiled CPU kernels (quantization/kernel_build.py,
packed_ops.py) and the torch fallback (no compiler, or HF_OSCQ_DISABLE_KERNELS=1).

Places covered: bit-widths 2..8; per-tensor, per-channel and group-wise scales; Linear (output channels in dim 0),
GPT-2's Conv1D (out_dim 1), Conv2d and Embedding weights; row counts that take the fused kernels (1 to MAX_ROWS)
and more (dequantize, then torch's product); row lengths that start on whole words of codes and ones that do not;
the build, its cache and the one warning where nothing builds.

References are independent of the code under test: `quantize_codes` + `dequantize` (the reference quantizer) and
torch's own float products. Dequantization is exact on both paths; the fused kernels' outputs are within the float32
forward-error bound of a dot product of length K, |y - y_ref| <= 2 * K * 2**-24 * sum(|w| |x|) (Higham, "Accuracy
and Stability of Numerical Algorithms", 3.1), the reference itself being one such sum.
"""

import logging
import math

import pytest
import torch
from _export_models import assert_packed_close
from torch.nn import functional as F

import hf_oscq
from hf_oscq import QuantSpec
from hf_oscq.quantization import kernel_build, packed_ops
from hf_oscq.quantization.packed_tensor import PackedWeight
from hf_oscq.quantization.ptq import holding_packed_weights
from hf_oscq.quantization.selection import output_dims

ALL_BITS = (2, 3, 4, 5, 6, 7, 8)
# per tensor, per channel, group-wise with groups of 8 and 16 input features
SPECS = {"per_tensor": {}, "per_channel": {"granularity": "per_channel"}, "group8": {"granularity": "group",
         "group_size": 8}, "group16": {"granularity": "group", "group_size": 16}}  # fmt: skip


def _spec(bits: int, name: str) -> QuantSpec:
    return QuantSpec(bits, **SPECS[name])


@pytest.fixture
def fallback(monkeypatch):
    """The torch path, as without a compiler (HF_OSCQ_DISABLE_KERNELS=1 logs no warning)."""
    monkeypatch.setenv(kernel_build.DISABLE_ENV, "1")
    kernel_build.reset()
    yield
    monkeypatch.delenv(kernel_build.DISABLE_ENV)
    kernel_build.reset()


def _kernels():
    if kernel_build.load_kernels() is None:
        pytest.skip(f"the compiled kernels are not available here: {kernel_build.kernels_unavailable_reason()}")
    return kernel_build.load_kernels()


def _reference(weight: torch.Tensor, spec: QuantSpec, out_dim: int) -> torch.Tensor:
    codes, scale = hf_oscq.quantize_codes(weight, spec=spec, out_dim=out_dim)
    return hf_oscq.dequantize(codes, scale, out_dim=out_dim)


def _within_dot_bound(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, length: int) -> None:
    """|actual - expected| <= 2 * length * 2**-24 * magnitude (+ the float32 rounding of the outputs themselves)."""
    bound = 2 * length * 2.0**-24 * magnitude + 2.0**-23 * expected.abs()
    excess = (actual - expected).abs() - bound
    assert float(excess.max()) <= 0, f"exceeds the reassociation bound by {float(excess.max()):.3g}"


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("granularity", sorted(SPECS))
def test_fused_products_and_dequantization_match_the_reference(bits, granularity):
    _kernels()
    generator = torch.Generator().manual_seed(bits)
    spec = _spec(bits, granularity)
    # (out, in): rows starting on whole words of codes at every bit-width (48, 64) and rows that do not (40 at 2
    # bits, where a word holds 16 codes; 36 at 2 to 4 bits, 8 codes a word), where the group size allows
    shapes = [
        (out, width) for out, width in ((24, 64), (48, 48), (16, 40), (12, 36)) if width % (spec.group_size or 1) == 0
    ]
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, generator=generator)
        expected_weight = _reference(weight, spec, 0)
        packed = PackedWeight.from_float(weight, spec)
        assert torch.equal(packed.dequantize(), expected_weight)
        assert torch.equal(packed.dequantize(torch.bfloat16), expected_weight.to(torch.bfloat16))
        for rows in (1, 3, kernel_build.MAX_ROWS, kernel_build.MAX_ROWS + 1):
            x = torch.randn(rows, in_features, generator=generator)
            bias = torch.randn(out_features, generator=generator)
            with torch.no_grad():
                actual = F.linear(x, packed, bias)
            magnitude = x.abs() @ expected_weight.abs().T
            _within_dot_bound(actual, F.linear(x, expected_weight, bias), magnitude, in_features)
        # GPT-2's Conv1D stores the transposed weight (in, out); its scales follow the output columns
        transposed = weight.T.contiguous()
        expected_conv1d = _reference(transposed, spec, 1)
        packed_conv1d = PackedWeight.from_float(transposed, spec, out_dim=1)
        assert torch.equal(packed_conv1d.dequantize(), expected_conv1d)
        for rows in (1, 5, kernel_build.MAX_ROWS + 1):
            x = torch.randn(rows, in_features, generator=generator)
            bias = torch.randn(out_features, generator=generator)
            with torch.no_grad():
                actual = torch.addmm(bias, x, packed_conv1d)
                product = torch.matmul(x[None], packed_conv1d)[0]
            magnitude = x.abs() @ expected_conv1d.abs()
            _within_dot_bound(actual, torch.addmm(bias, x, expected_conv1d), magnitude, in_features)
            _within_dot_bound(product, x @ expected_conv1d, magnitude, in_features)


@pytest.mark.parametrize("bits", (2, 3, 5, 8))
def test_conv2d_and_embedding_run_on_the_exact_weights(bits):
    _kernels()
    generator = torch.Generator().manual_seed(10 + bits)
    for granularity in SPECS:
        spec = _spec(bits, granularity)
        conv = torch.nn.Conv2d(8, 16, 3, padding=1)  # fan-in 72: groups of 8, not of 16
        embedding = torch.nn.Embedding(20, 16)
        if spec.group_size == 16:
            conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        expected = {}
        for module in (conv, embedding):
            expected[module] = _reference(module.weight.detach(), spec, 0)
            module.weight = torch.nn.Parameter(PackedWeight.from_float(module.weight, spec), requires_grad=False)
        pixels = torch.randn(2, conv.in_channels, 6, 6, generator=generator)
        ids = torch.randint(0, 20, (3, 5), generator=generator)
        with torch.no_grad():
            assert torch.equal(conv(pixels), F.conv2d(pixels, expected[conv], conv.bias, padding=1))
            assert torch.equal(embedding(ids), F.embedding(ids, expected[embedding]))


def _tiny_models():
    """Seeded tiny models of each layer type: a Llama decoder (Linear), GPT-2 (Conv1D), a ViT (Linear with a
    fan-in of 37, Conv2d patches) and timm's ResNet-18 (Conv2d, BatchNorm)."""
    import timm
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

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=40,
            max_position_embeddings=32,
        )  # fmt: skip
    )
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=48, n_positions=32))
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=3,
        )  # fmt: skip
    )
    resnet = TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="resnet18", num_labels=4, model_args={"channels": (8, 8, 16, 16),
                          "stem_width": 8}, pretrained_cfg=timm.models.get_pretrained_cfg("resnet18").to_dict())
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    ids = {rows: torch.randint(0, 40, (1, rows), generator=generator) for rows in (1, 7, 24)}
    pixels = {batch: torch.randn(batch, 3, 16, 16, generator=generator) for batch in (1, 3)}
    return [
        ("llama", llama.eval(), [{"input_ids": value} for value in ids.values()], "all-layers"),
        ("gpt2", gpt2.eval(), [{"input_ids": value} for value in ids.values()], "all-layers"),
        ("vit", vit.eval(), [{"pixel_values": value[:, :, :8, :8]} for value in pixels.values()], None),
        ("resnet18", resnet.eval(), [{"pixel_values": value} for value in pixels.values()], None),
    ]


@pytest.fixture(scope="module")
def tiny_models():
    return _tiny_models()


def _packed_logits(model, spec: QuantSpec, inputs: list[dict]) -> list[torch.Tensor]:
    weights = hf_oscq.select_weights(model, spec=spec)
    packed = {
        name: PackedWeight.from_float(weight, spec, out_dim)
        for (name, weight), out_dim in zip(weights.items(), output_dims(model, weights))
    }
    with torch.no_grad(), holding_packed_weights(model, packed):
        return [model(**batch).logits for batch in inputs]


def _model_spec(name: str, bits: int, granularity: str) -> QuantSpec | None:
    """The spec a tiny model is checked with: language models with their embeddings and head ("all-layers"); the
    ViT's fc2 (fan-in 37) and ResNet's stem (fan-in 147) left out group-wise; ResNet's 3x3 convolutions of 8
    channels (fan-in 72) take groups of 8 only."""
    fields = dict(SPECS[granularity])
    if name in ("llama", "gpt2"):
        fields["target_modules"] = ("all-layers",)
    elif fields.get("group_size"):
        if name == "resnet18" and fields["group_size"] == 16:
            return None
        fields["exclude_modules"] = ("fc2",) if name == "vit" else (r"timm_model\.conv1",)
    return QuantSpec(bits, **fields)


def _check_models(tiny_models, bits: int, exact: bool) -> None:
    for name, model, inputs, _ in tiny_models:
        for granularity in SPECS:
            spec = _model_spec(name, bits, granularity)
            if spec is None:
                continue
            with torch.no_grad():
                reference = hf_oscq.quantize_model(model, spec=spec)
                expected = [reference(**batch).logits for batch in inputs]
            for actual, wanted in zip(_packed_logits(model, spec, inputs), expected):
                if exact:
                    assert torch.equal(actual, wanted), (name, granularity)
                else:
                    assert_packed_close(actual, wanted)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_packed_models_give_quantize_model_logits_on_the_kernels(tiny_models, bits):
    _kernels()
    _check_models(tiny_models, bits, exact=False)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_packed_models_give_quantize_model_logits_exactly_on_the_fallback(tiny_models, bits, fallback):
    assert kernel_build.load_kernels() is None
    _check_models(tiny_models, bits, exact=True)


def test_inputs_that_need_gradients_take_the_differentiable_path():
    linear = torch.nn.Linear(32, 8)
    expected = _reference(linear.weight.detach(), QuantSpec(4), 0)
    linear.weight = torch.nn.Parameter(PackedWeight.from_float(linear.weight, QuantSpec(4)), requires_grad=False)
    x = torch.randn(2, 32, requires_grad=True)
    linear(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 8) @ expected)  # what autograd computes with the float weight


def test_without_a_compiler_the_fallback_runs_after_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(kernel_build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv(kernel_build.DISABLE_ENV, raising=False)
    kernel_build.reset()
    try:
        linear = torch.nn.Linear(32, 8)
        expected = _reference(linear.weight.detach(), QuantSpec(3), 0)
        linear.weight = torch.nn.Parameter(PackedWeight.from_float(linear.weight, QuantSpec(3)), requires_grad=False)
        x = torch.randn(1, 32)
        with caplog.at_level(logging.WARNING, logger="hf_oscq"), torch.no_grad():
            for _ in range(3):
                assert torch.equal(linear(x), F.linear(x, expected, linear.bias))
        warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no C compiler found" in warnings[0].getMessage()
        assert "HF_OSCQ_DISABLE_KERNELS=1" in warnings[0].getMessage()
        assert not (tmp_path / "cache").exists()
    finally:
        kernel_build.reset()


def test_the_build_is_cached_per_machine(monkeypatch, tmp_path):
    if kernel_build._compiler() is None:
        pytest.skip("no C compiler here: the build cannot be tested")
    monkeypatch.setenv(kernel_build.CACHE_ENV, str(tmp_path))
    kernel_build.reset()
    try:
        assert kernel_build.load_kernels() is not None
        (built,) = tmp_path.glob("packed_kernels-*.so")
        kernel_build.reset()
        monkeypatch.setattr(kernel_build, "_compile", lambda *args: pytest.fail("compiled again"))
        assert kernel_build.load_kernels() is not None and list(tmp_path.glob("packed_kernels-*.so")) == [built]
    finally:
        kernel_build.reset()


def test_invalid_codes_are_found_as_the_reference_finds_them():
    codes = torch.tensor([0, 1, 2, 3, 4, 5, 6] * 5, dtype=torch.int8).reshape(5, 7) - 3
    for bits in (3, 5):
        packed = hf_oscq.pack_codes(codes, bits)
        assert packed_ops.invalid_codes(packed, bits, codes.numel()) is None
        broken = packed.clone()
        broken[1] = 0xFF  # all-ones patterns: no valid code produces them
        assert "which no" in packed_ops.invalid_codes(broken, bits, codes.numel())
        padded = packed.clone()
        padded[-1] |= 0x80
        if codes.numel() * bits % 8:
            assert "padding" in packed_ops.invalid_codes(padded, bits, codes.numel())
    assert math.prod((5, 7)) == codes.numel()


def test_the_plain_c_build_computes_the_same(monkeypatch, tmp_path):
    """The kernels built without the compiler's vector extensions and without -march=native (what a compiler other
    than GCC or Clang, or another processor, builds) pass the same checks."""
    import ctypes

    compiler = kernel_build._compiler()
    if compiler is None:
        pytest.skip("no C compiler here: the plain C build cannot be tested")
    target = tmp_path / "packed_kernels_plain.so"
    assert kernel_build._compile(compiler, target, ("-DOSCQ_PLAIN_C",), native=False) is None
    library = ctypes.CDLL(str(target))
    kernel_build._declare(library)
    monkeypatch.setitem(kernel_build._state, "library", library)
    for bits, granularity in ((2, "group16"), (3, "group8"), (5, "per_channel"), (8, "per_tensor")):
        test_fused_products_and_dequantization_match_the_reference(bits, granularity)


def test_an_unwritable_cache_falls_back_with_the_reason(monkeypatch, tmp_path, caplog):
    if kernel_build._compiler() is None:
        pytest.skip("no C compiler here: the fallback for want of a compiler is tested above")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(kernel_build.CACHE_ENV, str(tmp_path / "a_file" / "cache"))  # a folder inside a file
    monkeypatch.delenv(kernel_build.DISABLE_ENV, raising=False)
    kernel_build.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="hf_oscq"):
            assert kernel_build.load_kernels() is None
        (warning,) = [record for record in caplog.records if record.levelno == logging.WARNING]
        message = warning.getMessage()
        assert "cannot write the kernel cache" in message and kernel_build.CACHE_ENV in message
    finally:
        kernel_build.reset()
