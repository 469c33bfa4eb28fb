"""Writes the measured numbers of README.md and docs/RESULTS.md from the records in bench/results/, and finds the
numbers there that no record backs.

    python bench/docs.py           # rewrites every generated block of README.md and docs/RESULTS.md
    python bench/docs.py --check   # exit 1 when a block differs from its records or a quoted number has no source

A generated block sits between `<!-- BEGIN GENERATED: NAME -->` and `<!-- END GENERATED: NAME -->` and is rendered by
the generator registered as NAME (blocks named after a script, `bench/aggregate.py` and `bench/aggregate_full.py`,
are written by that script, which also draws the plots).

Adding a block for a new benchmark (the hook):
1. have the benchmark write its JSON under bench/results/, with the dependency versions it ran on;
2. write `def render_NAME(results: Path) -> str` here, reading that JSON and returning Markdown, decorated with
   `@generator("NAME")`;
3. put the two markers with that NAME where the block goes, and run `python bench/docs.py`.

Outside generated blocks and code, a measured number (a decimal, or a count of %, x, s, ms, MB, points...) must be
a number some generated block of the same document shows, or a value of a record that its section names by path
(`bench/results/...`): `unsourced_numbers` lists the others, and the test suite fails on them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "RESULTS.md")
_BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED(?:: (?P=name))? -->)", re.S
)
GENERATORS: dict[str, Callable[[Path], str]] = {}


def generator(name: str):
    """Registers `render(results_dir) -> Markdown` as the generator of the blocks named `name`."""

    def register(render: Callable[[Path], str]) -> Callable[[Path], str]:
        GENERATORS[name] = render
        return render

    return register


# ------------------------------------------------------------------------------------------------ the demo


def demo_records(results: Path, folder: str = "demo") -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((results / folder).glob("seed*.json"))]


def _accuracy(record: dict, run: str, column: str) -> float:
    return 100 * record["tables"][run][column]["accuracy"]


def _span(values: list[float]) -> str:
    low, high = f"{min(values):.1f}", f"{max(values):.1f}"
    return low if low == high else f"{low}-{high}"


def _versions(record: dict) -> str:
    versions = record.get("versions") or {}
    names = ("torch", "transformers", "accelerate", "timm")
    return ", ".join(f"{name} {versions[name]}" for name in names if versions.get(name))


def _measured_on(record: dict) -> str:
    from hf_oscq.provenance import Provenance

    provenance = Provenance.from_dict(next(iter((record.get("provenance") or {}).values()), None))
    return provenance.describe() if provenance else "what it was measured on was not recorded"


def _settings(records: list[dict]) -> str:
    first = records[0]
    seconds = [record["seconds"] for record in records]
    load = [
        value for record in records for value in (record["load_average_before"][0], record["load_average_after"][0])
    ]
    threads = first.get("torch_threads", "not recorded")
    return (
        f"{_versions(first)}; {_span_of(seconds, '.0f')} s a seed on {first['machine']}, torch threads: {threads}, "
        f"load average {_span_of(load, '.1f')} (the machine shared with other jobs); each table "
        f"{_measured_on(first)}"
    )


def _span_of(values: list[float], spec: str) -> str:
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}-{high}"


def _seeds(records: list[dict]) -> str:
    seeds = [str(record["seed"]) for record in records]
    return seeds[0] if len(seeds) == 1 else f"{', '.join(seeds[:-1])} and {seeds[-1]}"


_RUNS = (("oscillation", "regularizer @3 (defaults)"), ("qat", "QAT @3"), ("none", "FP + PTQ"))
HIGH = ("w5", "w6", "w7", "w8")


def _gaps(records: list[dict]) -> dict[str, list[float]]:
    """Per seed: the regularizer's 2-bit lead over the better baseline, its 3-bit distance to QAT, the 3-bit spread
    of the three runs, and its worst 5-8-bit distance to its own and to the FP run's full precision."""
    gaps: dict[str, list[float]] = {"w2": [], "w3_qat": [], "w3_spread": [], "own": [], "fp_run": []}
    for record in records:
        value = lambda run, column, r=record: _accuracy(r, run, column)  # noqa: E731
        gaps["w2"].append(value("oscillation", "w2") - max(value("qat", "w2"), value("none", "w2")))
        gaps["w3_qat"].append(value("oscillation", "w3") - value("qat", "w3"))
        three = [value(run, "w3") for run, _ in _RUNS]
        gaps["w3_spread"].append(max(three) - min(three))
        high = [value("oscillation", column) for column in HIGH]
        gaps["own"].append(max(abs(v - value("oscillation", "fp")) for v in high))
        gaps["fp_run"].append(value("none", "fp") - min(high))
    return gaps


