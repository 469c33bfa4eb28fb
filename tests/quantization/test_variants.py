import pytest

from hf_oscq.quantization.variants import (
    is_variant,
    sort_variants,
    variant_bits,
    variant_name,
    variant_names,
    variant_repo_id,
    variant_title,
)


def test_names_and_bits():
    assert [variant_name(b) for b in (None, 2, 8)] == ["fp", "w2", "w8"]
    assert [variant_bits(name) for name in ("fp", "w2", "w8")] == [None, 2, 8]
    assert [is_variant(name) for name in ("fp", "w3", "w", "w3b", "fp16", "README.md")] == [True, True] + [False] * 4
    with pytest.raises(ValueError, match="not a variant name"):
        variant_bits("w3.5")
    assert (variant_title("fp"), variant_title("w4")) == ("full precision", "4 bits")


def test_order_and_repo_ids():
    assert variant_names([8, 2, 3]) == ["fp", "w2", "w3", "w8"]
    assert variant_names([4], full_precision=False) == ["w4"]
    assert sort_variants(["w10", "w2", "fp", "w8"]) == ["fp", "w2", "w8", "w10"]  # by bit-width, not as text
    assert sort_variants(["w2", "fp", "w8"], descending=True) == ["fp", "w8", "w2"]
    assert variant_repo_id("org/vit", "fp") == "org/vit" and variant_repo_id("org/vit", "w3") == "org/vit-w3"
