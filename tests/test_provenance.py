"""The provenance value every recorded number carries: what a table was measured on, and which tables may be shown
side by side."""

import pytest

from hf_oscq.provenance import LOCAL, Provenance, dataset_id, describe, group_by_provenance, trainer_provenance

MEASURED = Provenance(
    "accuracy", "zalando-datasets/fashion_mnist", "test", 1000, batchnorm="re-estimated", bn_samples=256
)


def test_round_trip_and_older_records_read_as_not_recorded():
    assert Provenance.from_dict(MEASURED.to_dict()) == MEASURED
    for older in (None, {}, {"dataset": "digits", "split": "test", "samples": 8}, {"metric": "f1"}, "text"):
        assert Provenance.from_dict(older) is None
    assert describe(None) == "top-1 accuracy (%); what it was measured on was not recorded"


def test_only_known_equal_provenances_match():
    """Tables sit side by side only when both are known and equal: another split, number of examples, BatchNorm
    handling or metric separates them; a provenance with a field not recorded matches nothing, not even itself."""
    assert MEASURED.matches(Provenance.from_dict(MEASURED.to_dict()))
    for field, value in (("split", "valid"), ("examples", 10000), ("bn_samples", 512), ("batchnorm", "plain")):
        other = Provenance(**{**MEASURED.to_dict(), field: value})
        assert not MEASURED.matches(other) and not other.matches(MEASURED), field
    partial = Provenance("accuracy", "digits", None, 360, batchnorm="none")
    assert not partial.matches(partial) and not MEASURED.matches(None)
    perplexity = Provenance("perplexity", "kjv", "held-out", 4, batchnorm="none")
    assert not perplexity.known  # a perplexity without its number of tokens
    groups = group_by_provenance([("a", {}, MEASURED), ("b", {}, partial), ("c", {}, MEASURED), ("d", {}, None)])
    assert [(provenance, list(tables)) for provenance, tables in groups] == [
        (MEASURED, ["a", "c"]),
        (partial, ["b"]),
        (None, ["d"]),
    ]


def test_a_dataset_is_a_hub_id_or_local_never_a_path(tmp_path):
    assert dataset_id(str(tmp_path)) == LOCAL and dataset_id("fashion_mnist", "zalando-datasets/fashion_mnist")
    assert dataset_id("uoft-cs/cifar10") == "uoft-cs/cifar10" and dataset_id("not a dataset") is None
    for path in (str(tmp_path), "/data/images", "a/b/c"):
        with pytest.raises(ValueError, match="never its path"):
            Provenance("accuracy", path, "test", 10, batchnorm="none")
    with pytest.raises(ValueError, match="metric must be one of"):
        Provenance("f1")
    assert MEASURED.describe() == (
        "top-1 accuracy (%) on 1,000 examples of the test split of zalando-datasets/fashion_mnist; BatchNorm "
        "statistics re-estimated after rounding on 256 training images"
    )


def test_trainer_provenance_reads_the_counts_of_the_metrics_and_the_batchnorm_handling():
    class Trainer:
        model = __import__("torch").nn.Sequential(__import__("torch").nn.BatchNorm1d(3))
        bn_recalibration_samples = 96

    metrics = {"test_accuracy": 0.5, "test_w2_accuracy": 0.4, "test_samples": 32}
    assert trainer_provenance(Trainer(), metrics, "test", "digits", "test") == Provenance(
        "accuracy", "digits", "test", 32, batchnorm="re-estimated", bn_samples=96
    )
    Trainer.bn_recalibration_samples = 0
    assert trainer_provenance(Trainer(), metrics, "test").batchnorm == "plain"
