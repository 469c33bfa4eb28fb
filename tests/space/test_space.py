"""The Gradio Space (space/app.py): loading families, bad input, every endpoint over HTTP, and a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import hf_oscq
from hf_oscq import cross_bit_evaluate, quantize_model
from hf_oscq.scripts.data import DATASETS, load_image_dataset
from hf_oscq.scripts.models import build_image_processor, build_vit

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REPO_ROOT = Path(__file__).resolve().parents[2]
SPACE_DIR = REPO_ROOT / "space"
sys.path.insert(0, str(SPACE_DIR))

from oscq_space.classify import MAX_PIXELS, InputError, load_image  # noqa: E402
from oscq_space.families import EXPORT_FILE, configured_entries, load_families  # noqa: E402

BITS = (2, 3, 4, 5, 6, 7, 8)
DIGIT_EXAMPLE = SPACE_DIR / "examples" / "digit_3.png"


def _accuracy(model, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        predicted = model(pixel_values=pixel_values).logits.argmax(-1)
    return {"accuracy": float((predicted == labels).float().mean())}


def _contract_export(model, out: Path, processor, record: dict) -> None:
    """The export folder layout of the shared contract, for as long as hf_oscq.export_quantized is not available.

    The children are plain `save_pretrained` folders of the PTQ'd model (float weights on the grid), which
    transformers loads without the oscq loader.
    """
    for name, child in [("fp", model)] + [(f"w{b}", quantize_model(model, b)) for b in BITS]:
        child.save_pretrained(out / name)
        processor.save_pretrained(out / name)
    sizes = {name: (out / name / "model.safetensors").stat().st_size for name in ["fp"] + [f"w{b}" for b in BITS]}
    record = {
        "format_version": 1,
        "bits": list(BITS),
        "per_channel": False,
        "target_modules": None,
        "exclude_modules": None,
        "bn_recalibrated": False,
        "sizes_bytes": sizes,
        **record,
    }
    (out / EXPORT_FILE).write_text(json.dumps(record))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A real export of an untrained tiny digits ViT at 2..8 bits, with its measured cross-bit accuracy."""
    torch.manual_seed(0)
    model = build_vit(DATASETS["digits"], [str(i) for i in range(10)], size="micro").eval()
    processor = build_image_processor(DATASETS["digits"])  # 8-bit digits 0..255 -> [-1, 1], as in training
    test = load_image_dataset("digits").eval[:]
    pixel_values, labels = torch.stack(test["pixel_values"]), torch.as_tensor(test["labels"])
    metrics = cross_bit_evaluate(model, lambda m: _accuracy(m, pixel_values, labels), bits=BITS)
    record = {
        "metrics": metrics,
        "training": {"osc_method": "oscillation", "osc_bits": 3, "osc_lambda": 1.0, "dataset": "digits"},
        "comparisons": {"qat": {k: {"accuracy": v["accuracy"] / 2} for k, v in metrics.items()}},
    }
    out = tmp_path_factory.mktemp("export") / "digits-oscillation"
    measured = hf_oscq.Provenance("accuracy", "digits", "test (80/20 split, seed 0)", len(labels), batchnorm="none")
    if hasattr(hf_oscq, "export_quantized"):
        hf_oscq.export_quantized(model, out, bits=BITS, image_processor=processor, provenance=measured, **record)
    else:
        _contract_export(model, out, processor, record)
    return out


@pytest.fixture(scope="module")
def families(export_dir):
    loaded, problems = load_families([str(export_dir)])
    assert problems == []
    return loaded


# ---------------------------------------------------------------------------------------------------- loading