@generator("demo")
def render_demo(results: Path) -> str:
    """README: the 3-seed ranges of the demo's table and what they show."""
    records = demo_records(results)
    lines = [
        f"What the demo's table shows, for seeds {_seeds(records)} (`python bench/demo.py --seeds 0 1 2` runs and "
        f"checks them; records in `bench/results/demo/`: {_settings(records)}):",
        "",
        f"| top-1 accuracy (%), lowest-highest of the {len(records)} seeds | fp | w2 | w3 | w5..w8 |",
        "|---|---|---|---|---|",
    ]
    for run, label in _RUNS:
        cells = [_span([_accuracy(r, run, column) for r in records]) for column in ("fp", "w2", "w3")]
        cells.append(_span([_accuracy(r, run, column) for r in records for column in HIGH]))
        if run == "oscillation":
            cells[1] = f"**{cells[1]}**"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    gaps = _gaps(records)
    under = -min(gaps["w3_qat"])
    qat = f"the regularizer {under:.1f} under QAT at worst" if under > 0 else "the regularizer at or above QAT"
    below = max(gaps["fp_run"])
    plain = f"at most {below:.1f} point under the plain run's" if below > 0 else "at or above the plain run's"
    checks = [row["holds"] for record in records for row in record["checks"]]
    fp = [_accuracy(r, "none", "fp") / 100 for r in records]
    examples = records[0]["config"].get("max_eval_samples")
    noise = 100 * math.sqrt(statistics_mean(fp) * (1 - statistics_mean(fp)) / examples) if examples else None
    lines += [
        "",
        f"At 2 bits, the bit-width below its target, the regularized model keeps {_span(gaps['w2'])} points more than "
        f"the better of the two baselines; at 3 bits the three runs are within {max(gaps['w3_spread']):.1f} points of "
        "each other "
        f"({qat}); at 5-8 bits it stays within {max(gaps['own']):.1f} point of its own full precision and {plain}. "
        "`bench/demo.py`'s checks: "
        f"{sum(checks)} of {len(checks)} hold."
        + (
            f" Every model here is far from trained (64 steps), and {examples:,} test images put about {noise:.1f} "
            "points of binomial noise on each number."
            if noise is not None
            else ""
        ),
    ]
    return "\n".join(lines)


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


@generator("demo-seeds")
def render_demo_seeds(results: Path) -> str:
    """docs/RESULTS.md: every seed's table and the checks of `bench/demo.py`."""
    records = demo_records(results)
    columns = ["fp"] + [f"w{b}" for b in range(2, 9)]
    seeds = ",".join(str(record["seed"]) for record in records)
    lines = [
        f"Records in `bench/results/demo/seed{{{seeds}}}.json`: {_settings(records)}.",
        "",
        "| seed | seconds | run | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for record in records:
        for index, (run, label) in enumerate(_RUNS):
            head = f"| {record['seed']} | {record['seconds']:.0f} |" if index == 0 else "|  |  |"
            cells = [f"{_accuracy(record, run, column):.1f}" for column in columns]
            if run in ("oscillation", "qat"):
                cells[2] = f"**{cells[2]}**"
            lines.append(f"{head} {label} | " + " | ".join(cells) + " |")
    lines += ["", "The checks `bench/demo.py` applies, per seed:", ""]
    lines += ["| seed | check | values | holds |", "|---|---|---|---|"]
    for record in records:
        for row in record["checks"]:
            holds = "yes" if row["holds"] else "no"
            lines.append(f"| {record['seed']} | {row['check']} | {row['values']} | {holds} |")
    return "\n".join(lines)


@generator("demo-digits")
def render_demo_digits(results: Path) -> str:
    """README and docs/RESULTS.md: what `make demo-digits` shows (seed 0)."""
    (record,) = demo_records(results, "demo_digits")[:1]
    value = lambda run, column: _accuracy(record, run, column)  # noqa: E731
    held = {row["check"][:3]: row["holds"] for row in record["checks"]}
    three = (
        f"and the 3-bit claim: {value('oscillation', 'w3'):.1f} % against QAT's {value('qat', 'w3'):.1f} %"
        if held.get("(a)")
        else f"but not the 3-bit claim: the regularizer is {value('qat', 'w3') - value('oscillation', 'w3'):.1f} "
        f"points under QAT there ({value('oscillation', 'w3'):.1f} against {value('qat', 'w3'):.1f} %)"
    )
    return (
        f"`make demo-digits` (micro ViT on scikit-learn's digits, seed {record['seed']}, "
        f"`bench/results/demo_digits/seed{record['seed']}.json`; {_versions(record) or 'versions not recorded'}) "
        "shows the 2-bit gain "
        f"({value('oscillation', 'w2'):.1f} % against {value('none', 'w2'):.1f} % for FP + PTQ and "
        f"{value('qat', 'w2'):.1f} % for QAT @3) {three}."
    )


# ------------------------------------------------------------------------------------------------ the blocks


def render_blocks(text: str, results: Path = RESULTS) -> str:
    """`text` with every registered block rendered again from `results` (other blocks kept as they are)."""

    def replace(match: re.Match) -> str:
        render = GENERATORS.get(match["name"])
        if render is None:
            return match[0]
        return f"{match[1]}{render(results).rstrip()}\n{match[4]}"

    return _BLOCK.sub(replace, text)


def generated_spans(text: str) -> list[tuple[int, int]]:
    """`(start, end)` character offsets of the body of every generated block."""
    return [(match.start("body"), match.end("body")) for match in _BLOCK.finditer(text)]


# ------------------------------------------------------------------------------------------------ the audit

# A measured number: a decimal, or a whole number followed by a unit of measure.
_UNIT = r"(?:\s?%|x\b|\s(?:s|ms|MB|kB|GB|min|h|hours|minutes|points?)\b)"
_NUMBER = re.compile(r"(?<![\w.,])(\d[\d,]*\.\d+|\d[\d,]*(?=" + _UNIT + r"))(?![\d.]*\.\d)")
_CITED = re.compile(r"bench/results/[\w./{},*-]+")
_LOG_KEYS = re.compile(r"log|history", re.I)


def _record_values(record, out: set[float]) -> None:
    """Every number of a record (strings included), except those of training logs."""
    if isinstance(record, bool):
        return
    if isinstance(record, int | float):
        out.add(float(record))
    elif isinstance(record, dict):
        for key, value in record.items():
            if not _LOG_KEYS.search(str(key)):
                _record_values(value, out)
    elif isinstance(record, list):
        for value in record:
            _record_values(value, out)
    elif isinstance(record, str):
        out.update(float(number) for number in re.findall(r"\d+(?:\.\d+)?", record))


def _expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for part in match[1].split(",") for expanded in _expand(head + part + tail)]


