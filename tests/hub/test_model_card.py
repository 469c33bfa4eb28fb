"""Model cards and plots rendered from a real export folder, checked with huggingface_hub's own card parser."""

import ast
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from _export_fixture import BITS, TRAINING, build_export, tiny_model
from huggingface_hub import ModelCard, ModelCardData

import hf_oscq
from hf_oscq.export.folder import ExportFolderError, read_export_manifest
from hf_oscq.hub import ACCURACY_PLOT, HISTOGRAM_PLOT
from hf_oscq.hub.model_card import render_card_files, write_model_cards

REPO = "acme/tiny-vit"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return build_export(tmp_path_factory.mktemp("export") / "tiny-vit")


@pytest.fixture(scope="module")
def manifest(export_dir):
    return json.loads((export_dir / "oscq_export.json").read_text())


@pytest.fixture(scope="module")
def cards(export_dir):
    return {v: render_card_files(export_dir, v, REPO) for v in ["fp"] + [f"w{b}" for b in BITS]}


def _table_row(body: str, label: str) -> list[str]:
    rows = [line for line in body.splitlines() if line.startswith(f"| {label} |")]
    assert rows, f"no table row {label!r}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")][1:]


def _percents(table: dict) -> list[str]:
    return [f"{100 * table[key]['accuracy']:.1f}" for key in ["fp"] + [f"w{b}" for b in BITS]]


@pytest.mark.parametrize("variant", ["fp", "w2", "w3", "w4"])
def test_card_metadata_parses_and_eval_results_round_trip(cards, manifest, variant):
    card = ModelCard(cards[variant]["README.md"].decode())
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0"
    assert data.datasets is None  # scikit-learn's digits have no Hub id; the text names them
    assert "trained on digits" in card.text
    assert {"hf_oscq", "quantization"} <= set(data.tags)
    expected_name = REPO.split("/")[1] + ("" if variant == "fp" else f"-{variant}")
    assert data.model_name == expected_name
    if variant == "fp":
        assert "full-precision" in data.tags
        assert data.base_model is None and data.to_dict().get("base_model_relation") is None
    else:
        assert f"{variant[1:]}-bit" in data.tags
        assert data.base_model == REPO
        assert data.to_dict()["base_model_relation"] == "quantized"

    (result,) = data.eval_results
    assert result.metric_type == "accuracy"
    assert result.metric_value == manifest["metrics"][variant]["accuracy"]
    assert (result.task_type, result.dataset_name, result.dataset_split) == ("image-classification", "digits", "test")

    # model-index -> ModelCardData -> YAML -> ModelCard gives back the same evaluation results
    rebuilt = ModelCardData(**data.to_dict())
    assert rebuilt.eval_results == data.eval_results
    reparsed = ModelCard(f"---\n{rebuilt.to_yaml()}\n---\n")
    assert reparsed.data.eval_results == data.eval_results
    assert reparsed.data.model_name == expected_name


def test_card_tables_carry_the_measured_accuracies(cards, manifest, export_dir):
    body = cards["w3"]["README.md"].decode()
    assert _table_row(body, "this model") == _percents(manifest["metrics"])
    assert _table_row(body, "oscillation regularizer (this model)") == _percents(manifest["metrics"])
    assert _table_row(body, "QAT") == _percents(manifest["comparisons"]["qat"])
    assert _table_row(body, "FP + PTQ") == _percents(manifest["comparisons"]["fp_ptq"])
    # the variants table links every bit-width's repo with its accuracy and size on disk
    for b in BITS:
        size_kb = manifest["sizes_bytes"][f"w{b}"] / 1000
        link = f"[{REPO}-w{b}](https://huggingface.co/{REPO}-w{b})" + (" (this page)" if b == 3 else "")
        row = _table_row(body, link)
        assert row == [f"{b} bits", f"{100 * manifest['metrics'][f'w{b}']['accuracy']:.1f} %", f"{size_kb:.1f} kB"]