def test_configured_entries_env_and_discovery(tmp_path):
    assert configured_entries({"OSCQ_MODELS": " org/a , ./b,, "}, tmp_path) == ["org/a", "./b"]
    for name in ("zeta/run", "alpha"):
        (tmp_path / "outputs" / name).mkdir(parents=True)
        (tmp_path / "outputs" / name / EXPORT_FILE).write_text("{}")
    (tmp_path / "outputs" / "noise").mkdir()
    expected = [str(tmp_path / "outputs" / "alpha"), str(tmp_path / "outputs" / "zeta" / "run")]
    assert configured_entries({}, tmp_path) == expected
    assert configured_entries({}, tmp_path / "elsewhere", space_card=tmp_path / "no-card.md") == []
    card = tmp_path / "README.md"
    card.write_text("---\nsdk: gradio\nmodels:\n  - org/vit-digits\n  - org/vit-digits-qat\n---\n# Space\n")
    assert configured_entries({}, tmp_path / "elsewhere", space_card=card) == ["org/vit-digits", "org/vit-digits-qat"]
    assert configured_entries({}, tmp_path, space_card=card) == expected  # local exports come first


def test_a_recipe_export_is_named_after_its_run_folder(export_dir, tmp_path):
    shutil.copytree(export_dir, tmp_path / "fashion_mnist_demo" / "export")  # where a recipe writes its export
    (family,), _ = load_families([str(tmp_path / "fashion_mnist_demo" / "export")])
    assert family.name == "Oscillation · fashion_mnist_demo"


def test_family_loads_every_bit_width(families, export_dir):
    (family,) = families
    assert family.name == "Oscillation · digits-oscillation"
    assert [v.name for v in family.loaded] == ["fp", "w8", "w7", "w6", "w5", "w4", "w3", "w2"]
    for variant in family.loaded:
        weights = sorted(export_dir.joinpath(variant.name).glob("*.safetensors"))
        assert variant.size_bytes == sum(path.stat().st_size for path in weights) > 0
    assert family.num_channels == 1


def test_missing_checkpoint_and_bad_entries_are_reported(export_dir, tmp_path, monkeypatch):
    def unreachable_hub(repo_id, **kwargs):
        raise ConnectionError("Hub unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable_hub)
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    shutil.rmtree(broken / "w5")
    (broken / "w4" / "config.json").write_text("{ not json")
    loaded, problems = load_families([str(broken), str(tmp_path / "nowhere"), "org/missing"])
    (family,) = loaded
    assert [v.name for v in family.loaded] == ["fp", "w8", "w7", "w6", "w3", "w2"]
    assert any(p.startswith("w5: checkpoint missing") for p in problems)
    assert any(p.startswith("w4: could not load") for p in problems)
    assert f"{str(tmp_path / 'nowhere')!r} is neither an existing folder nor a Hub repo id" in problems[-2]
    assert problems[-1] == "Could not download 'org/missing' from the Hub (ConnectionError: Hub unreachable)."


def test_batchnorm_family_rounded_without_re_estimation_is_flagged(tmp_path):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(0)
    narrow = {"channels": (8, 16, 32, 64), "stem_width": 8, "in_chans": 1}
    model = TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="resnet18", num_labels=10, model_args=narrow)
    ).eval()
    batches = [{"pixel_values": torch.randn(16, 1, 8, 8)}]
    hf_oscq.export_quantized(model, tmp_path / "plain", bits=(3,), plain_rounding=True)
    hf_oscq.export_quantized(model, tmp_path / "re-estimated", bits=(3,), calibration_batches=batches)
    plain, re_estimated = (tmp_path / "plain", tmp_path / "re-estimated")
    flag = (
        "the quantized checkpoints were rounded without re-estimating the BatchNorm statistics (plain rounding, the "
        "paper's PTQ), which costs accuracy at low bit-widths; `hf-oscq export` with its defaults re-estimates them."
    )
    loaded, problems = load_families([str(plain), str(re_estimated)])
    assert [family.name for family in loaded] == ["model · plain", "model · re-estimated"]
    assert [p for p in problems if "BatchNorm" in p] == [f"model · plain: {flag}"]
    # an export written before the manifest recorded `has_batchnorm`: the loaded model answers
    record = json.loads((plain / EXPORT_FILE).read_text())
    del record["has_batchnorm"]
    (plain / EXPORT_FILE).write_text(json.dumps(record))
    assert [p for p in load_families([str(plain)])[1] if "BatchNorm" in p] == [f"model · plain: {flag}"]