def cited_values(paths: list[str], root: Path = ROOT) -> set[float]:
    """The numbers of the records named by `paths` (files, folders, `{a,b}` and `*` patterns)."""
    values: set[float] = set()
    for cited in paths:
        for pattern in _expand(cited.rstrip(".,);:")):
            target = root / pattern
            files = sorted(root.glob(pattern)) if "*" in pattern else [target]
            for path in files:
                for file in sorted(path.rglob("*.json")) if path.is_dir() else [path]:
                    if file.suffix == ".json" and file.is_file():
                        _record_values(json.loads(file.read_text()), values)
    return values


def _shown(value: float, token: str) -> bool:
    decimals = len(token.split(".")[1]) if "." in token else 0
    number = token.replace(",", "")
    # as recorded, as a percentage of a fraction, or in MB of a byte count
    return any(f"{value * scale:.{decimals}f}" == number for scale in (1, 100, 1e-6))


def unsourced_numbers(document: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """`(line, number)` of every measured number of `document` outside code and generated blocks that neither a
    generated block (of it, or of the other `DOCUMENTS`) shows nor a record its section cites (by a
    `bench/results/...` path) holds."""
    text = document.read_text()
    spans = generated_spans(text)
    shown = {
        number.replace(",", "")
        for other in {document, *DOCUMENTS}
        for start, end in generated_spans(other.read_text())
        for number in re.findall(r"\d[\d,]*(?:\.\d+)?", other.read_text()[start:end])
    }
    found, offset, fenced = [], 0, False
    sections = re.split(r"(?m)^(?=#{1,3} )", text)
    for section in sections:
        values = cited_values(_CITED.findall(section), root)
        for line in section.splitlines(keepends=True):
            start, offset = offset, offset + len(line)
            if any(a <= start < b for a, b in spans) or "GENERATED:" in line:
                continue
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                continue
            # links' targets, code, URLs, arXiv ids and version requirements are not measurements
            prose = re.sub(r"\]\([^)]*\)|`[^`]*`|https?://\S+|arXiv:\S+|(?:Python|>=|<=|==)\s*[\d.]+", " ", line)
            for match in _NUMBER.finditer(prose):
                token = match[1]
                if token.replace(",", "") in shown or any(_shown(value, token) for value in values):
                    continue
                found.append((text.count("\n", 0, start) + 1, token))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where the documents are stale")
    args = parser.parse_args(argv)
    failed = False
    for document in DOCUMENTS:
        text = document.read_text()
        rendered = render_blocks(text)
        if rendered != text:
            if args.check:
                sys.stdout.write(f"{document.relative_to(ROOT)}: generated blocks differ from bench/results/\n")
                failed = True
            else:
                document.write_text(rendered)
                sys.stdout.write(f"rewrote the generated blocks of {document.relative_to(ROOT)}\n")
        for line, number in unsourced_numbers(document):
            where = f"{document.relative_to(ROOT)}:{line}"
            sys.stdout.write(f"{where}: {number} is in no generated block or cited record\n")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("docs.py", main))
