"""Renders the comparison of the methods that make the same promise (`bench/results/peers/*.json`, written by
`bench/quality.py --profile peers`, and `bench/results/method_cost.json`, written by `bench/method_cost.py`) into
their generated block of docs/RESULTS.md, plus one accuracy-vs-bit-width plot per model under docs/.

    python bench/aggregate_peers.py       # rewrites the block between the aggregate_peers markers of docs/RESULTS.md

Numbers are top-1 accuracies in %, mean +- sample standard deviation over seeds (n = number of seeds), on the
images the records say (`evaluated_on`). Step-cost ratios are medians of interleaved steps (bench/method_cost.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

from aggregate import BITS, COLUMNS, MODES, ROOT, format_cell, load_records, mean, save_panels, spread
from aggregate_full import MODEL_TITLES, write_block

BEGIN, END = "<!-- BEGIN GENERATED: bench/aggregate_peers.py -->", "<!-- END GENERATED: bench/aggregate_peers.py -->"
LM_BEGIN = "<!-- BEGIN GENERATED: bench/aggregate_peers.py/language-model -->"
LM_END = "<!-- END GENERATED: bench/aggregate_peers.py/language-model -->"
# Rows in this order; KURE once per lambda.
METHOD_ORDER = ("none", "qat", "oscillation", "kure", "dampening", "multibit_qat")
STYLES = {
    "none": dict(color="black", marker="o"),
    "qat": dict(color="tab:blue", linestyle="--", marker="s"),
    "oscillation": dict(color="tab:orange", marker="^", linewidth=2),
    "kure": dict(color="tab:green", marker="D"),
    "dampening": dict(color="tab:purple", linestyle=":", marker="v"),
    "multibit_qat": dict(color="tab:red", linestyle="-.", marker="P"),
}
WITHIN_MULTIBIT_POINTS = 1.0  # the regularizer within this many points of multi-bit QAT at bits neither trained
COST_FRACTION = 0.5  # ... at less than this fraction of its training-step cost
MEASURABLE_POINTS = 1.0  # "measurably worse": at least this many points and ...
MEASURABLE_STANDARD_ERRORS = 2.0  # ... this many standard errors of the difference of the seed means


def key_of(cell: dict) -> tuple:
    """What seeds are averaged over: (model, method, lambda)."""
    osc_lambda = cell["osc_lambda"] if cell["method"] in ("oscillation", "kure", "dampening") else None
    return cell["model"], cell["method"], osc_lambda


def trained_bits(record: dict) -> tuple[int, ...]:
    """The bit-widths a run trained for: QAT's, dampening's and the regularizer's target, multi-bit QAT's set."""
    settings = record.get("method_settings") or {}
    method = record["cell"]["method"]
    if method == "multibit_qat":
        return tuple(settings.get("osc_multibit_bits") or ())
    return (record["cell"]["bits"],) if method in ("qat", "oscillation", "dampening") else ()


def label_of(key: tuple, record: dict) -> str:
    _, method, osc_lambda = key
    bits = trained_bits(record)
    target = f" @{bits[0]}" if bits else ""
    if method == "none":
        return "FP + PTQ"
    if method == "qat":
        return f"QAT{target}"
    if method == "multibit_qat":
        return f"multi-bit QAT {{{','.join(map(str, bits))}}}"
    name = {"oscillation": "regularizer", "kure": "KURE", "dampening": "dampening"}.get(method, method)
    return f"{name}{target}, lambda {osc_lambda:g}" if osc_lambda is not None else f"{name}{target}"


def summarize(records: list[dict]) -> dict[tuple, dict]:
    """`{key: {"seeds", "train_minutes", "record", "plain": {column: [acc %]}, "bn": {...}}}`; models without
    BatchNorm get `bn` = their plain numbers (re-estimation changes nothing there)."""
    groups: dict[tuple, dict] = {}
    for record in sorted(records, key=lambda r: r["cell"]["seed"]):
        group = groups.setdefault(
            key_of(record["cell"]),
            {"seeds": [], "train_minutes": [], "record": record, "plain": defaultdict(list), "bn": defaultdict(list)},
        )
        group["seeds"].append(record["cell"]["seed"])
        if record.get("train_seconds"):
            group["train_minutes"].append(record["train_seconds"] / 60)
        for mode in MODES:
            table = record[mode] if record.get(mode) is not None else record["plain"]
            for column in COLUMNS:
                if column in table:
                    group[mode][column].append(100 * table[column]["accuracy"])
    return groups


def ordered(groups: dict, model: str) -> list[tuple]:
    keys = [key for key in groups if key[0] == model]
    return sorted(keys, key=lambda k: (METHOD_ORDER.index(k[1]) if k[1] in METHOD_ORDER else 99, k[2] or 0))


def table_markdown(groups: dict, keys: list[tuple], mode: str) -> str:
    """Rows: the runs; columns fp, w2..w8; bold: the bit-widths a run trained for."""
    lines = ["| method | n | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for key in keys:
        group = groups[key]
        trained = {f"w{b}" for b in trained_bits(group["record"])}
        cells = [
            f"**{format_cell(group[mode].get(c, []))}**" if c in trained else format_cell(group[mode].get(c, []))
            for c in COLUMNS
        ]
        lines.append(f"| {label_of(key, group['record'])} | {len(group['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winners_markdown(groups: dict, keys: list[tuple], mode: str) -> str:
    """The best run (highest seed mean) at each bit-width, with its margin over the runner-up."""
    lines = ["| bit-width | best | runner-up | margin (points) |", "|---|---|---|---|"]
    for column in COLUMNS[1:]:
        ranked = sorted(
            ((mean(groups[k][mode][column]), k) for k in keys if groups[k][mode].get(column)), reverse=True
        )
        if len(ranked) < 2:
            continue
        (best, first), (second, runner) = ranked[0], ranked[1]
        names = [label_of(k, groups[k]["record"]) for k in (first, runner)]
        lines.append(f"| {column} | {names[0]} ({best:.1f}) | {names[1]} ({second:.1f}) | {best - second:.1f} |")
    return "\n".join(lines)


def cost_markdown(groups: dict, keys: list[tuple], costs: dict | None, model: str) -> str:
    """Per run: the training-step cost ratio to plain training (interleaved steps) and minutes per cell."""
    ratios = ((costs or {}).get("results", {}).get(model) or {}).get("ratio_to_plain", {})
    lines = ["| method | step cost vs plain training | minutes per cell (training) |", "|---|---|---|"]
    for key in keys:
        group = groups[key]
        ratio = ratios.get(key[1])
        minutes = group["train_minutes"]
        lines.append(
            f"| {label_of(key, group['record'])} | {f'{ratio:.2f}x' if ratio else 'not measured'} | "
            f"{f'{mean(minutes):.0f}' if minutes else '-'} |"
        )
    return "\n".join(lines)


def _value(groups: dict, key: tuple | None, mode: str, column: str) -> list[float]:
    return list(groups[key][mode].get(column, [])) if key in groups else []


def goal_rows(groups: dict, model: str, mode: str, costs: dict | None, regularizer_lambda: float) -> list[dict]:
    """The issue's goal, on the seed means: `{"goal", "values", "holds"}` rows (`holds` None: not measured yet)."""
    regularizer = (model, "oscillation", regularizer_lambda)
    kures = [key for key in groups if key[0] == model and key[1] == "kure"]
    multibit = next((key for key in groups if key[0] == model and key[1] == "multibit_qat"), None)
    dampening = next((key for key in groups if key[0] == model and key[1] == "dampening"), None)
    rows = []
    # 1. at least as good as KURE (its best lambda at each bit-width) at every bit-width
    if regularizer in groups and kures:
        gaps = {}
        for column in COLUMNS[1:]:
            ours = _value(groups, regularizer, mode, column)
            best = max(mean(_value(groups, k, mode, column)) for k in kures if _value(groups, k, mode, column))
            if ours:
                gaps[column] = mean(ours) - best
        worst = min(gaps, key=gaps.get)
        rows.append(
            {
                "goal": "the regularizer at least as good as KURE (its better lambda) at every bit-width",
                "values": f"smallest margin {gaps[worst]:+.1f} points at {worst}",
                "holds": gaps[worst] >= 0,
            }
        )
    # 2. within 1 point of multi-bit QAT where neither trained, at less than half its step cost
    if regularizer in groups and multibit is not None:
        neither = [
            f"w{b}"
            for b in BITS
            if b not in trained_bits(groups[regularizer]["record"])
            and b not in trained_bits(groups[multibit]["record"])
        ]
        gaps = {
            column: mean(_value(groups, regularizer, mode, column)) - mean(_value(groups, multibit, mode, column))
            for column in neither
            if _value(groups, regularizer, mode, column) and _value(groups, multibit, mode, column)
        }
        ratios = ((costs or {}).get("results", {}).get(model) or {}).get("ratio_to_plain", {})
        cost = (
            ratios["oscillation"] / ratios["multibit_qat"] if {"oscillation", "multibit_qat"} <= set(ratios) else None
        )
        worst = min(gaps, key=gaps.get) if gaps else None
        rows.append(
            {
                "goal": f"within {WITHIN_MULTIBIT_POINTS:g} point of multi-bit QAT at the bit-widths neither trained "
                f"({', '.join(neither)}), at less than {COST_FRACTION:g} of its step cost",
                "values": (f"smallest margin {gaps[worst]:+.1f} points at {worst}" if worst else "not measured")
                + (f"; step cost {cost:.2f} of multi-bit QAT's" if cost is not None else "; cost not measured"),
                "holds": None
                if worst is None or cost is None
                else gaps[worst] >= -WITHIN_MULTIBIT_POINTS and cost < COST_FRACTION,
            }
        )
    # 3. dampening measurably worse than the regularizer below its target bit
    if regularizer in groups and dampening is not None:
        target = min(trained_bits(groups[regularizer]["record"]))
        column = f"w{target - 1}"
        ours, theirs = _value(groups, regularizer, mode, column), _value(groups, dampening, mode, column)
        if ours and theirs:
            difference = mean(ours) - mean(theirs)
            error = math.sqrt(spread(ours) ** 2 / len(ours) + spread(theirs) ** 2 / len(theirs))
            rows.append(
                {
                    "goal": f"dampening measurably worse than the regularizer at {column}, below the target bit "
                    f"(by >= {MEASURABLE_POINTS:g} point and >= {MEASURABLE_STANDARD_ERRORS:g} standard errors)",
                    "values": f"{mean(ours):.1f} vs {mean(theirs):.1f} ({difference:+.1f} points, standard error "
                    f"{error:.1f}, n = {len(ours)}/{len(theirs)})",
                    "holds": difference >= MEASURABLE_POINTS and difference >= MEASURABLE_STANDARD_ERRORS * error,
                }
            )
    return rows


