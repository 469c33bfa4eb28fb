"""Which class of the model each dataset class is: by name, or by an explicit mapping, never by position alone."""

import json

import pytest

from hf_oscq.errors import OscqValueError
from hf_oscq.label_map import LabelMismatchError, model_class_ids, parse_label_map

MODEL = {"T-shirt/top": 0, "Trouser": 1, "Pullover": 2}


def test_classes_match_by_name_in_any_order_and_through_a_mapping():
    # an imagefolder numbers its classes alphabetically: Pullover, T-shirt_top, Trouser
    assert model_class_ids(["Pullover", "T-shirt/top", "Trouser"], MODEL, 3) == [2, 0, 1]
    mapped = model_class_ids(["Pullover", "T-shirt_top", "Trouser"], MODEL, 3, {"T-shirt_top": "T-shirt/top"})
    assert mapped == [2, 0, 1]
    assert model_class_ids(["Pullover", "T-shirt_top", "Trouser"], MODEL, 3, {"T-shirt_top": 0}) == [2, 0, 1]
    assert model_class_ids(["Trouser"], MODEL, 3) == [1]  # a subset of the model's classes
    assert model_class_ids(None, MODEL, 3) is None  # bare ids, no mapping: the model's ids as they are
    assert model_class_ids(None, MODEL, 3, {"0": "Trouser", "1": "T-shirt/top"}) == [1, 0]


def test_what_cannot_be_matched_is_refused_by_name():
    with pytest.raises(LabelMismatchError, match=r"\['T-shirt_top'\] are not classes of the model") as refused:
        model_class_ids(["Pullover", "T-shirt_top", "Trouser"], MODEL, 3)
    assert "without a match: ['T-shirt/top']" in str(refused.value)
    assert """--label_map '{"T-shirt_top": "T-shirt/top"}'""" in str(refused.value)
    generic = {"LABEL_0": 0, "LABEL_1": 1}  # transformers' names for classes nobody named
    with pytest.raises(LabelMismatchError, match="2 unnamed ones"):
        model_class_ids(["cat", "dog"], generic, 2)
    with pytest.raises(LabelMismatchError, match="class id 7; the model has 3"):
        model_class_ids(["a"], MODEL, 3, {"a": 7})
    with pytest.raises(LabelMismatchError, match="map to the model's class ids \\[1\\]"):
        model_class_ids(["Trouser", "trousers"], MODEL, 3, {"trousers": "Trouser"})


def test_a_label_map_is_json_inline_or_in_a_file(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"a": "Trouser", "b": 2}))
    assert parse_label_map(str(tmp_path / "map.json")) == {"a": "Trouser", "b": 2}
    assert parse_label_map('{"a": "Trouser"}') == {"a": "Trouser"} and parse_label_map(None) is None
    for bad in ("[1, 2]", "{not json", '{"a": [1]}', str(tmp_path / "missing.json")):
        with pytest.raises(OscqValueError, match="--label_map must be a JSON object"):
            parse_label_map(bad)


def test_classes_named_by_digits_are_ids_only_for_a_model_without_class_names():
    """A dataset whose classes are called "0".."9" (scikit-learn's digits) is refused by a model whose classes have
    other names (it would be scored against Fashion-MNIST's), is read as class ids by a model without names
    (transformers' `LABEL_i`, or no label2id), matches a model whose classes are themselves called by digits, and
    takes ids through an explicit mapping."""
    digits = [str(index) for index in range(3)]
    with pytest.raises(LabelMismatchError, match=r"\['0', '1', '2'\] are not classes of the model"):
        model_class_ids(digits, MODEL, 3)
    assert model_class_ids(digits, {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}, 3) == [0, 1, 2]
    assert model_class_ids(digits, None, 3) == [0, 1, 2]
    assert model_class_ids(digits, {"2": 0, "1": 1, "0": 2}, 3) == [2, 1, 0]  # by name, not position
    assert model_class_ids(digits, MODEL, 3, {"0": 1, "1": "Pullover", "2": "0"}) == [1, 2, 0]