# ---------------------------------------------------------------------------------------------------- images


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims `width x height` (no pixel data): enough to test the size check cheaply."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def test_load_image_converts_and_rejects(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # fully transparent: becomes black
    rgba[1, 1, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    gray, notes = load_image(tmp_path / "rgba.png", "L", background=0)
    assert gray.mode == "L"
    assert notes == ["transparent pixels composited on black", "converted from RGBA to grayscale"]
    pixels = np.asarray(gray)
    red_luma = round(200 * 299 / 1000)  # ITU-R 601-2 luma, as PIL converts RGB to L
    assert pixels[0, 0] == 0 and pixels[2, 2] == red_luma and abs(int(pixels[1, 1]) - round(red_luma * 128 / 255)) <= 1
    rgb, notes = load_image(DIGIT_EXAMPLE, "RGB")
    assert rgb.mode == "RGB" and notes == ["converted from L to RGB"]
    same, notes = load_image(DIGIT_EXAMPLE, "L", background=0)
    assert notes == [] and np.array_equal(np.asarray(same), np.asarray(Image.open(DIGIT_EXAMPLE)))
    digit = np.asarray(Image.open(DIGIT_EXAMPLE), dtype=np.uint16)
    Image.fromarray(digit * 257).save(tmp_path / "digit16.png")  # the same digit as a 16-bit PNG
    sixteen, notes = load_image(tmp_path / "digit16.png", "L", background=0)
    assert np.array_equal(np.asarray(sixteen), np.asarray(same)) and notes[0] == "16-bit pixels scaled to 0..255"
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned clockwise; a viewer turns it counter-clockwise back
    Image.fromarray(np.rot90(np.asarray(same), k=-1)).save(tmp_path / "phone.jpg", quality=100, exif=exif)
    upright, notes = load_image(tmp_path / "phone.jpg", "L", background=0)
    assert notes == ["turned upright as its EXIF orientation says"]
    assert np.abs(np.asarray(upright, dtype=int) - np.asarray(same, dtype=int)).max() <= 2  # JPEG at quality 100

    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="notes.txt is not an image"):
        load_image(tmp_path / "notes.txt", "L")
    _png_header_only(tmp_path / "huge.png", 6000, MAX_PIXELS // 6000 + 1)
    with pytest.raises(InputError, match="6000 x 4167 pixels; the limit is 25 megapixels"):
        load_image(tmp_path / "huge.png", "L")
    with pytest.raises(InputError, match="Upload an image"):
        load_image(None, "L")


# ---------------------------------------------------------------------------------------------------- HTTP API


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(families):
    """The app on a free local port; yields its URL."""
    import app

    demo = app.build_demo(families, [])
    port = _free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served, verbose=False, analytics_enabled=False, download_files=False)


