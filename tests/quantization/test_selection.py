import pytest
import torch
from torch import nn

from hf_oscq import ALL_WEIGHTS, select_weights


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.block = nn.ModuleDict({"fc": nn.Linear(4, 4), "ln": nn.LayerNorm(4)})
        self.head = nn.Linear(4, 10)


def test_default_selects_linear_conv_embedding_weights_only():
    assert list(select_weights(Net())) == ["embed.weight", "conv.weight", "block.fc.weight", "head.weight"]


def test_reference_preset_selects_every_module_weight():
    assert list(select_weights(Net(), ALL_WEIGHTS)) == [
        "embed.weight",
        "conv.weight",
        "norm.weight",
        "block.fc.weight",
        "block.ln.weight",
        "head.weight",
    ]


def test_names_suffixes_and_regex():
    net = Net()
    assert list(select_weights(net, ["head"])) == ["head.weight"]
    assert list(select_weights(net, ["fc", "conv"])) == ["conv.weight", "block.fc.weight"]
    assert list(select_weights(net, r"block\..*")) == ["block.fc.weight", "block.ln.weight"]
    assert list(select_weights(net, exclude_modules=["head", "embed"])) == ["conv.weight", "block.fc.weight"]


def test_tied_weights_selected_once():
    net = Net()
    net.head.weight = net.embed.weight
    net.head = nn.Linear(4, 10)
    tied = nn.Linear(4, 10, bias=False)
    tied.weight = net.embed.weight
    net.tied = tied
    selected = select_weights(net)
    assert list(selected) == ["embed.weight", "conv.weight", "block.fc.weight", "head.weight"]


def test_empty_selection_is_a_clear_error():
    with pytest.raises(ValueError, match=r"No weights selected.*Modules with a weight in this model: \[embed, conv"):
        select_weights(Net(), ["does_not_exist"])
    with pytest.raises(ValueError, match="No weights selected"):
        select_weights(nn.Sequential(nn.ReLU()))


def test_patterns_matching_no_module_warn():
    import warnings

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="exclude_modules pattern 'head' matches no module with a weight") as caught:
        selected = select_weights(model, exclude_modules=["2", "head"])
    assert list(selected) == ["0.weight"] and len(caught) == 1
    with pytest.warns(UserWarning, match="target_modules pattern 'fc' matches no module with a weight, so it selects"):
        select_weights(model, target_modules=["0", "fc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pattern matches: no warning
        select_weights(model, target_modules=["0", r"\d"], exclude_modules="2")
        select_weights(model, target_modules=ALL_WEIGHTS)


def test_a_pattern_matching_nothing_is_shown_once_however_many_callers_select():
    # A training run selects its weights from several places (trainer, penalty, evaluation, export); under Python's
    # default warning filter, as a script runs, the user sees the warning once.
    import subprocess
    import sys

    script = """
from torch import nn
from hf_oscq import select_weights
model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
def trainer(): select_weights(model, target_modules=["0", "fc"])
def export(): select_weights(model, target_modules=["0", "fc"])
trainer(); export(); trainer()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stderr.count("target_modules pattern 'fc' matches no module with a weight") == 1, result.stderr


@pytest.mark.parametrize("given", [[], "model_dir", None, {"weight": torch.ones(2, 2)}])
def test_every_model_taking_function_names_what_it_got_instead_of_a_model(given):
    """The functions a user calls by hand on a model (the quantizers, the three penalties, the selection) refuse
    anything that is not an nn.Module with one line naming what was passed, not an AttributeError from inside."""
    import torch.distributed.fsdp  # noqa: F401  (loaded, as in a run that shards: the FSDP2 paths check the model too)

    import hf_oscq

    calls = [
        lambda: hf_oscq.select_weights(given),
        lambda: hf_oscq.quantize_model(given, 3),
        lambda: hf_oscq.quantized_weights(given, 3).__enter__(),
        lambda: hf_oscq.cross_bit_evaluate(given, lambda model: {}, bits=(3,)),
        lambda: hf_oscq.oscillation_penalty(given, 3),
        lambda: hf_oscq.kurtosis_penalty(given),
        lambda: hf_oscq.dampening_penalty(given, 3),
    ]
    for call in calls:
        with pytest.raises(
            hf_oscq.OscqValueError, match=f"take the model \\(a torch.nn.Module\\), got {type(given).__name__}"
        ):
            call()