def test_card_body_has_recipe_loading_snippet_and_citation(cards):
    body = cards["w3"]["README.md"].decode()
    assert "import hf_oscq" in body
    assert 'AutoModelForImageClassification.from_pretrained("acme/tiny-vit-w3")' in body
    # settings as a person reads them: labels in words, plain values
    readable = {
        "learning rate": "0.003",
        "epochs": "15",
        "batch size per device": "64",
        "seed": "0",
        "osc_lambda (penalty weight)": "1",
    }
    assert set(TRAINING["hyperparameters"]) == {
        "learning_rate",
        "num_train_epochs",
        "per_device_train_batch_size",
        "seed",
    }
    for label, value in readable.items():
        assert f"| {label} | {value} |" in body
    assert TRAINING["command"] in body
    assert "arxiv.org/abs/2502.00490" in body and "Wensh{\\o}j" in body and "Transactions on Machine Learning" in body
    assert "3 bits: 7 levels" in body
    fp_body = cards["fp"]["README.md"].decode()
    assert 'from_pretrained("acme/tiny-vit")' in fp_body


def test_card_pipeline_example_runs_as_written(tmp_path, cards):
    from PIL import Image

    from hf_oscq.scripts.data import DATASETS
    from hf_oscq.scripts.models import build_image_processor

    assert "pipeline(" not in cards["w3"]["README.md"].decode()  # no saved image processor, no pipeline example
    processor = build_image_processor(DATASETS["digits"])
    export = hf_oscq.export_quantized(
        tiny_model(), tmp_path / "digits", bits=(3,), image_processor=processor, plain_rounding=True
    )
    body = render_card_files(export, "w3")["README.md"].decode()
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
    example = next(block for block in blocks if "pipeline(" in block)
    assert 'pipeline("image-classification", model="path/to/digits/w3")' in example
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8), "L").save(tmp_path / "image.png")
    code = example.replace("path/to/digits/w3", str(export / "w3")).replace("image.png", str(tmp_path / "image.png"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {})
    top = ast.literal_eval(printed.getvalue())
    assert [entry["label"] for entry in top] and sorted(entry["label"] for entry in top) == [
        "LABEL_0",
        "LABEL_1",
        "LABEL_2",
    ]
    assert sum(entry["score"] for entry in top) == pytest.approx(1, abs=1e-5)


def test_card_images_are_pngs_referenced_by_relative_path(cards):
    for files in cards.values():
        body = files["README.md"].decode()
        assert set(files) == {"README.md", ACCURACY_PLOT, HISTOGRAM_PLOT}
        for image in (ACCURACY_PLOT, HISTOGRAM_PLOT):
            assert files[image].startswith(PNG_MAGIC)
            assert f"]({image})" in body


def test_rendering_is_deterministic(export_dir, cards):
    # Identical bytes on every render: re-pushing an unchanged export uploads nothing new.
    assert render_card_files(export_dir, "w2", REPO) == cards["w2"]


def test_histogram_uses_the_first_quantized_layer_with_its_own_thresholds(cards):
    body = cards["w2"]["README.md"].decode()
    first = next(iter(hf_oscq.select_weights(tiny_model())))
    assert f"Full-precision weights of `{first}` with the 2-bit rounding thresholds" in body
    assert f"Full-precision weights of `{first}` with the 3-bit" in cards["fp"]["README.md"].decode()  # osc_bits


def test_card_without_repo_id_names_local_folders(export_dir):
    card = ModelCard(render_card_files(export_dir, "w3")["README.md"].decode())
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert card.data.model_name == f"{export_dir.name}-w3"
    assert f'from_pretrained("path/to/{export_dir.name}/w3")' in card.text
    assert "https://huggingface.co/" not in card.text


def test_card_without_recorded_results(tmp_path):
    export_dir = build_export(tmp_path / "bare", with_results=False)
    files = render_card_files(export_dir, "w3", REPO)
    card = ModelCard(files["README.md"].decode())
    assert card.data.eval_results is None
    assert "No evaluation was recorded" in card.text
    assert "No training record was stored" in card.text
    assert set(files) == {"README.md", HISTOGRAM_PLOT}


def test_write_model_cards_into_export_and_into_a_cards_folder(export_dir, tmp_path, cards):
    copy = shutil.copytree(export_dir, tmp_path / "tiny-vit")
    written = write_model_cards(copy, REPO)
    assert written == [copy / v / "README.md" for v in ["fp", "w2", "w3", "w4"]]
    assert (copy / "w3" / HISTOGRAM_PLOT).read_bytes() == cards["w3"][HISTOGRAM_PLOT]
    outside = write_model_cards(export_dir, REPO, output_dir=tmp_path / "model_cards")
    assert outside[2] == tmp_path / "model_cards" / "tiny-vit-w3" / "README.md"
    assert outside[2].read_bytes() == cards["w3"]["README.md"]


def test_unknown_variant_is_rejected(export_dir):
    with pytest.raises(ValueError, match=r"Unknown variant 'w5'.*\['fp', 'w2', 'w3', 'w4'\]"):
        render_card_files(export_dir, "w5", REPO)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "oscq_export.json").unlink(), r"oscq_export\.json is missing"),
        (lambda d: shutil.rmtree(d / "w3"), r"the folder w3/ is missing"),
        (lambda d: (d / "fp" / "model.safetensors").unlink(), r"fp/ has no complete model\.safetensors"),
        (lambda d: (d / "w2" / "pytorch_model.bin").write_bytes(b"x"), r"pickle files \['pytorch_model\.bin'\]"),
        (
            lambda d: _edit_json(d / "w4" / "config.json", quantization_config={"quant_method": "oscq", "bits": 8}),
            r"w4/config\.json says bits=8, expected 4",
        ),
        (lambda d: _edit_json(d / "oscq_export.json", format_version=3), r"format_version 3; this hf_oscq reads"),
        (lambda d: _edit_json(d / "oscq_export.json", bits=[1, 3]), r"invalid bit-widths"),
    ],
)
def test_incomplete_export_folders_are_rejected(export_dir, tmp_path, damage, message):
    copy = shutil.copytree(export_dir, tmp_path / "damaged")
    damage(copy)
    with pytest.raises(ExportFolderError, match=message):
        read_export_manifest(copy)


