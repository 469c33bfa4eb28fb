"""`hf-oscq eval` on local datasets (imagefolder, save_to_disk, parquet) and Hub ids, each checkpoint with its own
saved image processor; the table lands in the manifest and the cards. Expected accuracies are computed here from the
image files with numpy (rescale, normalise) and the models, not through the image processor or `evaluate`."""

import errno
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import hf_oscq
from hf_oscq.cli import main as cli_main

CLASSES = ("dog", "bird", "cat")  # the model's label order; an imagefolder numbers them cat, bird, dog... sorted
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _model() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        id2label=dict(enumerate(CLASSES)),
        label2id={name: i for i, name in enumerate(CLASSES)},
    )
    return ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    processor = ViTImageProcessor(
        do_resize=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=MEAN, image_std=STD
    )
    model = _model()
    hf_oscq.export_quantized(model, root / "export", bits=(2, 3), image_processor=processor)
    generator = np.random.default_rng(0)
    images = []
    for index in range(24):
        pixels = generator.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        images.append((pixels, CLASSES[index % 3]))
        folder = root / "images" / "test" / CLASSES[index % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return model, root, images


def _expected(model, images) -> dict[str, float]:
    """Accuracy of the model at full precision and 2 and 3 bits, by hand from the pixels."""
    pixels = np.stack([p for p, _ in images]).astype(np.float64) / 255
    inputs = torch.tensor(((pixels - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    labels = [CLASSES.index(name) for _, name in images]
    table = {}
    for name, variant in (
        ("fp", model),
        ("w2", hf_oscq.quantize_model(model, 2)),
        ("w3", hf_oscq.quantize_model(model, 3)),
    ):
        with torch.no_grad():
            predicted = variant(pixel_values=inputs).logits.argmax(-1).tolist()
        table[name] = sum(int(p == y) for p, y in zip(predicted, labels)) / len(labels)
    return table


def _accuracies(path) -> dict[str, float]:
    return {name: row["accuracy"] for name, row in json.loads(path.read_text())["table"].items()}


def test_eval_on_an_imagefolder_equals_the_accuracy_by_hand_and_reaches_manifest_and_cards(export, tmp_path, capsys):
    model, root, images = export
    folder = tmp_path / "export"
    shutil.copytree(root / "export", folder)
    result = tmp_path / "table.json"
    args = ["eval", str(folder), "--dataset", str(root / "images"), "--split", "test", "--output_json", str(result)]
    assert cli_main(args) == 0
    expected = _expected(model, images)
    assert _accuracies(result) == expected
    assert len(set(expected.values())) > 1 or expected["fp"] not in (0.0, 1.0)  # a table that can tell errors apart
    manifest = json.loads((folder / "oscq_export.json").read_text())
    assert {name: row["accuracy"] for name, row in manifest["metrics"].items()} == expected
    provenance = {"metric": "accuracy", "dataset": "local", "split": "test", "examples": 24, "tokens": None}
    assert manifest["provenance"]["metrics"] == {**provenance, "batchnorm": "none", "bn_samples": None}
    assert json.loads(result.read_text())["provenance"] == manifest["provenance"]["metrics"]
    assert str(root) not in json.dumps(manifest)  # a local dataset is "local", never its path
    card = (folder / "w3" / "README.md").read_text()
    assert f"| {100 * expected['w3']:.1f} %" in card
    assert "Top-1 accuracy (%) on 24 examples of the test split of a local copy of a dataset" in card
    assert str(root) not in card
    assert (folder / "w3" / "oscq_accuracy_vs_bits.png").is_file()
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == "| export | " + " | ".join(f"{100 * expected[v]:.1f}" for v in ("fp", "w2", "w3")) + " |"
    assert printed[-3] == "| top-1 accuracy (%) | fp | w2 | w3 |"  # the metric and its unit
    assert printed[-4].startswith("Top-1 accuracy (%) on 24 examples of the test split of a local copy")


def test_eval_on_save_to_disk_and_parquet_with_named_columns(export, tmp_path):
    model, root, images = export
    picture = [Image.fromarray(p) for p, _ in images]
    # Labels stored as the model's ids, in a column named "target"; the images in "picture".
    rows = datasets.Dataset.from_dict(
        {"picture": picture, "target": [CLASSES.index(name) for _, name in images]},
        features=datasets.Features({"picture": datasets.Image(), "target": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": rows.select(range(3)), "validation": rows}).save_to_disk(tmp_path / "disk")
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    expected = _expected(model, images)
    for source in (tmp_path / "disk", tmp_path / "rows.parquet"):
        result = tmp_path / f"{source.name}.json"
        args = ["eval", str(root / "export"), "--dataset", str(source), "--image-column", "picture"]
        args += ["--label_column", "target", "--output_json", str(result), "--no_record"]
        assert cli_main(args) == 0, source
        assert _accuracies(result) == expected, source
    assert json.loads((root / "export" / "oscq_export.json").read_text())["metrics"] is None  # --no_record


def test_eval_errors_are_one_line_and_say_what_to_pass(export, tmp_path, capsys):
    _, root, _ = export
    cases = [
        (["--dataset", str(root / "images"), "--split", "dev"], "has no split 'dev'; its splits are ['test']"),
        (["--dataset", str(root / "images"), "--label_column", "target"], "has no column 'target'"),
        (["--dataset", "no-such-org/no-such-dataset"], "Could not load the dataset 'no-such-org/no-such-dataset'"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert cli_main(["eval", str(root / "export"), *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("hf-oscq eval: error: ") and message in err and err.count("\n") == 1, err
    assert "pass a local copy" in err  # the offline Hub id names the local alternatives


def test_eval_needs_a_saved_image_processor_for_other_datasets(tmp_path, capsys):
    hf_oscq.export_quantized(_model(), tmp_path / "bare", bits=(3,))
    for name in ("dog", "cat"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / name / "0.png")
    assert cli_main(["eval", str(tmp_path / "bare"), "--dataset", str(tmp_path / "images")]) == 1
    assert "has no preprocessor_config.json" in capsys.readouterr().err


def _last_error_line(err: str) -> str:
    """The error line after any progress bars; no traceback before it."""
    assert "Traceback" not in err and "automatic conversion" not in err, err
    return err.strip().splitlines()[-1]


def test_eval_of_unusable_image_data_is_one_line(export, tmp_path, capsys):
    """Every kind of unusable dataset ends in one line naming it and what to pass, exit 1: an empty folder, an image
    that does not decode, a file that is not parquet, labels outside the model's classes (which no prediction could
    match)."""
    _, root, images = export
    (tmp_path / "empty").mkdir()
    broken = shutil.copytree(root / "images", tmp_path / "broken")
    (broken / "test" / "dog" / "0.png").write_bytes(b"not an image")
    (tmp_path / "rows.parquet").write_bytes(b"not parquet")
    rows = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p, _ in images], "label": [7] + [0] * (len(images) - 1)},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    rows.save_to_disk(tmp_path / "labels")
    cases = [
        (tmp_path / "empty", "cannot be used (EmptyDatasetError: "),
        (broken, "rows 0 to 23 cannot be used (UnidentifiedImageError: "),
        (tmp_path / "rows.parquet", "cannot be used (ArrowInvalid: "),
        (tmp_path / "labels", "The dataset's labels run from 0 to 7, but "),
    ]
    for source, message in cases:
        capsys.readouterr()
        assert cli_main(["eval", str(root / "export"), "--dataset", str(source), "--no_record"]) == 1, source
        line = _last_error_line(capsys.readouterr().err)
        assert line.startswith("hf-oscq eval: error: ") and message in line, line
    assert "but the model has 3 classes, and without class names they cannot be matched" in line


def test_eval_of_corrupted_packed_codes_is_the_loaders_error_in_one_line(export, tmp_path, capsys):
    """Codes no export writes, in a file whose checksum was recomputed (a faulty writer): the loader's own error,
    once, instead of transformers' "issues during automatic conversion" after a report and two tracebacks."""
    from safetensors.torch import load_file

    from hf_oscq.export.checkpoint import read_config, serialize_checkpoint

    _, root, _ = export
    folder = shutil.copytree(root / "export", tmp_path / "export")
    path = folder / "w3" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["classifier.weight"] = torch.full_like(tensors["classifier.weight"], 0xFF)
    path.write_bytes(serialize_checkpoint(tensors, 3, read_config(path.parent)))
    capsys.readouterr()
    assert cli_main(["eval", str(folder), "--dataset", str(root / "images"), "--no_record"]) == 1
    err = capsys.readouterr().err
    assert _last_error_line(err) == (  # found before any checkpoint is evaluated: no table, no w2 result first
        f"hf-oscq eval: error: The packed weight 'classifier.weight in {path}' is invalid: its codes hold the value "
        "7, which no 3-bit code produces (valid: 0..6). The file is corrupted or was packed at another bit-width: "
        "export the model again."
    )
    assert "accuracy" not in err


def test_eval_outputs_that_cannot_be_written_are_one_line(export, tmp_path, capsys, monkeypatch):
    """`--output_json` under a file fails before anything is evaluated; a manifest that cannot be written (a
    read-only export folder) says how to evaluate without writing."""
    _, root, _ = export
    (tmp_path / "FILE").write_text("")
    arguments = ["eval", str(root / "export"), "--dataset", str(root / "images")]
    assert cli_main([*arguments, "--output_json", str(tmp_path / "FILE" / "t.json")]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"hf-oscq eval: error: --output_json '{tmp_path / 'FILE' / 't.json'}': '{tmp_path / 'FILE'}' is a file, where "
        "a folder belongs. Pass a path whose existing parts are folders.\n"
    )
    folder = shutil.copytree(root / "export", tmp_path / "export")
    manifest = (folder / "oscq_export.json").read_bytes()

    def read_only(export_dir, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(export_dir / "oscq_export.json"))

    monkeypatch.setattr("hf_oscq.evaluation.record_evaluation", read_only)
    capsys.readouterr()
    assert cli_main(["eval", str(folder), "--dataset", str(root / "images")]) == 1
    assert _last_error_line(capsys.readouterr().err) == (
        f"hf-oscq eval: error: Cannot record the evaluation in {folder}: '{folder / 'oscq_export.json'}' is on a "
        "read-only file system: write to a folder on a writable disk. Pass --no_record to evaluate without writing "
        "into the export folder."
    )
    assert (folder / "oscq_export.json").read_bytes() == manifest


def test_eval_of_a_language_model_on_unusable_text_is_one_line(tmp_path, capsys):
    """A local text dataset with an empty validation.txt, or one that is not UTF-8 text: one line, exit 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_oscq.scripts.text import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    hf_oscq.export_quantized(LlamaForCausalLM(config), tmp_path / "lm", bits=(3,), tokenizer=tokenizer)
    for name, validation, message in (
        ("empty", b"", 'cannot be used (ValueError: Instruction "validation" corresponds to no data!)'),
        ("binary", b"\xff\xfe\xfa text \xc3\x28\n", "cannot be used (DatasetGenerationError: "),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.txt").write_text("In the beginning God created the heaven and the earth.\n")
        (tmp_path / name / "validation.txt").write_bytes(validation)
        capsys.readouterr()
        arguments = ["eval", str(tmp_path / "lm"), "--dataset", str(tmp_path / name), "--no_record"]
        assert cli_main(arguments) == 1
        line = _last_error_line(capsys.readouterr().err)
        assert line.startswith(f"hf-oscq eval: error: The text dataset '{tmp_path / name}' {message}"), line
        assert line.endswith(
            "a local folder needs train.txt and validation.txt (or test.txt), each holding text, one document a line."
        )


def _error_line(err: str) -> str:
    """The one error line of a failed command (progress bars of dataset loading may precede it)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("hf-oscq eval: error: "), err
    return lines[0]


def _renamed_imagefolder(root, target, names: dict[str, str]):
    """The fixture's images under other class folder names (`names`: model class -> folder name)."""
    for folder in (root / "images" / "test").iterdir():
        shutil.copytree(folder, target / "test" / names.get(folder.name, folder.name))
    return target


def test_eval_refuses_classes_it_cannot_match_and_takes_an_explicit_label_map(export, tmp_path, capsys):
    """A class folder that is no class of the model (`T-shirt/top` cannot be a folder name, so a Fashion-MNIST
    imagefolder names it otherwise) is refused by name instead of numbering the classes alphabetically; the user's
    `--label_map` (inline JSON or a .json file, by model class name or id) gives the accuracy by hand. Places: an
    imagefolder, a save_to_disk ClassLabel with other names, integer labels beyond the model's classes, a mapping
    naming no dataset class, two classes sent to one."""
    model, root, images = export
    folder = _renamed_imagefolder(root, tmp_path / "renamed", {"dog": "Dog_"})
    argv = ["eval", str(root / "export"), "--dataset", str(folder), "--no_record"]
    assert cli_main(argv) == 1
    err = _error_line(capsys.readouterr().err)
    assert "The dataset's classes ['Dog_'] are not classes of the model" in err
    assert "model classes without a match: ['dog']" in err and """--label_map '{"Dog_": "dog"}'""" in err
    expected = _expected(model, images)
    (tmp_path / "map.json").write_text(json.dumps({"Dog_": 0}))
    for mapping in ('{"Dog_": "dog"}', str(tmp_path / "map.json")):
        result = tmp_path / "table.json"
        assert cli_main([*argv, "--label_map", mapping, "--output_json", str(result)]) == 0, capsys.readouterr().err
        assert _accuracies(result) == expected
    rows = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p, _ in images], "label": [CLASSES.index(n) for _, n in images]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["hound", "bird", "cat"])}
        ),
    )
    rows.save_to_disk(tmp_path / "disk")
    ids = rows.cast_column("label", datasets.Value("int64")).map(lambda row: {"label": row["label"] + 1})
    ids.to_parquet(str(tmp_path / "ids.parquet"))
    cases = [
        (["--dataset", str(tmp_path / "disk")], "The dataset's classes ['hound'] are not classes of the model"),
        (["--dataset", str(tmp_path / "ids.parquet")], "labels run from 1 to 3, but the model has 3 classes"),
        (["--dataset", str(folder), "--label_map", '{"dgo": "dog"}'], "names ['dgo'], which are not classes"),
        (["--dataset", str(folder), "--label_map", '{"Dog_": "cat"}'], "map to the model's class ids [2]"),
        (["--dataset", str(folder), "--label_map", "[1]"], "--label_map must be a JSON object"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert cli_main(["eval", str(root / "export"), *extra, "--no_record"]) == 1
        assert message in _error_line(capsys.readouterr().err)


def test_recipe_datasets_carry_their_class_names_and_are_matched_by_them():
    """A recipe dataset (digits; Fashion-MNIST from Debian's IDX files, whose labels are bare ids) is evaluated with
    its class names, so a model whose classes are named otherwise (the Hub's copy of Fashion-MNIST spells the first
    class `T - shirt / top`) is refused by name, with the mapping that would match them, instead of trusting ids."""
    from transformers import PretrainedConfig

    from hf_oscq.evaluation import _labels_in_model_order, load_eval_split
    from hf_oscq.label_map import LabelMismatchError
    from hf_oscq.scripts.data import FASHION_MNIST_LABELS, _idx_dir

    digits, split = load_eval_split("digits", max_samples=5, seed=3)
    assert digits.features["label"].names == [str(i) for i in range(10)] and split == "test (80/20 split, seed 3)"
    if _idx_dir(None) is None:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    fashion, split = load_eval_split("fashion_mnist", max_samples=20)
    assert fashion.features["label"].names == list(FASHION_MNIST_LABELS) and split == "test"

    def config(names):
        return PretrainedConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})

    same = config(FASHION_MNIST_LABELS)
    assert _labels_in_model_order(fashion, same)["label"] == fashion["label"]
    hub_names = ["T - shirt / top", *FASHION_MNIST_LABELS[1:]]
    other = config(hub_names)
    with pytest.raises(LabelMismatchError, match=r"\['T-shirt/top'\] are not classes of the model") as refused:
        _labels_in_model_order(fashion, other)
    assert """--label_map '{"T-shirt/top": "T - shirt / top"}'""" in str(refused.value)
    renumbered = _labels_in_model_order(fashion, other, {"T-shirt/top": "T - shirt / top"})
    assert renumbered["label"] == fashion["label"]


def test_eval_that_cannot_write_its_json_leaves_the_export_as_it_was(export, tmp_path, capsys, monkeypatch):
    """`--output_json` naming an existing folder is refused before anything is evaluated; a JSON write that fails
    after the evaluation (a full disk) is one line, and the export's manifest and cards are left as they were: the
    export folder is written last."""
    _, root, _ = export
    folder = shutil.copytree(root / "export", tmp_path / "export")
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    (tmp_path / "taken").mkdir()
    arguments = ["eval", str(folder), "--dataset", str(root / "images")]
    assert cli_main([*arguments, "--output_json", str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err == (
        f"hf-oscq eval: error: --output_json '{tmp_path / 'taken'}' is a folder, where a file belongs: pass a file "
        "path.\n"
    )

    write_text = Path.write_text

    def disk_full(path, *args, **kwargs):
        if path == tmp_path / "table.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert cli_main([*arguments, "--output_json", str(tmp_path / "table.json")]) == 1
    line = _last_error_line(capsys.readouterr().err)
    assert "no space left on the device" in line and line.endswith("The export folder was left as it was.")
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


def test_batchnorm_handling_of_single_checkpoint_folders_is_read_from_what_was_written(tmp_path):
    """What `hf-oscq eval` of one checkpoint folder says about BatchNorm: a packed ResNet-18 folder (whose config.json
    guards its architecture) is built on the meta device with the guarded fields put back; re-estimated or plain
    as its quantization_config records; its fp folder is full precision (nothing rounded); a model without
    BatchNorm says so. A compressed-tensors folder reads the export's manifest (its config has no such field)."""
    from _export_models import tiny_resnet18

    from hf_oscq.evaluation import _warn_plain_rounded_batchnorm, checkpoint_batchnorm
    from hf_oscq.export.folder import bn_recalibrated

    model = tiny_resnet18()
    batches = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))}]
    estimated = hf_oscq.export_quantized(model, tmp_path / "estimated", bits=(3,), calibration_batches=batches)
    plain = hf_oscq.export_quantized(model, tmp_path / "plain", bits=(3,), plain_rounding=True)
    assert checkpoint_batchnorm(estimated / "w3") == ("re-estimated", None)
    assert checkpoint_batchnorm(plain / "w3") == ("plain", None)
    assert checkpoint_batchnorm(plain / "fp") == ("full-precision", None)
    assert checkpoint_batchnorm(estimated) == ("re-estimated", 4)  # the export: its manifest
    assert checkpoint_batchnorm(tmp_path / "plain") == ("plain", None)
    vit = hf_oscq.export_quantized(_model(), tmp_path / "vit", bits=(3,))
    assert checkpoint_batchnorm(vit / "w3") == ("none", None)
    assert bn_recalibrated(plain / "fp") is None and bn_recalibrated(plain / "w3") is False
    pytest.importorskip("compressed_tensors", reason="compressed-tensors (Python >= 3.11) is not installed")
    spec = hf_oscq.QuantSpec(3, exclude_modules=[r"timm_model\.(conv1|layer.*)"])
    ct = hf_oscq.export_quantized(
        model, tmp_path / "ct", bits=(3,), spec=spec, calibration_batches=batches, format="compressed-tensors"
    )
    assert bn_recalibrated(ct / "w3") is True
    assert _warn_plain_rounded_batchnorm("w3", ct / "w3", model) is True  # re-estimated: no warning


@pytest.mark.parametrize("damage", ["missing_variant", "truncated_manifest", "manifest_not_an_object"])
def test_eval_of_a_damaged_export_fails_before_evaluating_and_changes_nothing(export, tmp_path, capsys, damage):
    """An export with a checkpoint folder missing, or a manifest that is truncated or not a JSON object, is refused
    in one line before any checkpoint is evaluated, and nothing in it is rewritten (the manifest was rewritten
    before the incomplete export was noticed, and a broken manifest ended in a traceback)."""
    _, root, _ = export
    folder = shutil.copytree(root / "export", tmp_path / "export")
    if damage == "missing_variant":
        shutil.rmtree(folder / "w2")
    elif damage == "truncated_manifest":
        (folder / "oscq_export.json").write_text('{"format_version": 2, "bits": [2,')
    else:
        (folder / "oscq_export.json").write_text("[]")
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert cli_main(["eval", str(folder), "--dataset", str(root / "images")]) == 1
    out, err = capsys.readouterr()
    expected = {
        "missing_variant": "the folder w2/ is missing",
        "truncated_manifest": "oscq_export.json is not valid JSON",
        "manifest_not_an_object": "oscq_export.json does not hold a JSON object",
    }[damage]
    line = _last_error_line(err)
    assert line.startswith("hf-oscq eval: error: ") and expected in line, line
    assert "Traceback" not in err and "accuracy" not in out + err
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