def goal_markdown(rows: list[dict]) -> str:
    lines = ["| goal | measured | met |", "|---|---|---|"]
    for row in rows:
        verdict = "not yet known" if row["holds"] is None else "**met**" if row["holds"] else "not met"
        lines.append(f"| {row['goal']} | {row['values']} | {verdict} |")
    return "\n".join(lines)


def plot(groups: dict, keys: list[tuple], title: str, path: Path, modes: tuple[str, ...]) -> None:
    """Accuracy vs bit-width of every run, one panel per evaluation mode; error bars = seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), sharey=True, squeeze=False)
    for axis, mode in zip(axes[0], modes):
        for key in keys:
            series = groups[key][mode]
            bits = [b for b in BITS if series.get(f"w{b}")]
            style = dict(STYLES.get(key[1], {}))
            if key[1] == "kure" and key[2] is not None and key[2] < 1:
                style["alpha"] = 0.55
            axis.errorbar(
                bits,
                [mean(series[f"w{b}"]) for b in bits],
                yerr=[spread(series[f"w{b}"]) for b in bits],
                label=label_of(key, groups[key]["record"]),
                capsize=2,
                **style,
            )
        axis.set_title(f"{title}\n{MODES[mode]}", fontsize=9)
        axis.set_xlabel("PTQ bit-width")
        axis.grid(alpha=0.3)
    save_panels(figure, axes[0], path, "top-1 accuracy (%)")


def evaluated_on(records: list[dict]) -> str:
    """What the tables were measured on, from the records (one sentence; records that disagree are named)."""
    seen = {json.dumps(record.get("evaluated_on"), sort_keys=True) for record in records}
    if len(seen) != 1 or not records[0].get("evaluated_on"):
        return "The records disagree on what they were measured on (or do not say): see their `evaluated_on`."
    where = records[0]["evaluated_on"]
    versions = records[0].get("versions") or {}
    return (
        f"Measured on `{where['dataset']}`, {where['split']} split, {where['examples']:,} images, "
        f"{where['metric']}; library versions {', '.join(f'{k} {v}' for k, v in versions.items() if v)}."
    )


def render(records: list[dict], costs: dict | None, figures_dir: Path, document_dir: Path) -> str:
    from quality import MAIN_LAMBDA

    if not records:
        return "No peers cell has finished yet (`python bench/quality.py --profile peers`)."
    groups = summarize(records)
    settings = records[0]["settings"]
    out = [
        f"Data: {settings['max_train_samples'] - settings.get('validation_samples', 0):,} training images, "
        f"{settings['num_train_epochs']} epochs; {evaluated_on(records)}",
        "",
    ]
    for model in [m for m in MODEL_TITLES if any(r["cell"]["model"] == m for r in records)]:
        own = [r for r in records if r["cell"]["model"] == model]
        modes = ("bn", "plain") if any(r["has_batchnorm"] for r in own) else ("plain",)
        keys = ordered(groups, model)
        figure = figures_dir / f"peers_{model}.png"
        plot(groups, keys, MODEL_TITLES[model], figure, modes)
        out += [
            f"#### {MODEL_TITLES[model]}",
            "",
            f"![{model}: every method]({os.path.relpath(figure, document_dir)})",
        ]
        for mode in modes:
            out += [
                f"\n**{MODES[mode]}**, top-1 accuracy (%) (bold: the bit-widths a run trained for)\n",
                table_markdown(groups, keys, mode),
                f"\nBest at each bit-width ({MODES[mode]}):\n",
                winners_markdown(groups, keys, mode),
                f"\n**The goal** ({MODES[mode]}, seed means)\n",
                goal_markdown(goal_rows(groups, model, mode, costs, MAIN_LAMBDA)),
            ]
        if len(modes) == 1:
            out.append(f"\n{model} has no BatchNorm: re-estimation changes nothing, the table is both.")
        out += ["\n**Cost**\n", cost_markdown(groups, keys, costs, model), ""]
    if costs:
        setup = costs["setup"]
        out.append(
            f"Step cost: median of {setup['rounds']} interleaved steps per method, batch "
            f"{next(iter(costs['results'].values()))['batch_size']}, {setup['threads']} thread(s), load average "
            f"{setup['load_average'][0]:.1f} (`bench/results/method_cost.json`). Minutes per cell: training only, "
            "cells run two at a time on 2 shared cores."
        )
    return "\n".join(out)


def lm_label(cell: dict) -> str:
    method, bits, osc_lambda = cell["method"], cell["bits"], cell["osc_lambda"]
    return {
        "none": "FP + PTQ",
        "qat": f"QAT @{bits}",
        "oscillation": f"regularizer @{bits}, lambda {osc_lambda:g}" if osc_lambda is not None else "",
        "kure": f"KURE, lambda {osc_lambda:g}" if osc_lambda is not None else "",
    }.get(method) or method


def render_lm(records: list[dict], scale: dict | None) -> str:
    """The language-model comparison: perplexity per byte at every bit-width (seed means +- spread), the cost of
    rounding relative to each run's full precision, and the best run at each bit-width."""
    out = []
    if scale:
        row = next((r for r in scale["rows"] if r["size"] == "micro"), None)
        if row:
            costs = row["cost_vs_fp"]
            out.append(
                f"Why this setting: plainly trained, the recipe's model ({row['steps']} steps) loses "
                f"{100 * costs['w3_group32']:.1f} % perplexity rounded at 3 bits with group-wise scales of 32 "
                f"({100 * costs['w4_group32']:.1f} % at 4 bits, {100 * costs['w3_per_channel']:.1f} % per channel, "
                f"{100 * costs['w3_per_tensor']:.1f} % per tensor at 3 bits; `bench/results/lm_scale.json`, "
                f"{row['seconds_per_step']:.2f} s per training step on one shared core).\n"
            )
    if not records:
        return "\n".join(out + ["No cell of `python bench/lm_peers.py` has finished yet."])
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        cell = record["cell"]
        groups[cell["method"], cell["bits"] if cell["method"] != "none" else None, cell["osc_lambda"]].append(record)
    order = sorted(groups, key=lambda k: (METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else 99, k[2] or 0))
    where = records[0]["evaluated_on"]
    out.append(
        f"Measured on {where['dataset']}, {where['split']}, {where['tokens']:,} predicted tokens, {where['metric']}; "
        f"the recipe's setting (`{records[0]['recipe']['config']}`: {records[0]['recipe']['lm_size']} model, "
        f"{records[0]['hyperparameters']['max_steps']} steps), group-wise scales of "
        f"{records[0]['spec'].get('group_size')}; mean +- sample standard deviation over seeds (n).\n"
    )
    lines = ["| run | n | " + " | ".join(COLUMNS) + " | minutes per run |", "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    cost_lines = ["| run | " + " | ".join(f"{c} / fp" for c in COLUMNS[1:]) + " |", "|---|" + "---|" * len(BITS)]
    for key in order:
        runs = groups[key]
        trained = {f"w{key[1]}"} if key[0] in ("qat", "oscillation") else set()
        cells = []
        for column in COLUMNS:
            values = [run["table"][column]["perplexity"] for run in runs]
            text = f"{mean(values):.2f}" + (f" ± {spread(values):.2f}" if len(values) > 1 else "")
            cells.append(f"**{text}**" if column in trained else text)
        minutes = mean([run["train_seconds"] / 60 for run in runs])
        lines.append(f"| {lm_label(runs[0]['cell'])} | {len(runs)} | " + " | ".join(cells) + f" | {minutes:.0f} |")
        ratios = [
            mean([run["table"][c]["perplexity"] / run["table"]["fp"]["perplexity"] for run in runs])
            for c in COLUMNS[1:]
        ]
        cost_lines.append(f"| {lm_label(runs[0]['cell'])} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    best = ["| bit-width | lowest perplexity | runner-up |", "|---|---|---|"]
    for column in COLUMNS[1:]:
        ranked = sorted((mean([r["table"][column]["perplexity"] for r in groups[k]]), k) for k in order)
        if len(ranked) > 1:
            (first, a), (second, b) = ranked[0], ranked[1]
            best.append(
                f"| {column} | {lm_label(groups[a][0]['cell'])} ({first:.2f}) | "
                f"{lm_label(groups[b][0]['cell'])} ({second:.2f}) |"
            )
    out += [
        "**Perplexity per byte** (lower is better; bold: the run's target bit-width)\n",
        "\n".join(lines),
        "\n**What rounding costs each run** (perplexity rounded / its own full precision, seed means)\n",
        "\n".join(cost_lines),
        "\n**Best at each bit-width**\n",
        "\n".join(best),
    ]
    return "\n".join(out)


def _record(path: Path, flag: str, command: str) -> dict:
    from hf_oscq.errors import OscqValueError

    if not path.is_file():
        raise OscqValueError(f"{flag} {str(path)!r} is not a file: pass the JSON record `{command}` wrote.")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    from quality import results_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=results_folder("peers"), help="Folder of the peers' JSONs.")
    parser.add_argument("--costs", type=Path, default=ROOT / "bench" / "results" / "method_cost.json")
    parser.add_argument("--lm", type=Path, default=ROOT / "bench" / "results" / "lm_peers", help="lm_peers.py's")
    parser.add_argument("--lm_scale", type=Path, default=ROOT / "bench" / "results" / "lm_scale.json")
    parser.add_argument("--document", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs", help="Where the PNG plots go.")
    args = parser.parse_args(argv)
    # Every input is read before anything is written: a wrong path never replaces the tables with empty ones.
    records = load_records(args.peers, "--peers", "python bench/quality.py --profile peers")
    costs = _record(args.costs, "--costs", "python bench/method_cost.py")
    lm_records = load_records(args.lm, "--lm", "python bench/lm_peers.py")
    scale = _record(args.lm_scale, "--lm_scale", "python bench/lm_scale.py")
    block = render(records, costs, args.figures, args.document.parent)
    write_block(block, args.document, BEGIN, END)
    write_block(render_lm(lm_records, scale), args.document, LM_BEGIN, LM_END)
    sys.stdout.write(f"{len(records)} peers cells, {len(lm_records)} language-model cells -> {args.document}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("aggregate_peers.py", main))