def _edit_json(path, **changes):
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


def test_card_readme_has_no_unrendered_template_syntax(cards):
    for files in cards.values():
        assert not re.search(r"{{|{%|None\b", files["README.md"].decode())


def test_card_settings_datasets_install_line_and_evaluation_source(tmp_path):
    from hf_oscq.versions import BUILD_WHEEL, INSTALL_COMMAND, INSTALL_FROM_CLONE

    export_dir = build_export(tmp_path / "fashion")
    manifest_path = export_dir / "oscq_export.json"
    manifest = json.loads(manifest_path.read_text())
    # as exports written before readable settings stored them, and with a dataset that has a Hub id
    manifest["training"]["hyperparameters"].update({"optimizer": "OptimizerNames.ADAMW_TORCH", "max_steps": -1})
    manifest["training"].update({"dataset": "fashion_mnist", "dataset_id": "zalando-datasets/fashion_mnist"})
    manifest_path.write_text(json.dumps(manifest))
    card = ModelCard(render_card_files(export_dir, "w3", REPO)["README.md"].decode())
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert "trained on [fashion_mnist](https://huggingface.co/datasets/zalando-datasets/fashion_mnist)" in card.text
    assert "| optimizer | adamw_torch |" in card.text and "OptimizerNames" not in card.text
    assert "max steps" not in card.text  # -1: not set
    assert f"{INSTALL_COMMAND}   # hf_oscq is not on PyPI: `{BUILD_WHEEL}` in a clone" in card.text
    assert f"`{INSTALL_FROM_CLONE}` there installs the clone itself" in card.text and "<URL" not in card.text
    assert "Top-1 accuracy (%) on 64 examples of the test split of digits; plain rounding" in card.text
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split) == ("digits", "test")
    # a recipe run on part of the data says how much of it
    manifest["training"].update({"train_samples": 4096})
    manifest["provenance"]["metrics"].update(
        {"dataset": "zalando-datasets/fashion_mnist", "examples": 1000, "batchnorm": "re-estimated", "bn_samples": 256}
    )
    manifest_path.write_text(json.dumps(manifest))
    card = ModelCard(render_card_files(export_dir, "w3", REPO)["README.md"].decode())
    assert "fashion_mnist) (4,096 training images) with" in card.text
    assert (
        "Top-1 accuracy (%) on 1,000 examples of the test split of zalando-datasets/fashion_mnist; BatchNorm "
        "statistics re-estimated after rounding on 256 training images."
    ) in card.text
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split) == ("zalando-datasets/fashion_mnist", "test")
    assert result.metric_name == "Top-1 accuracy (3-bit PTQ)"  # its value a fraction, as the model index stores it


def _section(body: str, heading: str) -> str:
    start = body.index(heading)
    end = body.find("\n#", start + len(heading))
    return body[start : end if end != -1 else None]


