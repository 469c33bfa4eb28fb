"""Renders the full-data grid (`bench/results/quality_full/*.json`) and the lambda pilot
(`bench/results/quality_pilot/*.json`), both written by `bench/quality.py`, into their generated block of
docs/RESULTS.md, plus accuracy-vs-bit-width plots under docs/.

    python bench/aggregate_full.py       # rewrites the block between the aggregate_full markers of docs/RESULTS.md

Numbers are accuracies in %, mean +- sample standard deviation over seeds (n = number of seeds). The regularizer's
cells carry their penalty normalization: `layer_mean` (the paper's) or `global_mean`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from aggregate import BITS, COLUMNS, MODES, ROOT, format_cell, load_records, mean, save_panels, spread

BEGIN, END = "<!-- BEGIN GENERATED: bench/aggregate_full.py -->", "<!-- END GENERATED: bench/aggregate_full.py -->"
# The goal (issue "robust by default"), on the seed means of the default-evaluation table.
WITHIN_QAT_POINTS = 1.0  # the regularizer at its target bit within this many points of QAT there
ABOVE_PTQ_POINTS = 20.0  # at the bit below the target: at least this far above FP + PTQ
HALFWAY = 0.5  # ... and at least this fraction of the way from QAT's accuracy there to full precision
MODEL_TITLES = {
    "vit": "tiny ViT (hidden 192, 6 layers, 7-pixel patches; no BatchNorm)",
    "resnet18in": "ResNet-18 (timm, ImageNet stem: 7x7 stride-2 convolution and max-pool)",
    "resnet18": "ResNet-18 (timm, CIFAR stem: 3x3 stride-1 convolution, no max-pool)",
}
NORMALIZATION_TITLES = {"layer_mean": "paper (layer mean)", "global_mean": "global mean"}


def key_of(cell: dict) -> tuple:
    """What seeds are averaged over: (model, method, bits, lambda, normalization); None where it does not apply."""
    normalization = cell.get("normalization", "layer_mean") if cell["method"] == "oscillation" else None
    return cell["model"], cell["method"], cell["bits"], cell["osc_lambda"], normalization


def label_of(key: tuple) -> str:
    _, method, bits, osc_lambda, normalization = key
    if method == "none":
        return "FP + PTQ"
    if method == "qat":
        return f"QAT @{bits}"
    return f"Reg @{bits}, {NORMALIZATION_TITLES[normalization]}, lambda {osc_lambda:g}"


def summarize(records: list[dict]) -> dict[tuple, dict]:
    """`{key: {"seeds": [...], "seconds": [...], "plain": {column: [acc %]}, "bn": {...}}}`; models without
    BatchNorm get `bn` = their plain numbers (re-estimation changes nothing there)."""
    groups: dict[tuple, dict] = {}
    for record in sorted(records, key=lambda r: r["cell"]["seed"]):
        group = groups.setdefault(
            key_of(record["cell"]), {"seeds": [], "seconds": [], "plain": defaultdict(list), "bn": defaultdict(list)}
        )
        group["seeds"].append(record["cell"]["seed"])
        group["seconds"].append(sum(record["seconds"].values()))
        for mode in MODES:
            table = record[mode] if record.get(mode) is not None else record["plain"]
            for column in COLUMNS:
                if column in table:
                    group[mode][column].append(100 * table[column]["accuracy"])
    return groups


def main_keys(groups: dict, model: str, lambdas: dict[str, float]) -> list[tuple]:
    """FP, QAT @3 and the regularizer @3 at each normalization's chosen lambda, in that order, where measured."""
    keys = [(model, "none", None, None, None), (model, "qat", 3, None, None)]
    keys += [(model, "oscillation", 3, osc_lambda, norm) for norm, osc_lambda in lambdas.items()]
    return [key for key in keys if key in groups]


