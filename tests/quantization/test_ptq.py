import numpy as np
import pytest
import torch
from torch import nn

from hf_oscq import (
    cross_bit_evaluate,
    format_cross_bit_table,
    quantize_model,
    quantized_weights,
    recalibrate_batchnorm,
)


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_quantize_model_rounds_selected_weights_on_a_copy():
    model = small_net()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    quantized = quantize_model(model, 2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name])  # the input model is untouched
    conv = quantized[0].weight.detach()
    scale = original["0.weight"].abs().max() / 1
    assert set(torch.unique(conv / scale).tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(quantized[0].bias, original["0.bias"])  # biases stay float
    assert torch.equal(quantized[1].weight, original["1.weight"])  # norms stay float


def test_quantized_weights_restores_bit_exactly_even_on_error():
    model = small_net()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with quantized_weights(model, 3):
            assert not torch.equal(model[4].weight, before["4.weight"])
            raise RuntimeError("boom")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_recalibrate_batchnorm_matches_batch_statistics():
    model = small_net()
    images = torch.randn(40, 1, 8, 8)
    batches = [images[:16], images[16:32], images[32:]]
    assert recalibrate_batchnorm(model, batches) == 40
    # momentum=None: a cumulative average over batches of the per-batch mean and unbiased variance of the input
    with torch.no_grad():
        means = [model[0](b).mean(dim=(0, 2, 3)) for b in batches]
        variances = [model[0](b).var(dim=(0, 2, 3), unbiased=True) for b in batches]
    torch.testing.assert_close(model[1].running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.1 and model.training


def test_bn_recalibration_inside_quantized_weights_is_undone():
    model = small_net().eval()
    stats = model[1].running_mean.clone()
    with quantized_weights(model, 3, calibration_batches=[torch.randn(8, 1, 8, 8)]):
        assert not torch.equal(model[1].running_mean, stats)
    assert torch.equal(model[1].running_mean, stats)


def test_cross_bit_evaluate_and_table():
    model = small_net().eval()
    images = torch.randn(32, 1, 8, 8)

    def evaluate(m):
        with torch.no_grad():
            return {"accuracy": float((m(images).argmax(-1) == 0).float().mean())}

    table = cross_bit_evaluate(model, evaluate, bits=[2, 8])
    assert list(table) == ["fp", "w2", "w8"]
    expected_w2 = evaluate(quantize_model(model, 2))["accuracy"]
    assert table["w2"]["accuracy"] == expected_w2
    rendered = format_cross_bit_table({"osc": table, "qat": {"w2": {"accuracy": 0.5}}})
    assert rendered.splitlines()[0] == "| top-1 accuracy (%) | fp | w2 | w8 |"
    assert rendered.splitlines()[3] == "| qat | - | 50.0 | - |"
    assert f"{100 * expected_w2:.1f}" in rendered.splitlines()[2]


def test_non_finite_weight_named_by_quantize_model():
    model = small_net()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'4.weight' contains NaN"):
        quantize_model(model, 4)
    with pytest.raises(ValueError, match="between 2 and 8"):
        quantize_model(small_net(), 2.5)


def test_rounding_error_shrinks_with_bits():
    model = small_net()
    weight = model[4].weight.detach()
    errors = [float((quantize_model(model, b)[4].weight.detach() - weight).abs().max()) for b in range(2, 9)]
    scale = float(weight.abs().max())
    for bits, error in zip(range(2, 9), errors):
        assert error <= scale / (2 ** (bits - 1) - 1) / 2 + 1e-7  # at most half a step
    assert np.all(np.diff(errors) < 0)


@pytest.mark.parametrize(("stale_mean", "warned"), [(4.0, True), (0.0, False)])
def test_full_precision_far_below_8_bits_warns_of_stale_batchnorm_statistics(caplog, stale_mean, warned):
    # Two classes, the sign of the first feature x; the linear layer (exact at every bit-width) gives the logits
    # (-x, x). A running mean of 4 on the first logit (statistics that never settled) makes full precision predict
    # class 1 for all but the samples below -2: about 50 % accuracy; re-estimated (means near 0), 100 %.
    features = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    features[:, 0] -= features[:, 0].mean()
    features[:, 1] = 0.0
    labels = (features[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2, affine=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model[1].running_mean.copy_(torch.tensor([stale_mean, 0.0]))
        model[1].running_var.fill_(1.0)

    def evaluate(net):
        with torch.no_grad():
            return {"accuracy": (net(features).argmax(-1) == labels).float().mean().item()}

    with caplog.at_level("WARNING", logger="hf_oscq.quantization.batchnorm"):
        table = cross_bit_evaluate(model, evaluate, bits=[8], calibration_batches=lambda: [features])
    assert table["w8"]["accuracy"] == 1.0
    assert (table["fp"]["accuracy"] < 0.6) is warned
    assert ("BatchNorm running statistics training left do not fit the weights" in caplog.text) is warned


def test_calibration_batches_for_several_bit_widths_are_re_iterable_or_a_callable():
    """A one-shot generator consumed by the first bit-width left the next ones with "no batches". The rule
    (`batchnorm.reusable_batches`) is applied wherever batches serve several bit-widths: cross_bit_evaluate and
    export_quantized (tests/export/test_writer.py); the Trainer and `hf-oscq export` pass a callable and a re-iterable.
    A list, a callable and a generator for a single bit-width all give the same statistics."""
    from hf_oscq import OscqValueError

    model = small_net()
    batches = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    probe = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(9))

    def evaluate(net):
        with torch.no_grad():
            return {"logit_sum": float(net.eval()(probe).sum())}

    with pytest.raises(OscqValueError, match=r"one-shot iterator \(generator\), which the first of 2 bit-widths"):
        cross_bit_evaluate(model, evaluate, bits=[2, 3], calibration_batches=(b for b in batches))
    from_list = cross_bit_evaluate(model, evaluate, bits=[2, 3], calibration_batches=batches)
    assert from_list == cross_bit_evaluate(model, evaluate, bits=[2, 3], calibration_batches=lambda: iter(batches))
    single = cross_bit_evaluate(model, evaluate, bits=[3], calibration_batches=(b for b in batches))
    assert single["w3"] == from_list["w3"] and from_list["w2"] != from_list["fp"]
