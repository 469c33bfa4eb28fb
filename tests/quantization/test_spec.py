import dataclasses

import pytest
import torch
from torch import nn

from hf_oscq import QuantSpec, fake_quantize, oscillation_penalty, quantize_codes, quantize_model, select_weights
from hf_oscq.quantization.spec import resolve_spec


def test_fields_are_validated_and_normalized():
    spec = QuantSpec(bits=4, granularity="per_channel", target_modules="fc", exclude_modules=["head", "stem"])
    assert (spec.bits, spec.per_channel, spec.max_code) == (4, True, 7)
    assert spec.target_modules == ("fc",) and spec.exclude_modules == ("head", "stem")
    assert QuantSpec(target_modules=[]).target_modules is None  # an empty list selects like None
    assert hash(spec) == hash(QuantSpec(4, "per_channel", ("fc",), ("head", "stem")))  # a hashable value
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 3
    for bits in (1, 9, 2.5, True, "3"):
        with pytest.raises(ValueError, match="between 2 and 8"):
            QuantSpec(bits=bits)
    with pytest.raises(ValueError, match="granularity must be one of"):
        QuantSpec(granularity="per_group")
    with pytest.raises(ValueError, match="target_modules must be a module name"):
        QuantSpec(target_modules=["fc", 3])
    assert spec.with_bits(2) == QuantSpec(2, "per_channel", ("fc",), ("head", "stem"))
    assert spec.with_bits(4) is spec


def test_dict_round_trip_and_first_format_fields():
    spec = QuantSpec(3, "per_channel", ("all-weights",), ("classifier",))
    assert spec.to_dict() == {
        "bits": 3,
        "granularity": "per_channel",
        "per_channel": True,
        "target_modules": ["all-weights"],
        "exclude_modules": ["classifier"],
    }
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    # manifests and quantization_config of the first format: per_channel alone, patterns as written
    old = {"bits": 5, "per_channel": False, "target_modules": "all-weights", "exclude_modules": None, "other": 1}
    assert QuantSpec.from_dict(old) == QuantSpec(5, "per_tensor", ("all-weights",), None)
    assert QuantSpec.from_dict({"bits": 2, "per_channel": True}).granularity == "per_channel"
    with pytest.raises(ValueError, match="contradicts per_channel"):
        QuantSpec.from_dict({"bits": 3, "granularity": "per_tensor", "per_channel": True})
    with pytest.raises(ValueError, match="needs its bit-width"):
        QuantSpec.from_dict({"per_channel": True})


def test_shorthand_and_spec_are_one_convention():
    assert resolve_spec("f", None, 3, True, "fc") == QuantSpec(3, "per_channel", ("fc",))
    spec = QuantSpec(2)
    assert resolve_spec("f", spec) is spec
    with pytest.raises(TypeError, match="f: pass spec=QuantSpec\\(...\\) or bits, per_channel=..., not both"):
        resolve_spec("f", spec, 3, True)
    with pytest.raises(TypeError, match="pass the QuantSpec as spec="):
        resolve_spec("f", None, spec)
    with pytest.raises(ValueError, match="f needs bits .* or spec=QuantSpec"):
        resolve_spec("f", None)


def test_functions_give_the_same_result_with_the_spec_or_the_shorthand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    spec = QuantSpec(3, "per_channel", exclude_modules=("2",))
    weight = model[0].weight
    assert torch.equal(
        fake_quantize(weight, spec=spec, out_dim=0), fake_quantize(weight, 3, per_channel=True, out_dim=0)
    )
    codes, scale = quantize_codes(weight, spec=spec, out_dim=0)
    expected_scale = weight.detach().abs().amax(dim=1, keepdim=True) / 3  # per output channel, top code 3
    torch.testing.assert_close(scale, expected_scale, rtol=0, atol=0)
    assert torch.equal(codes, torch.round(weight.detach() / expected_scale).to(torch.int8))
    assert list(select_weights(model, spec=spec)) == ["0.weight"]
    quantized = quantize_model(model, spec=spec)
    assert torch.equal(quantized[0].weight, codes * expected_scale) and torch.equal(
        quantized[2].weight, model[2].weight
    )
    shorthand = quantize_model(model, 3, exclude_modules="2", per_channel=True)
    assert all(torch.equal(a, b) for a, b in zip(quantized.parameters(), shorthand.parameters()))
    assert torch.equal(oscillation_penalty(model, spec=spec), oscillation_penalty(model, 3, None, "2", True))
    with pytest.raises(TypeError, match="not both"):
        quantize_model(model, 3, spec=spec)