def _expected_top5(export_dir: Path, variant: str, image_path: Path) -> list[tuple[str, float]]:
    """Independent of the app: the digits' normalisation of 8-bit pixels ((p / 255 - 0.5) / 0.5) and a fresh model."""
    raw = np.asarray(Image.open(image_path), dtype=np.float32)
    pixel_values = torch.tensor((raw / 255 - 0.5) / 0.5).reshape(1, 1, 8, 8)
    model = AutoModelForImageClassification.from_pretrained(export_dir / variant).eval()
    with torch.no_grad():
        probabilities = model(pixel_values=pixel_values).logits[0].softmax(-1)
    values, indices = probabilities.topk(5)
    return [(model.config.id2label[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]


@pytest.mark.slow
def test_classify_endpoint(client, families, export_dir):
    from gradio_client import handle_file

    name = families[0].name
    message, cards, table = client.predict(name, handle_file(str(DIGIT_EXAMPLE)), api_name="/classify")
    assert message.startswith(f"{name}: 8 checkpoints on a 8 x 8 image. True label: **3** (")
    assert "Latency: median of 15 timed forward passes per checkpoint (batch 1, after 2 warm-up passes" in message
    assert table["headers"][:5] == ["checkpoint", "bits", "size on disk (bytes)", "latency (ms)", "top-1"]
    rows = table["data"]
    assert [row[0] for row in rows] == ["fp", "w8", "w7", "w6", "w5", "w4", "w3", "w2"]
    assert [row[1] for row in rows[1:]] == [8, 7, 6, 5, 4, 3, 2]
    assert cards.count('class="oscq-variant"') == 8
    for variant, _, size, latency, top1, top1_prob, top5 in rows:
        assert size == (export_dir / variant / "model.safetensors").stat().st_size
        assert float(latency) > 0 and len(latency.split(".")[1]) == 3 and len(top1_prob.split(".")[1]) == 4
        expected = _expected_top5(export_dir, variant, DIGIT_EXAMPLE)
        assert (top1, float(top1_prob)) == (expected[0][0], pytest.approx(expected[0][1], abs=1e-4))
        assert [part.rsplit(" (", 1)[0] for part in top5.split(", ")] == [label for label, _ in expected]
        assert f'data-variant="{variant}"' in cards
        shown = f"{size / 1000:.1f} kB" if size < 10**6 else f"{size / 10**6:.1f} MB"  # decimal, as the cards
        assert f'<p class="oscq-meta">{shown} · ' in cards
    right = sum(row[4] == "3" for row in rows)
    assert f"({right} of 8 checkpoints right)" in message
    assert cards.count('class="oscq-right"') == right and cards.count('class="oscq-wrong"') == 8 - right


@pytest.mark.slow
def test_classify_endpoint_bad_input_keeps_app_up(client, families, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    name = families[0].name
    (tmp_path / "notes.txt").write_text("not an image")
    _png_header_only(tmp_path / "huge.png", 8000, 8000)
    rgba = np.full((16, 16, 4), 255, dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    message, cards, table = client.predict(name, handle_file(str(tmp_path / "notes.txt")), api_name="/classify")
    assert message.startswith("**⚠️") and "is not an image" in message and cards == "" and table["data"] == []
    message, _, table = client.predict(name, handle_file(str(tmp_path / "huge.png")), api_name="/classify")
    assert "8000 x 8000 pixels" in message and table["data"] == []
    with pytest.raises(AppError, match="not in the list of choices"):  # gradio validates dropdowns itself
        client.predict("no such family", handle_file(str(DIGIT_EXAMPLE)), api_name="/classify")
    message, _, table = client.predict(name, handle_file(str(tmp_path / "rgba.png")), api_name="/classify")
    assert "converted from RGBA to grayscale" in message and len(table["data"]) == 8  # still up, and it works


@pytest.mark.slow
def test_accuracy_endpoint(client, export_dir):
    plot, table, message = client.predict(api_name="/accuracy")
    record = json.loads((export_dir / EXPORT_FILE).read_text())
    # Pivoted: one row per run, one column per checkpoint, most bits first.
    assert table["headers"] == ["run", "full precision"] + [f"{b} bits" for b in range(8, 1, -1)]
    expected = [
        [curve]
        + [round(100 * table_[variant]["accuracy"], 1) for variant in ["fp"] + [f"w{b}" for b in range(8, 1, -1)]]
        for curve, table_ in [("Oscillation", record["metrics"]), ("QAT", record["comparisons"]["qat"])]
    ]
    assert table["data"] == expected
    assert message == (
        "2 accuracy curves from the exports' records and cards. Top-1 accuracy (%) on 360 examples of the test "
        "(80/20 split, seed 0) split of digits; no BatchNorm layer."
    )
    with Image.open(_local_file(plot)) as image:
        assert image.format == "PNG" and image.size[0] > 300


def _local_file(payload) -> str:
    """A file output of the client without download: a served URL we fetch, or a local path."""
    import httpx

    url = payload["url"] if isinstance(payload, dict) else payload
    if isinstance(url, str) and url.startswith("http"):
        target = Path(os.environ.get("TMPDIR", "/tmp")) / f"oscq_space_test_{abs(hash(url))}.png"
        target.write_bytes(httpx.get(url).content)
        return str(target)
    return payload["path"] if isinstance(payload, dict) else payload


@pytest.mark.slow
def test_weights_endpoints(client, families, export_dir):
    name = families[0].name
    layers, widths = client.predict(name, api_name="/weight_choices")
    assert layers["value"] == "vit.embeddings.patch_embeddings.projection.weight"
    assert [value for _, value in widths["choices"]] == [8, 7, 6, 5, 4, 3, 2]
    assert widths["value"] == 3  # the bit-width the family was trained for
    # transformers 5 names the parameter differently in memory (what the app lists) and on disk (save_pretrained)
    layer, saved_as = "vit.layers.0.attention.q_proj.weight", "vit.encoder.layer.0.attention.attention.query.weight"
    plot, table, message = client.predict(name, layer, 3, api_name="/weights")
    weight = load_file(export_dir / "fp" / "model.safetensors")[saved_as].double().numpy()
    scale = np.abs(weight).max() / 3  # 3 bits: codes -3 .. 3
    codes, counts = np.unique(np.round(weight / scale), return_counts=True)
    expected = {int(c): int(n) for c, n in zip(codes, counts, strict=True)}
    assert [row[0] for row in table["data"]] == [-3, -2, -1, 0, 1, 2, 3]
    assert {row[0]: row[2] for row in table["data"]} == {c: expected.get(c, 0) for c in range(-3, 4)}
    assert [row[1] for row in table["data"]] == pytest.approx([c * scale for c in range(-3, 4)], abs=1e-6)
    assert message.startswith(f"{layer} at 3 bits: {weight.size} weights on 7 levels")
    with Image.open(_local_file(plot)) as image:
        assert image.format == "PNG"


def test_examples_are_test_images_with_their_true_labels(families, tmp_path):
    from oscq_space.examples import load_examples
    from oscq_space.views import classify_view

    from hf_oscq.scripts.data import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, _idx_dir, digits_splits, read_idx

    examples = load_examples()
    assert {dataset: [e.label for e in listed] for dataset, listed in examples.items()} == {
        "digits": ["0", "3", "8", "9"],
        "fashion_mnist": ["Ankle boot", "Pullover", "Trouser"],
    }
    test = digits_splits()[1].with_format("numpy")
    images, labels = np.asarray(test["pixel_values"]), np.asarray(test["labels"])
    for example in examples["digits"]:  # each is a test image whose label is the one listed
        pixels = np.asarray(Image.open(example.path))
        matches = {int(labels[i]) for i in range(len(images)) if np.array_equal(images[i], pixels)}
        assert str(matches.pop()) == example.label and not matches, example.path.name
    if _idx_dir(None) is not None:
        fashion = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
        fashion_labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
        for example in examples["fashion_mnist"]:
            index = next(
                i for i in range(len(fashion)) if np.array_equal(fashion[i], np.asarray(Image.open(example.path)))
            )
            assert FASHION_MNIST_LABELS[fashion_labels[index]] == example.label

    by_name = {family.name: family for family in families}
    name = families[0].name
    assert families[0].dataset == "digits"
    copy = tmp_path / "upload.png"  # gradio hands examples over as copies: found by content
    shutil.copy(DIGIT_EXAMPLE, copy)
    message, cards, rows = classify_view(by_name, name, str(copy), examples)
    right = sum(row[4] == "3" for row in rows)
    assert f"True label: **3** ({right} of 8 checkpoints right)." in message and len(rows) == 8
    boot = SPACE_DIR / "examples" / "fashion_ankle-boot.png"
    message, _, rows = classify_view(by_name, name, str(boot), examples)
    assert "This is a fashion_mnist example (Ankle boot)" in message and "trained on digits" in message
    assert "True label" not in message and len(rows) == 8
    message, _, _ = classify_view(by_name, name, str(copy))  # without the examples: no label claimed
    assert "True label" not in message


def test_numbers_on_the_page_come_from_the_records_they_are_plotted_from(export_dir, families, tmp_path):
    """The intro quotes each family's own record with what it was measured on (no number of another run); the
    Accuracy tab plots only curves measured alike and names the ones it leaves out; an example whose label is none of
    the model's class names gets no right / wrong verdict."""
    from app import _intro
    from oscq_space.examples import Example
    from oscq_space.views import accuracy_view, classify_view

    record = json.loads((export_dir / EXPORT_FILE).read_text())
    intro = _intro(families, [])
    fp, w2 = (100 * record["metrics"][name]["accuracy"] for name in ("fp", "w2"))
    assert f"{fp:.1f} % at full precision, {w2:.1f} % at 2 bits; top-1 accuracy (%) on 360 examples" in intro
    assert not re.search(r"\d %", intro.replace(f"{fp:.1f} %", "").replace(f"{w2:.1f} %", ""))

    other = tmp_path / "digits-other"
    shutil.copytree(export_dir, other)
    record["provenance"]["comparisons"]["examples"] = 100  # the baselines scored on another subset
    (other / EXPORT_FILE).write_text(json.dumps(record))
    (family,), _ = load_families([str(other)])
    _, table, message = accuracy_view([family])
    assert [row[0] for row in table["data"]] == ["Oscillation"]
    assert "Not shown, since measured otherwise: QAT (top-1 accuracy (%) on 100 examples" in message

    relabelled = Example(DIGIT_EXAMPLE, "three", "digits")  # the dataset's copy names its classes otherwise
    copy = tmp_path / "upload.png"
    shutil.copy(DIGIT_EXAMPLE, copy)
    message, _, rows = classify_view({family.name: family}, family.name, str(copy), {"digits": [relabelled]})
    assert "True label" not in message and "'three', is not one of" in message and len(rows) == 8
    assert "✓" not in classify_view({family.name: family}, family.name, str(copy), {"digits": [relabelled]})[1]


def test_accuracy_table_is_pivoted():
    from oscq_space.figures import accuracy_table

    tables = {
        "osc": {"fp": {"accuracy": 0.9712}, "w8": {"accuracy": 0.97}, "w2": {"accuracy": 0.5}},
        "qat": {"w8": {"accuracy": 0.96}, "w3": {"accuracy": 0.949}},
    }
    headers, rows = accuracy_table(tables)
    assert headers == ["run", "full precision", "8 bits", "3 bits", "2 bits"]
    assert rows == [["osc", 97.1, 97.0, None, 50.0], ["qat", None, 96.0, 94.9, None]]


def test_views_reject_bad_choices(families):
    from oscq_space.views import classify_view, weights_view

    by_name = {family.name: family for family in families}
    name, layer = families[0].name, "vit.layers.0.attention.q_proj.weight"
    assert weights_view(by_name, name, layer, 1) == (
        None,
        [],
        "**⚠️ Pick one of the exported bit-widths [8, 7, 6, 5, 4, 3, 2] (got 1).**",
    )
    message = weights_view(by_name, name, "no.such.weight", 3)[2]
    assert message == f"**⚠️ Pick a layer of {name} (got 'no.such.weight').**"
    assert classify_view(by_name, "nope", str(DIGIT_EXAMPLE)) == (
        "**⚠️ No model family named 'nope' is loaded; pick one from the list.**",
        "",
        [],
    )


# ---------------------------------------------------------------------------------------------------- Hub repos


def test_hub_family_per_variant_repos(export_dir, tmp_path, monkeypatch):
    """`ORG/NAME` + `ORG/NAME-w{b}` repos (stubbed download), accuracy read from the cards' eval results."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    repos = {}
    for variant in ["fp", "w4", "w2"]:
        folder = tmp_path / "hub" / variant
        shutil.copytree(export_dir / variant, folder)
        accuracy = {"fp": 0.91, "w4": 0.9, "w2": 0.5}[variant]
        result = EvalResult("image-classification", "digits", "digits", "accuracy", accuracy)
        ModelCard.from_template(ModelCardData(model_name=variant, eval_results=[result])).save(folder / "README.md")
        repos["org/digits" if variant == "fp" else f"org/digits-{variant}"] = folder
    requested = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requested.append(repo_id)
        if repo_id not in repos:
            raise OSError(f"404 {repo_id}")
        return str(repos[repo_id])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    (family,), problems = load_families(["org/digits"])
    assert requested == ["org/digits"] + [f"org/digits-w{b}" for b in range(2, 9)]
    assert [v.name for v in family.loaded] == ["fp", "w4", "w2"] and problems == []
    from oscq_space.figures import family_tables

    assert family_tables(family) == {
        family.name: {"fp": {"accuracy": 0.91}, "w4": {"accuracy": 0.9}, "w2": {"accuracy": 0.5}}
    }


# ---------------------------------------------------------------------------------------------------- browser


def _chromium() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver, installed when missing (or a skip saying why not)."""
    pytest.importorskip("selenium", reason="selenium is not installed: pip install selenium")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver) and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], capture_output=True, timeout=600)
        browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("Chromium could not be installed here: run `apt-get install -y chromium chromium-driver`.")
    return browser, driver


@pytest.mark.slow
def test_browser_classifies_an_example(served, tmp_path):
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(served)
        wait = WebDriverWait(driver, 60)
        # Only the examples of the family's own dataset (digits) are shown, each with its true label.
        items = (By.CSS_SELECTOR, ".gallery-item")
        shown = wait.until(lambda d: [e for e in d.find_elements(*items) if e.is_displayed()])
        assert [e.text for e in shown] == [f"true label: {digit}" for digit in (0, 3, 8, 9)]
        example = shown[0]
        example.click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='image'] img, .image-container img"))
        driver.find_element(By.ID, "classify-button").click()
        cards = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".oscq-variant") or None)
        titles = [card.find_element(By.TAG_NAME, "h4").text.rstrip(" ✓✗") for card in cards]
        assert titles == ["full precision"] + [f"{b}-bit" for b in (8, 7, 6, 5, 4, 3, 2)]
        assert "True label: 0" in driver.find_element(By.ID, "classify-message").text
        screenshot = Path(os.environ.get("OSCQ_SCREENSHOT_DIR", tmp_path)) / "space_classify.png"
        driver.save_screenshot(str(screenshot))
        assert Image.open(screenshot).size[0] >= 1000
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------------- deployment