def cross_bit_markdown(groups: dict, keys: list[tuple], mode: str) -> str:
    lines = ["| run | n | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for key in keys:
        cells = []
        for column in COLUMNS:
            text = format_cell(groups[key][mode].get(column, []))
            cells.append(f"**{text}**" if key[2] is not None and column == f"w{key[2]}" else text)
        lines.append(f"| {label_of(key)} | {len(groups[key]['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_rows(groups: dict, model: str, mode: str, regularizer: tuple, target: int = 3) -> list[dict]:
    """The goal for one regularizer run, on seed means: within 1 point of QAT at the target bit; at the bit below,
    >= 20 points above FP + PTQ and at least halfway from QAT's accuracy there to the FP model's full precision."""

    def accuracy(key: tuple, column: str) -> float | None:
        values = groups[key][mode].get(column) if key in groups else None
        return mean(values) if values else None

    fp_key, qat_key = (model, "none", None, None, None), (model, "qat", target, None, None)
    below = f"w{target - 1}"
    reg_target, reg_below = accuracy(regularizer, f"w{target}"), accuracy(regularizer, below)
    qat_target, qat_below = accuracy(qat_key, f"w{target}"), accuracy(qat_key, below)
    ptq_below, full = accuracy(fp_key, below), accuracy(fp_key, "fp")
    halfway = None if None in (qat_below, full) else qat_below + HALFWAY * (full - qat_below)
    # (bar, the regularizer's value, what it is compared with, how far above that it must be)
    bars = [
        (
            f"w{target}: within {WITHIN_QAT_POINTS:g} point of QAT @{target}",
            reg_target,
            qat_target,
            -WITHIN_QAT_POINTS,
        ),
        (f"{below}: >= {ABOVE_PTQ_POINTS:g} points above FP + PTQ", reg_below, ptq_below, ABOVE_PTQ_POINTS),
        (f"{below}: >= halfway from QAT @{target} to full precision", reg_below, halfway, 0.0),
    ]
    rows = []
    for name, value, other, margin in bars:
        if None in (value, other):  # a cell of the comparison is not measured yet: neither holds nor fails
            rows.append({"target": name, "values": "not measured yet", "holds": None})
        else:
            rows.append({"target": name, "values": f"{value:.1f} vs {other:.1f}", "holds": value >= other + margin})
    return rows


def sweep_markdown(groups: dict, model: str, modes: tuple[str, ...], columns=("fp", "w2", "w3", "w4")) -> str:
    """The 3-bit regularizer over lambda, per normalization, with FP and QAT @3 for reference."""
    titles = [
        f"{column} {'BN' if mode == 'bn' else 'plain'}" if len(modes) > 1 else column
        for column in columns
        for mode in modes
    ]
    lines = ["| run | n | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    keys = [(model, "none", None, None, None), (model, "qat", 3, None, None)]
    keys += sorted(
        (k for k in groups if k[0] == model and k[1] == "oscillation" and k[2] == 3), key=lambda k: (k[4], k[3])
    )
    for key in keys:
        if key not in groups:
            continue
        cells = [format_cell(groups[key][mode].get(column, [])) for column in columns for mode in modes]
        lines.append(f"| {label_of(key)} | {len(groups[key]['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runtime_markdown(groups: dict) -> str:
    """Time per cell (training, plain evaluation and, with BatchNorm, the re-estimated one) per model and method."""
    lines = ["| model | run | cells | mean min / cell | total h |", "|---|---|---|---|---|"]
    per_row: dict[tuple, list[float]] = defaultdict(list)
    for key, group in groups.items():
        run = {"none": "FP", "qat": "QAT"}.get(key[1], f"Reg ({NORMALIZATION_TITLES.get(key[4])})")
        per_row[key[0], run] += group["seconds"]
    for (model, run), seconds in sorted(per_row.items()):
        lines.append(f"| {model} | {run} | {len(seconds)} | {mean(seconds) / 60:.0f} | {sum(seconds) / 3600:.1f} |")
    total = sum(sum(seconds) for seconds in per_row.values())
    return "\n".join(lines) + f"\n\nAll cells together: {total / 3600:.1f} h of one worker (one torch thread)."


def plot(groups: dict, keys: list[tuple], title: str, path: Path, modes: tuple[str, ...]) -> None:
    """Accuracy vs bit-width of the main runs, one panel per evaluation mode; error bars = seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "none": dict(color="black", marker="o"),
        "qat": dict(color="tab:blue", linestyle="--", marker="s"),
        "layer_mean": dict(color="tab:orange", marker="^"),
        "global_mean": dict(color="tab:red", marker="v"),
    }
    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), sharey=True, squeeze=False)
    for axis, mode in zip(axes[0], modes):
        for key in keys:
            series = groups[key][mode]
            bits = [b for b in BITS if series.get(f"w{b}")]
            style = styles[key[4] or key[1]]
            axis.errorbar(
                bits,
                [mean(series[f"w{b}"]) for b in bits],
                yerr=[spread(series[f"w{b}"]) for b in bits],
                label=label_of(key),
                capsize=2,
                **style,
            )
            if series.get("fp"):
                axis.axhline(mean(series["fp"]), color=style["color"], alpha=0.25, linewidth=1)
        axis.set_title(f"{title}\n{MODES[mode]}", fontsize=9)
        axis.set_xlabel("PTQ bit-width")
        axis.grid(alpha=0.3)
    save_panels(figure, axes[0], path, "accuracy (%)")


def _modes(records: list[dict]) -> tuple[str, ...]:
    # Re-estimation first: it is the package's default for BatchNorm models.
    return ("bn", "plain") if any(record["has_batchnorm"] for record in records) else ("plain",)


def goal_table(groups: dict, model: str, regularizers: list[tuple], modes: tuple[str, ...]) -> str:
    """One row per regularizer run and evaluation: the three parts of the goal, and whether all hold."""
    lines, header = [], None
    for key in regularizers:
        for mode in modes:
            rows = goal_rows(groups, model, mode, key)
            if header is None:
                header = ["regularizer", "evaluation"] + [row["target"].split(" (")[0] for row in rows] + ["all hold"]
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            cells = [
                f"{row['values']} {'' if row['holds'] is None else 'yes' if row['holds'] else '**no**'}".strip()
                for row in rows
            ]
            holds = [row["holds"] for row in rows]
            verdict = "no" if False in holds else "not yet known" if None in holds else "**yes**"
            lines.append("| " + " | ".join([label_of(key), MODES[mode], *cells, verdict]) + " |")
    return "\n".join(lines)


def regularizer_keys(groups: dict, model: str, target: int = 3) -> list[tuple]:
    """Every regularizer run of `model` at `target` bits, by normalization (the paper's first), then lambda."""
    keys = [k for k in groups if k[0] == model and k[1] == "oscillation" and k[2] == target]
    return sorted(keys, key=lambda k: (k[4] != "layer_mean", k[3]))


def model_section(
    records: list[dict], groups: dict, model: str, keys: list[tuple], plot_keys: list[tuple], figure: Path, doc: Path
) -> list[str]:
    """One model's settings, plot, cross-bit tables (re-estimated first, then plain) and goal checks of `keys`."""
    own = [r for r in records if r["cell"]["model"] == model]
    modes = _modes(own)
    out = [f"#### {MODEL_TITLES[model]}", "", f"Settings: `{json.dumps(own[0]['settings'])}`", ""]
    plot(groups, plot_keys, MODEL_TITLES[model], figure, modes)
    out.append(f"![{model}: accuracy vs bit-width]({os.path.relpath(figure, doc)})")
    for mode in modes:
        out += [f"\n**{MODES[mode]}** (bold: the run's target bit)\n", cross_bit_markdown(groups, keys, mode)]
    if len(modes) == 1:
        out.append(f"\n{model} has no BatchNorm: re-estimation changes nothing, the table is both.")
    regularizers = [key for key in keys if key[1] == "oscillation"]
    if regularizers:
        out += [
            "\n**The goal** (seed means; each cell: the regularizer vs the bar it must reach)\n",
            goal_table(groups, model, regularizers, modes),
        ]
    return out + [""]


def render(
    full: list[dict], pilot: list[dict], lambdas: dict[str, float], figures_dir: Path, document_dir: Path
) -> str:
    """The generated block: the pilot (every run at every bit-width, both evaluations, the goal checked for every
    regularizer run), then the full-data cells measured so far, then the run time of every cell."""
    out = []
    if pilot:
        groups = summarize(pilot)
        out += [
            "### Pilot: 12,000 training images, 3 epochs, scored on 2,000 held-out training images",
            "",
            "Accuracy on the held-out images, never the test split.",
            "",
        ]
        for model in [m for m in MODEL_TITLES if any(r["cell"]["model"] == m for r in pilot)]:
            keys = main_keys(groups, model, {}) + regularizer_keys(groups, model)
            figure = figures_dir / f"quality_pilot_{model}.png"
            out += model_section(pilot, groups, model, keys, main_keys(groups, model, lambdas), figure, document_dir)
    if full:
        groups = summarize(full)
        out += ["### Full data: 60,000 training images, 3 epochs, the 10,000 test images (cells measured so far)", ""]
        for model in [m for m in MODEL_TITLES if any(r["cell"]["model"] == m for r in full)]:
            keys = main_keys(groups, model, {}) + regularizer_keys(groups, model)
            figure = figures_dir / f"quality_full_{model}.png"
            out += model_section(full, groups, model, keys, main_keys(groups, model, lambdas), figure, document_dir)
            if len(regularizer_keys(groups, model)) > 1:
                own = [r for r in full if r["cell"]["model"] == model]
                out += ["**Lambda sweep at 3 bits**, test accuracy\n", sweep_markdown(groups, model, _modes(own)), ""]
    out += ["### Run time per cell (2-core machine shared with other jobs, one torch thread per cell)", ""]
    for title, records in (("Pilot", pilot), ("Full data", full)):
        if records:
            out += [f"**{title}**\n", runtime_markdown(summarize(records)), ""]
    return "\n".join(out)


def write_block(text: str, document: Path, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the generated block between `begin` and `end` (this script's markers by default) of `document`,
    keeping everything around it."""
    old = document.read_text()
    if begin not in old or end not in old:
        from hf_oscq.errors import OscqValueError  # one line at the script's boundary

        raise OscqValueError(f"{document} lacks the markers {begin!r} ... {end!r}: add them where the tables go.")
    head, rest = old.split(begin, 1)
    document.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    from quality import FULL_LAMBDA, results_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", type=Path, default=results_folder("full"), help="Folder of the full grid's JSONs.")
    parser.add_argument("--pilot", type=Path, default=results_folder("pilot"), help="Folder of the pilot's JSONs.")
    parser.add_argument("--document", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs", help="Where the PNG plots go.")
    args = parser.parse_args(argv)
    full, pilot = load_records(args.full, "--full"), load_records(args.pilot, "--pilot") if args.pilot.exists() else []
    write_block(render(full, pilot, FULL_LAMBDA, args.figures, args.document.parent), args.document)
    sys.stdout.write(f"{len(full)} full cells, {len(pilot)} pilot cells -> {args.document}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("aggregate_full.py", main))
