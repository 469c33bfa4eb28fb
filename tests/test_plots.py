import numpy as np
import pytest
import torch

from hf_oscq import QuantSpec
from hf_oscq.plots import plot_accuracy_vs_bits, plot_weight_histogram, quantization_thresholds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quantization_thresholds_are_half_integers():
    np.testing.assert_array_equal(quantization_thresholds(2), [-0.5, 0.5])
    np.testing.assert_array_equal(quantization_thresholds(3), [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert len(quantization_thresholds(8)) == 254


def _threshold_positions(figure) -> list[float]:
    (collection,) = figure.axes[0].collections
    return sorted(float(segment[0][0]) for segment in collection.get_segments())


def test_weight_histogram_draws_thresholds_at_the_quantizer_bins(tmp_path):
    weight = torch.tensor([[0.3, -0.9], [0.1, 0.6]])
    figure = plot_weight_histogram(weight, 3, tmp_path / "hist.png")
    step = 0.9 / 3  # max|W| / (2**(3-1) - 1)
    assert _threshold_positions(figure) == pytest.approx([k * step for k in (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)])
    assert (tmp_path / "hist.png").read_bytes().startswith(PNG_MAGIC)
    # per channel: weights divided by their row's scale, thresholds shared at +-0.5 and +-1.5 ... in those units
    figure = plot_weight_histogram(weight, 2, tmp_path / "hist_pc.png", per_channel=True, out_dim=0)
    assert _threshold_positions(figure) == [-0.5, 0.5]
    # w / s per row: [0.3, -0.9] / 0.9 and [0.1, 0.6] / 0.6, so the histogram spans exactly [-1, 1]
    (histogram,) = figure.axes[0].patches
    xs = histogram.get_path().vertices[:, 0]
    assert (xs.min(), xs.max()) == pytest.approx((-1.0, 1.0))


def test_accuracy_plot_draws_each_run(tmp_path):
    tables = {"osc": {"fp": {"accuracy": 0.9}, "w2": {"accuracy": 0.5}, "w4": {"accuracy": 0.85}}, "qat": {}}
    figure = plot_accuracy_vs_bits(tables, tmp_path / "acc.png", highlight_bits=4)
    lines = figure.axes[0].get_lines()
    curve = next(line for line in lines if line.get_label() == "osc")
    assert list(curve.get_xdata()) == [2, 4] and list(curve.get_ydata()) == pytest.approx([50.0, 85.0])
    full = next(line for line in lines if line.get_label() == "osc, full precision")
    assert list(full.get_ydata()) == pytest.approx([90.0, 90.0])
    with pytest.raises(ValueError, match="has a 'accuracy' value"):
        plot_accuracy_vs_bits({"qat": {}}, tmp_path / "none.png")


def test_weight_histogram_can_draw_the_levels(tmp_path):
    weight = torch.tensor([[0.3, -0.9], [0.1, 0.6]])
    figure = plot_weight_histogram(weight, path=tmp_path / "levels.png", spec=QuantSpec(2), show_levels=True)
    levels, thresholds = figure.axes[0].collections  # the levels first, then the dashed thresholds
    step = 0.9  # max|W| / (2**(2-1) - 1)
    assert sorted(float(s[0][0]) for s in levels.get_segments()) == pytest.approx([-step, 0.0, step])
    assert sorted(float(s[0][0]) for s in thresholds.get_segments()) == pytest.approx([-step / 2, step / 2])
    with pytest.raises(TypeError, match="needs path="):
        plot_weight_histogram(weight, 3)


def test_accuracy_plot_zooms_to_the_data_and_tells_runs_apart(tmp_path):
    tables = {
        "osc": {"fp": {"accuracy": 0.95}, "w3": {"accuracy": 0.93}, "w4": {"accuracy": 0.945}},
        "qat": {"fp": {"accuracy": 0.94}, "w3": {"accuracy": 0.935}, "w4": {"accuracy": 0.94}},
    }
    figure = plot_accuracy_vs_bits(tables, tmp_path / "acc.png")
    low, high = figure.axes[0].get_ylim()
    # data from 93.0 to 95.0 %: 2 points, padded by max(8 % of the span, (2 - span) / 2, 0.25) = 0.25 each side
    assert (low, high) == pytest.approx((92.75, 95.25))
    curves = [line for line in figure.axes[0].get_lines() if line.get_label() in ("osc", "qat")]
    assert len({line.get_marker() for line in curves}) == 2
    # a 2-bit collapse stays in view; the axis never leaves [0, 100]
    tables["osc"]["w2"] = {"accuracy": 0.10}
    low, high = plot_accuracy_vs_bits(tables, tmp_path / "acc2.png").axes[0].get_ylim()
    span = 95.0 - 10.0
    assert (low, high) == pytest.approx((10.0 - 0.08 * span, min(100.0, 95.0 + 0.08 * span)))
    low, high = plot_accuracy_vs_bits({"r": {"w2": {"accuracy": 1.0}}}, tmp_path / "acc3.png").axes[0].get_ylim()
    assert (low, high) == pytest.approx((99.0, 100.0))
