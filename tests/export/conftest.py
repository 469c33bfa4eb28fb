"""Exports shared by the tests of tests/export/ (written once per session: they are only read)."""

import pytest
from _export_models import ALL_BITS, tiny_resnet18, tiny_vit

import hf_oscq


@pytest.fixture(scope="package")
def vit_export(tmp_path_factory):
    model = tiny_vit()
    out = hf_oscq.export_quantized(model, tmp_path_factory.mktemp("vit") / "export", bits=ALL_BITS)
    return model, out


@pytest.fixture(scope="package")
def resnet_export(tmp_path_factory):
    model = tiny_resnet18()
    # plain rounding: the tests compare with quantize_model(model, b), which does not re-estimate BatchNorm
    out = hf_oscq.export_quantized(
        model, tmp_path_factory.mktemp("resnet") / "export", bits=(2, 3, 8), plain_rounding=True
    )
    return model, out
