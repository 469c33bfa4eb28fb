"""Renders the quality grid (`bench/results/quality/*.json`, written by bench/quality.py) and the cost benches
(`bench/results/overhead*.json`, `bench/results/export_size.json`) into the generated part of docs/RESULTS.md, plus
accuracy-vs-bit-width plots under docs/.

    python bench/aggregate.py            # rewrites the block between the GENERATED markers of docs/RESULTS.md

Numbers are accuracies in % on the test subset, mean +- sample standard deviation over seeds (n = number of seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BITS = (2, 3, 4, 5, 6, 7, 8)
COLUMNS = ("fp", *(f"w{b}" for b in BITS))
MODES = {"plain": "plain rounding (the paper's PTQ)", "bn": "rounding + BatchNorm re-estimation"}
BEGIN, END = "<!-- BEGIN GENERATED: bench/aggregate.py -->", "<!-- END GENERATED -->"
FAR_ABOVE_POINTS = 5.0  # "far above FP + PTQ" means at least this many points above it
WITHIN_POINTS = 1.0  # "within 1 point of QAT"


def load_records(folder: Path, flag: str = "--results", command: str = "python bench/quality.py") -> list[dict]:
    """Every finished cell's JSON in `folder` (unfinished `.json.tmp` files are ignored).

    Raises:
        OscqValueError: naming `flag` and the `command` that writes the records, where `folder` holds none: the
            tables are never rendered empty over the measured ones.
    """
    from hf_oscq.errors import OscqValueError

    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not paths:
        raise OscqValueError(f"{flag} {str(folder)!r} holds no records (*.json): pass the folder `{command}` wrote.")
    return [json.loads(path.read_text()) for path in paths]


def run_key(cell: dict) -> tuple:
    """What seeds are averaged over: (model, method, bits, lambda); investigation variants are separate models."""
    model = f"{cell['model']} ({cell['variant']})" if cell.get("variant") else cell["model"]
    return model, cell["method"], cell["bits"], cell["osc_lambda"]


def run_label(key: tuple) -> str:
    _, method, bits, osc_lambda = key
    if method == "none":
        return "FP + PTQ"
    if method == "qat":
        return f"QAT @{bits}"
    return f"Reg @{bits}, lambda {osc_lambda:g}"


def summarize(records: list[dict]) -> dict[tuple, dict]:
    """Groups cells over seeds: `{key: {"seeds": [...], "plain": {col: [acc %, ...]}, "bn": {...} or None}}`.

    Models without BatchNorm get `bn` = their plain numbers (re-estimation changes nothing there).
    """
    groups: dict[tuple, dict] = {}
    for record in sorted(records, key=lambda r: r["cell"]["seed"]):
        key = run_key(record["cell"])
        group = groups.setdefault(
            key, {"seeds": [], "plain": defaultdict(list), "bn": defaultdict(list), "seconds": []}
        )
        group["seeds"].append(record["cell"]["seed"])
        group["seconds"].append(sum(record["seconds"].values()))
        for mode in MODES:
            table = record[mode] if record.get(mode) is not None else record["plain"]
            for column in COLUMNS:
                if column in table:
                    group[mode][column].append(100 * table[column]["accuracy"])
    return groups


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def format_cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{mean(values):.1f} ± {spread(values):.1f}"


def _ordered(keys) -> list[tuple]:
    order = {"none": 0, "qat": 1, "oscillation": 2}
    return sorted(keys, key=lambda k: (k[0], k[2] or 0, order[k[1]], k[3] or 0))


def cross_bit_markdown(groups: dict, model: str, mode: str, main_lambda: float) -> str:
    """One table: rows FP + PTQ, then per target bit QAT and the regularizer (main lambda); columns fp, w2..w8."""
    keys = [k for k in _ordered(groups) if k[0] == model and (k[1] != "oscillation" or k[3] == main_lambda)]
    lines = ["| run | n | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for key in keys:
        group = groups[key]
        cells = []
        for column in COLUMNS:
            text = format_cell(group[mode].get(column, []))
            if key[2] is not None and column == f"w{key[2]}":
                text = f"**{text}**"  # the target bit
            cells.append(text)
        lines.append(f"| {run_label(key)} | {len(group['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(groups: dict, model: str, mode: str, main_lambda: float) -> list[dict]:
    """The issue's targets, on the seed means; each row says the numbers and whether the target holds."""
    fp = groups.get((model, "none", None, None))
    rows = []

    def accuracy(key: tuple, column: str) -> float | None:
        group = groups.get(key)
        values = group[mode].get(column) if group else None
        return mean(values) if values else None

    for bits in (3, 4):
        regularizer = accuracy((model, "oscillation", bits, main_lambda), f"w{bits}")
        qat = accuracy((model, "qat", bits, None), f"w{bits}")
        ptq = mean(fp[mode][f"w{bits}"]) if fp and fp[mode].get(f"w{bits}") else None
        if regularizer is not None and qat is not None:
            rows.append(
                {
                    "target": f"Reg @{bits} within {WITHIN_POINTS:g} point of QAT @{bits} at w{bits}",
                    "values": f"{regularizer:.1f} vs {qat:.1f}",
                    "holds": regularizer >= qat - WITHIN_POINTS,
                }
            )
        if regularizer is not None and ptq is not None:
            rows.append(
                {
                    "target": f"Reg @{bits} far above FP + PTQ at w{bits} (>= {FAR_ABOVE_POINTS:g} points)",
                    "values": f"{regularizer:.1f} vs {ptq:.1f}",
                    "holds": regularizer >= ptq + FAR_ABOVE_POINTS,
                }
            )
    for bits in (2, 3):
        unseen = [f"w{b}" for b in BITS if b != bits]
        regularizer = [accuracy((model, "oscillation", bits, main_lambda), c) for c in unseen]
        qat = [accuracy((model, "qat", bits, None), c) for c in unseen]
        if None not in regularizer and None not in qat:
            rows.append(
                {
                    "target": f"trained @{bits}: Reg >= QAT on average over unseen w2..w8",
                    "values": f"{mean(regularizer):.1f} vs {mean(qat):.1f}",
                    "holds": mean(regularizer) >= mean(qat),
                }
            )
    regularizer = accuracy((model, "oscillation", 2, main_lambda), "w2")
    qat = accuracy((model, "qat", 2, None), "w2")
    if regularizer is not None and qat is not None:
        rows.append(
            {
                "target": "paper: at 2 bits QAT @2 stays ahead of Reg @2",
                "values": f"{qat:.1f} vs {regularizer:.1f}",
                "holds": qat > regularizer,
            }
        )
    return rows


