"""The `hf-oscq` command line as a whole: one flag style with dashed aliases, a help text for every flag, `--version`,
and the commands that README.md and docs/ show, run as written on a tiny trained-model folder."""

import argparse
import importlib.metadata
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hf_oscq
from hf_oscq.cli import build_parser
from hf_oscq.cli import main as cli_main
from hf_oscq.scripts.data import FASHION_MNIST_DIR
from hf_oscq.versions import INSTALL_COMMAND, INSTALL_FROM_CLONE

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help_an_underscore_name_and_a_dashed_alias():
    commands = _subcommands()
    assert set(commands) == {"export", "eval", "push"}
    for command, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (command, action.dest)
            if not action.option_strings:
                continue
            primary = action.option_strings[0]
            assert primary == "--" + action.dest, (command, action.option_strings)
            expected = [primary] + ([primary.replace("_", "-")] if "_" in action.dest else [])
            expected[1:] = [alias for alias in expected[1:] if alias != primary]
            assert action.option_strings == ["--" + action.dest, *expected[1:]], (command, action.option_strings)


def test_dashed_and_underscored_flags_parse_alike():
    parser = build_parser()
    dashed = parser.parse_args(["push", "out", "--repo-id", "org/name", "--dry-run", "--collection-title", "T"])
    underscored = parser.parse_args(["push", "out", "--repo_id", "org/name", "--dry_run", "--collection_title", "T"])
    assert vars(dashed) == vars(underscored)
    assert (underscored.repo_id, underscored.dry_run, underscored.collection_title) == ("org/name", True, "T")
    evaluated = parser.parse_args(["eval", "out", "--dataset", "d", "--max-eval-samples", "5", "--image_column", "x"])
    assert (evaluated.max_eval_samples, evaluated.image_column) == (5, "x")


def test_version_flag_prints_the_installed_version():
    script = Path(sys.executable).with_name("hf-oscq")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "hf_oscq.cli"]
    completed = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"hf-oscq {importlib.metadata.version('hf_oscq')}"


def test_install_instructions_are_the_same_everywhere():
    """Every install instruction is a real one: the package and version of pyproject.toml, from a clone or the wheel
    built there; no placeholder URL and no install from the package index, which does not have hf_oscq. Places:
    README, docs, the cards' templates, the rendered cards in model_cards/, the Space, the library's messages."""
    import re

    from hf_oscq.versions import BUILD_WHEEL, INSTALL_HINT, WHEEL

    pyproject = (ROOT / "pyproject.toml").read_text()
    name, version = (re.search(rf'(?m)^{key} = "([^"]+)"', pyproject)[1] for key in ("name", "version"))
    assert WHEEL == f"{name}-{version}-py3-none-any.whl"
    readme = (ROOT / "README.md").read_text()
    assert INSTALL_COMMAND in readme and BUILD_WHEEL in readme and f"{INSTALL_FROM_CLONE[:-1]}" in readme
    assert INSTALL_COMMAND in INSTALL_HINT and BUILD_WHEEL in INSTALL_HINT and INSTALL_FROM_CLONE in INSTALL_HINT
    texts = ["README.md", "docs", "hf_oscq", "model_cards", "space"]
    files = [p for name in texts for p in ([ROOT / name] if name.endswith(".md") else (ROOT / name).rglob("*"))]
    for path in [p for p in files if p.suffix in (".md", ".py", ".txt")]:
        text = path.read_text()
        assert "<URL" not in text, path
        assert not re.search(r"pip install [\"']?hf_oscq(?:\[[\w,]+\])?[\"']?(?:\s|$)", text), path


def _documented_commands() -> list[tuple[str, str]]:
    """Every `hf-oscq ...` line inside a fenced code block of README.md and docs/*.md, comments stripped; lines with
    `[optional]` syntax and pushes that would send something are left out."""
    commands = []
    for path in DOCUMENTED:
        fenced = False
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            command = line.split(" #")[0].strip()
            if not fenced or not command.startswith("hf-oscq "):
                continue
            if "[" in command or (" push " in command and "--dry_run" not in command):
                continue
            commands.append((path.name, command))
    return commands


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_documented_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from hf_oscq.scripts.data import DATASETS, FASHION_MNIST_LABELS, raw_splits
    from hf_oscq.scripts.models import build_image_processor, build_vit

    info = DATASETS["fashion_mnist"]
    model = build_vit(info, list(FASHION_MNIST_LABELS), size="micro").eval()
    demo = tmp_path / "outputs" / "fashion_mnist_demo"  # where `make demo` saves its model and export
    model.save_pretrained(demo / "training" / "oscillation")
    build_image_processor(info).save_pretrained(demo / "training" / "oscillation")
    hf_oscq.export_quantized(model, demo / "export", bits=(3,), image_processor=build_image_processor(info))
    _, test, _ = raw_splits("fashion_mnist")
    for index in range(40):  # an imagefolder of test images at the README's path/to/images, one folder per class
        image, label = test[index]["pixel_values"], FASHION_MNIST_LABELS[test[index]["labels"]]
        if "/" in label:  # "T-shirt/top" cannot be a folder name
            continue
        folder = tmp_path / "path" / "to" / "images" / "test" / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"{index}.png")
    from _export_models import tiny_llama

    from hf_oscq.scripts.text import byte_tokenizer

    lm_run = tmp_path / "outputs" / "lm_kjv_scratch" / "training" / "oscillation"  # where the LM recipe saves
    tiny_llama().save_pretrained(lm_run)
    byte_tokenizer().save_pretrained(lm_run)
    monkeypatch.chdir(tmp_path)
    commands = _documented_commands()
    if importlib.util.find_spec("compressed_tensors") is None:  # Python 3.10: the format is refused, by design
        commands = [(source, command) for source, command in commands if "compressed-tensors" not in command]
    ran = {shlex.split(command)[1] for _, command in commands}
    assert {"export", "eval", "push"} <= ran, commands
    for source, command in commands:
        capsys.readouterr()
        assert cli_main(shlex.split(command)[1:]) == 0, (source, command, capsys.readouterr().err[-2000:])
    manifest = json.loads((tmp_path / "outputs" / "my_export" / "oscq_export.json").read_text())
    assert set(manifest["metrics"]) == {"fp", "w2", "w3", "w4", "w8"}
    # the last eval of the README: a local imagefolder, recorded as "local" (never its path), its split and size
    measured = manifest["provenance"]["metrics"]
    images = len(list((tmp_path / "path" / "to" / "images" / "test").rglob("*.png")))
    assert (measured["dataset"], measured["split"], measured["examples"]) == ("local", "test", images)