def test_space_card_front_matter():
    import gradio
    from huggingface_hub import SpaceCard

    data = SpaceCard.load(SPACE_DIR / "README.md").data
    assert (data.sdk, data.sdk_version, data.app_file) == ("gradio", gradio.__version__, "app.py")
    assert len(data.short_description) <= 60  # the Hub's limit


def test_deploy_uploads_app_package_and_models(monkeypatch):
    import deploy
    from huggingface_hub import SpaceCard

    calls = []
    monkeypatch.setattr(deploy.HfApi, "create_repo", lambda self, *a, **k: calls.append(("create_repo", a, k)))
    monkeypatch.setattr(deploy.HfApi, "create_commit", lambda self, *a, **k: calls.append(("create_commit", a, k)))
    url = deploy.deploy("org/oscq-space", ["org/vit-digits", "org/vit-digits-qat"])
    assert url == "https://huggingface.co/spaces/org/oscq-space"
    assert calls[0] == (
        "create_repo",
        ("org/oscq-space",),
        {"repo_type": "space", "space_sdk": "gradio", "private": False, "exist_ok": True},
    )
    operations = calls[1][1][1]
    paths = {operation.path_in_repo for operation in operations}
    expected = {
        "README.md",
        "app.py",
        "requirements.txt",
        "oscq_space/families.py",
        "examples/digit_3.png",
        "hf_oscq/__init__.py",
        "hf_oscq/export/writer.py",
        "hf_oscq/quantization/spec.py",
        "hf_oscq/templates/model_card.md",
    }
    assert expected <= paths and not any("__pycache__" in path or path.endswith(".pyc") for path in paths)
    assert "deploy.py" not in paths and "examples/make_examples.py" not in paths
    readme = next(op for op in operations if op.path_in_repo == "README.md").path_or_fileobj
    assert SpaceCard(readme.decode()).data.models == ["org/vit-digits", "org/vit-digits-qat"]
    with pytest.raises(ValueError, match="--models ORG/NAME"):
        deploy.plan_upload([])