def targets_markdown(rows: list[dict]) -> str:
    lines = ["| target | measured | holds |", "|---|---|---|"]
    lines += [f"| {row['target']} | {row['values']} | {'yes' if row['holds'] else '**no**'} |" for row in rows]
    return "\n".join(lines)


def lambda_sweep_markdown(groups: dict, model: str, has_bn: bool = True) -> str:
    """3-bit regularizer over lambda (lambda 0 is the FP run), with QAT @3 for reference."""
    rows = [(0.0, groups.get((model, "none", None, None)))]
    rows += sorted((k[3], g) for k, g in groups.items() if k[0] == model and k[1] == "oscillation" and k[2] == 3)
    rows.append(("QAT @3", groups.get((model, "qat", 3, None))))
    modes = ("plain", "bn") if has_bn else ("plain",)
    columns = [(column, mode) for column in ("w2", "w3", "w4") for mode in modes]
    titles = [f"{column} {'BN' if mode == 'bn' else 'plain'}" if has_bn else column for column, mode in columns]
    lines = ["| lambda | n | fp | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(columns)]
    for label, group in rows:
        if group is None:
            continue
        label = label if isinstance(label, str) else f"{label:g}"
        cells = [format_cell(group["plain"].get("fp", []))]
        cells += [format_cell(group[mode].get(column, [])) for column, mode in columns]
        lines.append(f"| {label} | {len(group['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cross_bit(groups: dict, model: str, main_lambda: float, path: Path, modes=tuple(MODES)) -> None:
    """Accuracy vs bit-width per method, one panel per mode (plain, BN); error bars = seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {2: "tab:red", 3: "tab:blue", 4: "tab:green"}
    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for axis, mode in zip(axes, modes):
        for key in _ordered(groups):
            if key[0] != model or (key[1] == "oscillation" and key[3] != main_lambda):
                continue
            series = groups[key][mode]
            bits = [b for b in BITS if series.get(f"w{b}")]
            means = [mean(series[f"w{b}"]) for b in bits]
            errors = [spread(series[f"w{b}"]) for b in bits]
            style = {
                "none": dict(color="black", linestyle="-", marker="o"),
                "qat": dict(color=colors.get(key[2]), linestyle="--", marker="s"),
                "oscillation": dict(color=colors.get(key[2]), linestyle="-", marker="^"),
            }[key[1]]
            axis.errorbar(bits, means, yerr=errors, label=run_label(key), capsize=2, **style)
        axis.set_title(f"{model}: {MODES[mode]}")
        axis.set_xlabel("PTQ bit-width")
        axis.grid(alpha=0.3)
    save_panels(figure, axes, path, "test accuracy (%)")


def save_panels(figure, panels, path: Path, ylabel: str) -> None:
    """Finishes a row of accuracy-vs-bit-width panels (y label on the first, legend on the last) and writes it to
    `path` as a PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    panels[0].set_ylabel(ylabel)
    panels[-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cost_markdown(results_dir: Path) -> str:
    """The core bench's training-step ratios and the export bench's sizes, where their JSON files exist."""
    parts = []
    for path in sorted(results_dir.glob("overhead*.json")):
        record = json.loads(path.read_text())
        lines = [
            f"`{os.path.relpath(path, ROOT)}` ({record.get('workload')}; device {record.get('device')}, "
            f"{record.get('torch_threads')} threads):",
            "",
            "| batch | fp step (ms) | " + " | ".join(record["results"][0]["ratio_to_fp"]) + " |",
            "|---|---|" + "---|" * len(record["results"][0]["ratio_to_fp"]),
        ]
        for result in record["results"]:
            ratios = " | ".join(f"{ratio:.2f}x" for ratio in result["ratio_to_fp"].values())
            lines.append(f"| {result['batch_size']} | {1000 * result['median_step_seconds']['fp']:.1f} | {ratios} |")
        parts.append("\n".join(lines))
    export = results_dir / "export_size.json"
    if export.exists():
        parts.append(export_markdown(json.loads(export.read_text()), os.path.relpath(export, ROOT)))
    if not parts:
        return (
            "Not measured yet: `bench/results/overhead.json` (`python bench/overhead.py`, the core bench) and "
            "`bench/results/export_size.json` (the export bench) do not exist in this tree."
        )
    return "\n\n".join(parts)


def export_markdown(record: dict, source: str) -> str:
    """The export bench's checkpoint sizes (bytes and fraction of fp32) and export time, one row per model."""
    models = record.get("models", {})
    bits = [f"w{b}" for b in record.get("bits", BITS)]
    lines = [
        f"`{source}` (checkpoint size as a fraction of the fp32 one; export time for all bit-widths):",
        "",
        "| model | fp32 MB | " + " | ".join(bits) + " | export s |",
        "|---|---|" + "---|" * (len(bits) + 1),
    ]
    for name, model in models.items():
        variants = model.get("variants", {})
        cells = [f"{variants[b]['vs_fp32']:.3f}" if b in variants else "-" for b in bits]
        seconds = model.get("export_seconds_all_bits")
        seconds_text = f"{seconds:.1f}" if seconds is not None else "-"
        lines.append(f"| {name} | {model['fp32_bytes'] / 1e6:.1f} | " + " | ".join(cells) + f" | {seconds_text} |")
    return "\n".join(lines)


SIZE_BUCKETS = ((0, 10_000, "< 10k"), (10_000, 200_000, "10k-200k"), (200_000, float("inf"), ">= 200k"))


def diagnostics_markdown(stats: dict) -> str:
    """bench/weight_stats.py's output, one row per cell: the fraction of weights within 0.1 bin of a rounding threshold
    per layer-size bucket (0.20 if uniform), the median over layers of max|W| / std, the fraction of weights rounded
    to 0, and the range of the per-weight penalty gradient factor 2 lambda / N."""
    buckets = " | ".join(f"near thr., {label}" for _, _, label in SIZE_BUCKETS)
    lines = [
        f"| cell | {buckets} | max/std (median) | rounded to 0 | 2λ/N |",
        "|---|" + "---|" * (len(SIZE_BUCKETS) + 3),
    ]
    for name, layers in sorted(stats["cells"].items()):
        cells = []
        for low, high, _ in SIZE_BUCKETS:
            chosen = [layer for layer in layers.values() if low <= layer["numel"] < high]
            total = sum(layer["numel"] for layer in chosen)
            near = sum(layer["near_threshold"] * layer["numel"] for layer in chosen) / total if total else None
            cells.append(f"{near:.2f}" if near is not None else "-")
        total = sum(layer["numel"] for layer in layers.values())
        ratios = [layer["max_over_std"] for layer in layers.values()]
        zero = sum(layer["zero_code_fraction"] * layer["numel"] for layer in layers.values()) / total
        factors = [layer["penalty_gradient_factor"] for layer in layers.values()]
        factor_text = f"{min(factors):.0e}..{max(factors):.0e}" if max(factors) else "0"
        cells += [f"{statistics.median(ratios):.2f}", f"{zero:.3f}", factor_text]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runtime_markdown(records: list[dict]) -> str:
    per_model: dict[str, list[float]] = defaultdict(list)
    threads = set()
    for record in records:
        per_model[run_key(record["cell"])[0]].append(sum(record["seconds"].values()))
        threads.add(record.get("torch_threads"))
    lines = ["| model | cells | mean s / cell | total min |", "|---|---|---|---|"]
    for model, seconds in sorted(per_model.items()):
        lines.append(f"| {model} | {len(seconds)} | {mean(seconds):.0f} | {sum(seconds) / 60:.0f} |")
    return "\n".join(lines) + f"\n\ntorch threads per worker: {sorted(t for t in threads if t)}"


def render(
    records: list[dict],
    main_lambda: float,
    results_dir: Path,
    figures_dir: Path,
    document_dir: Path,
    stats: dict | None = None,
) -> str:
    """The generated Markdown block (tables, target checks, sweep, cost, run time) and its plots."""
    if not records:
        return "No quality cell has finished yet (`python bench/quality.py`)."
    groups = summarize(records)
    out = [f"Main lambda {main_lambda:g}.", ""]
    for model in sorted({key[0] for key in groups}):
        own = [r for r in records if run_key(r["cell"])[0] == model]
        has_bn = any(r["has_batchnorm"] for r in own)
        out += [f"### {model}", "", f"Settings of every {model} cell: `{json.dumps(own[0]['settings'])}`", ""]
        figure = figures_dir / f"quality_{model.replace(' (', '_').rstrip(')')}.png"
        plot_cross_bit(groups, model, main_lambda, figure, tuple(MODES) if has_bn else ("plain",))
        out.append(f"![{model} accuracy vs bit-width]({os.path.relpath(figure, document_dir)})")
        for mode, title in MODES.items():
            if mode == "bn" and not has_bn:
                out.append(f"\n{model} has no BatchNorm: re-estimation changes nothing, the plain table is both.")
                continue
            table = cross_bit_markdown(groups, model, mode, main_lambda)
            out += [f"\n**{title}** (bold: the run's target bit)\n", table]
        for mode in MODES if has_bn else ("plain",):
            checks = target_checks(groups, model, mode, main_lambda)
            if checks:
                out += [f"\n**Targets, {MODES[mode]}**\n", targets_markdown(checks)]
        sweep = lambda_sweep_markdown(groups, model, has_bn)
        out += ["\n**Lambda sweep at 3 bits** (lambda 0 = the FP run)\n", sweep, ""]
    if stats:
        out += [
            f"### Where the weights sit in their {stats['bits']}-bit bins (`python bench/weight_stats.py`)\n",
            "Fraction of weights within 0.1 bin of a rounding threshold, weighted by layer size (0.20 if the "
            "positions were uniform), per layer-size bucket; the median over layers of max|W| / std (the scale, "
            "hence the grid, follows the largest weight); the fraction of weights rounded to 0; the range of "
            "the per-weight factor 2λ/N of the penalty's gradient.\n",
            diagnostics_markdown(stats),
            "",
        ]
    out += [
        "### Run time of the grid on this machine\n",
        runtime_markdown(records),
        "",
        "### Cost (training-step overhead, export)\n",
        cost_markdown(results_dir),
    ]
    return "\n".join(out)


def write_results(text: str, document: Path) -> None:
    """Replaces the generated block of `document` (between BEGIN and END), keeping the hand-written text around it."""
    old = document.read_text() if document.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        from hf_oscq.errors import OscqValueError  # one line at the script's boundary

        raise OscqValueError(f"{document} lacks the markers {BEGIN!r} ... {END!r}: add them where the tables go.")
    head, rest = old.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    document.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    from quality import MAIN_LAMBDA, results_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=results_folder("cpu"), help="Folder of the cell JSONs.")
    parser.add_argument("--document", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs", help="Where the PNG plots go.")
    args = parser.parse_args(argv)
    records = load_records(args.results)
    stats_path = args.results / "diagnostics" / "weight_stats_w3.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    text = render(records, MAIN_LAMBDA, args.results.parent, args.figures, args.document.parent, stats)
    write_results(text, args.document)
    sys.stdout.write(f"{len(records)} cells -> {args.document}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("aggregate.py", main))
