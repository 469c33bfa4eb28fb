"""The numbers of README.md and docs/RESULTS.md come from bench/results/ (`bench/docs.py`): every generated block
equals what its records render, and every measured number outside them is shown by a generated block or held by a
record its section cites. The documents also name what the code writes (the figure's tag)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


docs = _load("docs")


@pytest.mark.parametrize("document", docs.DOCUMENTS, ids=lambda path: path.name)
def test_generated_blocks_equal_what_their_records_render(document):
    text = document.read_text()
    names = [match["name"] for match in docs._BLOCK.finditer(text)]
    assert names, f"{document.name} has no generated block"
    assert docs.render_blocks(text) == text, f"stale: run python bench/docs.py ({document.name})"


@pytest.mark.parametrize("document", docs.DOCUMENTS, ids=lambda path: path.name)
def test_every_quoted_number_has_a_source(document):
    assert docs.unsourced_numbers(document) == []


def test_the_demo_numbers_of_readme_come_from_the_demo_records_of_the_current_versions():
    """The README's demo block is rendered from bench/results/demo/, whose records carry the versions they ran on."""
    import torch
    import transformers

    records = docs.demo_records(docs.RESULTS)
    assert [record["seed"] for record in records] == [0, 1, 2]
    for record in records:
        assert record["versions"]["torch"] == torch.__version__.split("+")[0]
        assert record["versions"]["transformers"] == transformers.__version__
    readme = (ROOT / "README.md").read_text()
    assert docs.render_demo(docs.RESULTS) in readme


def test_the_audit_finds_a_hand_typed_number_and_accepts_sourced_ones(tmp_path, monkeypatch):
    """A number typed by hand fails; the same number in a generated block, or in a record its section cites, passes;
    numbers in code, links, version requirements and whole numbers without a unit are not measurements."""
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "cost.json").write_text(json.dumps({"ratio": 1.234, "log": [{"loss": 9.87}]}))
    document = tmp_path / "DOC.md"
    monkeypatch.setattr(docs, "DOCUMENTS", (document,))
    body = (
        "# Speed\n\nThe step costs 1.23x of a plain one (`bench/results/cost.json`), 98.7 % of runs agree.\n\n"
        "## Other\n\nIt costs 1.23x here and its loss is 9.87; `python x.py --lr 0.005`, Python >= 3.10, "
        "3 bits, [link](https://x.org/v1.2).\n\n```bash\nrun 4.56 s\n```\n"
    )
    document.write_text(body)
    found = docs.unsourced_numbers(document, root=tmp_path)
    assert [number for _, number in found] == ["98.7", "1.23", "9.87"]  # the log's values are not results
    document.write_text(body + "\n<!-- BEGIN GENERATED: x -->\n98.7 and 9.87\n<!-- END GENERATED: x -->\n")
    assert [number for _, number in docs.unsourced_numbers(document, root=tmp_path)] == ["1.23"]


def test_a_registered_block_is_rewritten_from_its_records_and_others_are_kept(tmp_path, monkeypatch):
    monkeypatch.setitem(docs.GENERATORS, "answer", lambda results: f"The answer is {len(list(results.iterdir()))}.")
    (tmp_path / "a.json").write_text("{}")
    text = (
        "intro\n<!-- BEGIN GENERATED: answer -->\nold\n<!-- END GENERATED: answer -->\n"
        "<!-- BEGIN GENERATED: bench/aggregate.py -->\nkept\n<!-- END GENERATED -->\n"
    )
    assert docs.render_blocks(text, tmp_path) == text.replace("old", "The answer is 1.")


def test_readme_names_the_figure_tags_the_trainer_writes():
    """The accuracy-vs-bit-width figure goes to `{metric_key_prefix}/accuracy_vs_bits`: `eval` during training and
    in `trainer.evaluate()`, `test` in the recipes' final evaluation; the README names both as the code spells them."""
    from hf_oscq.training.report import FIGURE_TAG

    readme = (ROOT / "README.md").read_text()
    for prefix in ("eval", "test"):
        assert f"`{FIGURE_TAG.format(prefix=prefix)}`" in readme
    recipe = (ROOT / "hf_oscq" / "scripts" / "recipe.py").read_text()
    assert 'metric_key_prefix="test"' in recipe