def test_tables_of_different_evaluations_are_never_merged(tmp_path):
    """A card sets side by side only tables of the same provenance. Places: the comparison table, the accuracy
    plot (`comparison_tables`), an export re-evaluated on other data (`hf-oscq eval`, `record_evaluation`), an export
    written without provenance and one written before provenance was recorded (shown as not recorded, alone)."""
    from hf_oscq.evaluation import record_evaluation
    from hf_oscq.hub.card_facts import comparison_tables

    export_dir = build_export(tmp_path / "tiny-vit")
    manifest = read_export_manifest(export_dir)
    body = render_card_files(export_dir, "w3", REPO)["README.md"].decode()
    together = _section(body, "### Compared with QAT and plain PTQ")
    assert "| QAT |" in together and "| oscillation regularizer (this model) |" in together
    assert "### Measured otherwise" not in body
    assert set(comparison_tables(manifest)) == {"oscillation regularizer (this model)", "QAT", "FP + PTQ"}

    # re-evaluated on 10 images of a local imagefolder: the comparisons (64 images) get their own labelled table
    local = hf_oscq.Provenance("accuracy", "local", "test", examples=10, batchnorm="plain")
    record_evaluation(export_dir, {key: {"accuracy": 0.5} for key in manifest["metrics"]}, local)
    manifest = read_export_manifest(export_dir)
    body = render_card_files(export_dir, "w3", REPO)["README.md"].decode()
    assert "### Compared with QAT and plain PTQ" not in body
    assert "Top-1 accuracy (%) on 10 examples of the test split of a local copy of a dataset" in body
    other = _section(body, "### Measured otherwise")
    assert "on 64 examples of the test split of digits" in other and "| QAT |" in other and "| FP + PTQ |" in other
    assert "(this model)" not in other
    assert set(comparison_tables(manifest)) == {"oscillation regularizer (this model)"}
    assert str(tmp_path) not in body

    # written before provenance was recorded, by an hf-oscq eval that stored the folder's path
    raw = json.loads((export_dir / "oscq_export.json").read_text())
    raw.pop("provenance")
    raw["evaluation"] = {"dataset": str(tmp_path / "images"), "split": "test", "samples": 10}
    (export_dir / "oscq_export.json").write_text(json.dumps(raw))
    card = ModelCard(render_card_files(export_dir, "w3", REPO)["README.md"].decode())
    assert "was not recorded with this export" in card.text and str(tmp_path) not in card.text
    assert card.data.eval_results is None  # the model index carries only numbers whose data is known
    assert _section(card.text, "### Measured otherwise").count("not recorded") == 1
    assert "### Compared with QAT" not in card.text


def test_card_loading_example_runs_and_classifies_like_the_model(tmp_path, monkeypatch):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTImageProcessor

    model = tiny_model()
    processor = ViTImageProcessor(do_resize=True, size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5])
    export_dir = hf_oscq.export_quantized(
        model, tmp_path / "export", bits=(3,), image_processor=processor, plain_rounding=True
    )
    body = render_card_files(export_dir, "w3")["README.md"].decode()
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    assert '.convert("L")' in code  # the model takes one-channel images
    pixels = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    printed = []
    code = code.replace(f"path/to/{export_dir.name}/w3", str(export_dir / "w3"))
    exec(code, {"print": printed.append})
    gray = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32) / 255
    inputs = torch.tensor((gray - 0.5) / 0.5).reshape(1, 1, 8, 8)
    with torch.no_grad():
        expected = hf_oscq.quantize_model(model, 3)(pixel_values=inputs).logits.argmax(-1).item()
    assert printed == [model.config.id2label[expected]]


@pytest.mark.parametrize("repo_id", ["me/..", "me/.", "../..", "me/a/b", "me/a\\b", "me/"])
def test_repo_id_derived_paths_stay_inside_output_dir(export_dir, tmp_path, repo_id):
    output_dir = tmp_path / "cards" / "model_cards"
    output_dir.mkdir(parents=True)
    readme = tmp_path / "cards" / "README.md"
    readme.write_text("the user's own README")
    with pytest.raises(ValueError, match=r"repo_id must be ORG/NAME|Invalid Hub repository name"):
        write_model_cards(export_dir, repo_id, output_dir=output_dir)
    assert readme.read_text() == "the user's own README"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [
        Path("cards"),
        Path("cards/README.md"),
        Path("cards/model_cards"),
    ]