@pytest.mark.slow
def test_python_space_app_py_serves_the_page(export_dir, tmp_path):
    """`python space/app.py` as a user runs it: OSCQ_MODELS names the export, the page answers on the port."""
    import httpx

    port = _free_port()
    environment = {
        **os.environ,
        "OSCQ_MODELS": str(export_dir),
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen([sys.executable, str(SPACE_DIR / "app.py")], env=environment, stdout=log, stderr=log)
    try:
        for _ in range(240):
            try:
                config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=1).json()
                break
            except httpx.HTTPError:
                assert process.poll() is None, (tmp_path / "app.log").read_text()
                time.sleep(0.25)
        else:
            pytest.fail("space/app.py did not serve within 60 s:\n" + (tmp_path / "app.log").read_text())
        api_names = {dependency.get("api_name") for dependency in config["dependencies"]}
        assert {"classify", "accuracy", "weights", "weight_choices"} <= api_names
        assert "**Oscillation · digits-oscillation** (8 checkpoints: " in json.dumps(config, ensure_ascii=False)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_several_families_and_per_channel_grid(export_dir, families, tmp_path):
    """A QAT family next to the oscillation one gets its own qualified curves; per-channel grids count per row."""
    from dataclasses import replace

    from oscq_space.figures import level_counts
    from oscq_space.views import accuracy_view

    qat = tmp_path / "digits-qat"
    shutil.copytree(export_dir, qat)
    record = json.loads((qat / EXPORT_FILE).read_text())
    record.update(training={"osc_method": "qat", "osc_bits": 3}, comparisons=None)
    (qat / EXPORT_FILE).write_text(json.dumps(record))
    loaded, problems = load_families([str(export_dir), str(qat)])
    assert problems == []
    assert [family.name for family in loaded] == ["Oscillation · digits-oscillation", "QAT · digits-qat"]
    _, table, message = accuracy_view(loaded)
    curves = [row[0] for row in table["data"]]  # one row per run
    assert curves == ["Oscillation · digits-oscillation", "QAT (Oscillation · digits-oscillation)", "QAT · digits-qat"]
    assert message.startswith("3 accuracy curves")
    shown = table["metadata"]["display_value"]  # what the page prints: one decimal, whole numbers included
    for row, shown_row in zip(table["data"], shown, strict=True):
        assert shown_row[0] == row[0]
        for value, cell in zip(row[1:], shown_row[1:], strict=True):
            assert cell == "" if value is None else (re.fullmatch(r"\d{1,3}\.\d", cell) and float(cell) == value)

    per_channel = replace(
        families[0], record={**families[0].record, "per_channel": True, "granularity": "per_channel"}
    )
    layer = "vit.layers.0.mlp.fc1.weight"
    weight = dict(families[0].variants["fp"].model.named_parameters())[layer].detach().double().numpy()
    scales = np.abs(weight).max(axis=1, keepdims=True) / 3
    codes, counts = np.unique(np.round(weight / scales), return_counts=True)
    expected = dict(zip(codes.astype(int).tolist(), counts.tolist(), strict=True))
    assert level_counts(per_channel, layer, 3) == {code: expected.get(code, 0) for code in range(-3, 4)}
    assert level_counts(per_channel, layer, 3) != level_counts(families[0], layer, 3)  # one scale per row differs


@pytest.mark.slow
def test_weights_requests_leave_no_temporary_file(families, tmp_path, monkeypatch):
    """Files in the temporary folder (Gradio's cache included) before and after 20 /weights requests."""
    import tempfile

    import app
    from gradio_client import Client

    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    # A server of its own whose temporary folder and Gradio cache are both private_tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(private_tmp / "gradio"))
    demo = app.build_demo(families, [])
    port = _free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False, download_files=False)
        name, layer = families[0].name, "vit.layers.0.attention.q_proj.weight"
        first = client.predict(name, layer, 3, api_name="/weights")[0]
        before = sorted(path for path in private_tmp.rglob("*") if path.is_file())
        plots = [client.predict(name, layer, 3, api_name="/weights")[0] for _ in range(20)]
        after = sorted(path for path in private_tmp.rglob("*") if path.is_file())
    finally:
        demo.close()
    # Gradio's cached examples and its one copy of the plot, made by the first request; nothing per request after
    assert after == before and Path(first["path"]).resolve() in [path.resolve() for path in before]
    assert {plot["path"] for plot in plots} == {first["path"]}
