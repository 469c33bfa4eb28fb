"""The quality bench's pure logic: the grid's priority order and the aggregator, on hand-made cell records."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


quality = _load("quality")
aggregate = _load("aggregate")


def _table(fp: float, per_bit: dict[int, float]) -> dict:
    table = {"fp": {"accuracy": fp}}
    table.update({f"w{b}": {"accuracy": per_bit.get(b, fp)} for b in range(2, 9)})
    return table


def _record(model, method, bits, osc_lambda, seed, plain, bn=None, seconds=10.0):
    return {
        "cell": {"model": model, "method": method, "bits": bits, "osc_lambda": osc_lambda, "seed": seed},
        "settings": {"max_train_samples": 8},
        "plain": plain,
        "bn": bn,
        "has_batchnorm": bn is not None,
        "seconds": {"train_and_plain_eval": seconds, "bn_eval": 0.0},
        "torch_threads": 1,
    }


def test_grid_priority_and_names():
    cells = quality.grid()
    names = [cell.name for cell in cells]
    variants = [cell for cell in cells if cell.variant]
    assert len(names) == len(set(names)) == 2 * 2 * 7 + 2 * len(quality.SWEEP_LAMBDAS) + len(variants)
    assert names[:6] == [
        "resnet18_fp_s0",
        "resnet18_osc3_lam10_s0",
        "resnet18_qat3_s0",
        "vit_fp_s0",
        "vit_osc3_lam10_s0",
        "vit_qat3_s0",
    ]
    first_seed_one = names.index("resnet18_fp_s1")
    assert all(cell.seed == 0 for cell in cells[:first_seed_one])
    assert {cell.bits for cell in cells[:first_seed_one] if cell.bits} == {2, 3, 4}
    sweep = cells[-len(variants) - 2 * len(quality.SWEEP_LAMBDAS) : -len(variants)]
    assert all(cell.bits == 3 and cell.osc_lambda != quality.MAIN_LAMBDA for cell in sweep)
    assert cells[-len(variants) :] == variants  # investigations last
    assert quality.Cell("vit", "qat", 3, None, 0, "e6").name == "vit_qat3_s0_e6"


def test_summarize_mean_spread_and_no_batchnorm_model():
    records = [
        _record("resnet18", "none", None, None, 0, _table(0.90, {3: 0.40}), bn=_table(0.90, {3: 0.80})),
        _record("resnet18", "none", None, None, 1, _table(0.92, {3: 0.50}), bn=_table(0.92, {3: 0.84})),
        _record("vit", "qat", 3, None, 0, _table(0.70, {3: 0.75})),
    ]
    groups = aggregate.summarize(records)
    fp = groups[("resnet18", "none", None, None)]
    assert fp["seeds"] == [0, 1]
    assert aggregate.mean(fp["plain"]["w3"]) == pytest.approx(45.0)
    assert aggregate.spread(fp["plain"]["w3"]) == pytest.approx(50**0.5)  # sample std of 40 and 50
    assert aggregate.format_cell(fp["bn"]["w3"]) == "82.0 ± 2.8"
    vit = groups[("vit", "qat", 3, None)]
    assert vit["bn"]["w3"] == vit["plain"]["w3"] == [75.0]


def test_target_checks_verdicts():
    records = [
        _record("m", "none", None, None, 0, _table(0.90, {3: 0.50, 4: 0.86})),
        # Regularizer at 3 bits: 0.5 below QAT at w3 (within 1 point), far above PTQ (50).
        _record("m", "oscillation", 3, 10.0, 0, _table(0.90, {3: 0.80, 2: 0.30})),
        _record("m", "qat", 3, None, 0, _table(0.85, {3: 0.805, 2: 0.20})),
        # At 4 bits: 2 points below QAT, only 1 point above PTQ.
        _record("m", "oscillation", 4, 10.0, 0, _table(0.90, {4: 0.87})),
        _record("m", "qat", 4, None, 0, _table(0.90, {4: 0.89})),
    ]
    rows = aggregate.target_checks(aggregate.summarize(records), "m", "plain", 10.0)
    verdicts = {row["target"]: (row["values"], row["holds"]) for row in rows}
    assert verdicts["Reg @3 within 1 point of QAT @3 at w3"] == ("80.0 vs 80.5", True)
    assert verdicts["Reg @3 far above FP + PTQ at w3 (>= 5 points)"] == ("80.0 vs 50.0", True)
    assert verdicts["Reg @4 within 1 point of QAT @4 at w4"] == ("87.0 vs 89.0", False)
    assert verdicts["Reg @4 far above FP + PTQ at w4 (>= 5 points)"] == ("87.0 vs 86.0", False)
    # Unseen bits for a 3-bit run: w2, w4..w8. Reg: (30 + 5 * 90) / 6 = 80; QAT: (20 + 5 * 85) / 6 = 74.17.
    assert verdicts["trained @3: Reg >= QAT on average over unseen w2..w8"] == ("80.0 vs 74.2", True)
    assert not any(target.startswith("trained @2") for target in verdicts)  # no 2-bit runs in the records


def test_write_results_keeps_hand_written_text(tmp_path):
    document = tmp_path / "RESULTS.md"
    document.write_text(f"# Title\nintro\n{aggregate.BEGIN}\nold table\n{aggregate.END}\nanalysis\n")
    aggregate.write_results("new table", document)
    assert document.read_text() == f"# Title\nintro\n{aggregate.BEGIN}\nnew table\n{aggregate.END}\nanalysis\n"
    document.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        aggregate.write_results("x", document)


def test_render_writes_tables_and_plot(tmp_path):
    records = [
        _record("resnet18", "none", None, None, 0, _table(0.90, {3: 0.40}), bn=_table(0.90, {3: 0.80})),
        _record("resnet18", "qat", 3, None, 0, _table(0.88, {3: 0.87}), bn=_table(0.88, {3: 0.88})),
    ]
    (tmp_path / "overhead.json").write_text(
        json.dumps(
            {
                "workload": "w",
                "device": "cpu",
                "torch_threads": 2,
                "results": [
                    {
                        "batch_size": 32,
                        "median_step_seconds": {"fp": 0.1, "qat": 0.15},
                        "ratio_to_fp": {"fp": 1.0, "qat": 1.5},
                    }
                ],
            }
        )
    )
    (tmp_path / "export_size.json").write_text(
        json.dumps(
            {
                "bits": [2, 8],
                "models": {
                    "net": {"fp32_bytes": 4e6, "variants": {"w2": {"vs_fp32": 0.0625}, "w8": {"vs_fp32": 0.25}}}
                },
            }
        )
    )
    text = aggregate.render(records, 10.0, tmp_path, tmp_path / "figures", tmp_path)
    assert (tmp_path / "figures" / "quality_resnet18.png").stat().st_size > 0
    assert "(figures/quality_resnet18.png)" in text
    assert "| FP + PTQ | 1 | 90.0 | 90.0 | 40.0 | 90.0 |" in text
    assert "| QAT @3 | 1 | 88.0 | 88.0 | **87.0** | 88.0 |" in text
    assert "| 32 | 100.0 | 1.00x | 1.50x |" in text
    assert "| net | 4.0 | 0.062 | 0.250 | - |" in text


def test_diagnostics_weights_by_layer_size():
    def layer(numel, factor, near, ratio, zero):
        return {
            "numel": numel,
            "penalty_gradient_factor": factor,
            "near_threshold": near,
            "max_over_std": ratio,
            "zero_code_fraction": zero,
        }

    stats = {
        "bits": 3,
        "cells": {
            "m_osc3": {
                "conv1.weight": layer(1000, 0.02, 0.5, 3.0, 0.2),
                "fc.weight": layer(3000, 0.002, 0.3, 5.0, 0.6),
                "big.weight": layer(400_000, 5e-5, 0.2, 4.0, 0.5),
            }
        },
    }
    row = aggregate.diagnostics_markdown(stats).splitlines()[-1]
    # < 10k: (0.5 * 1000 + 0.3 * 3000) / 4000 = 0.35; none of 10k-200k; >= 200k: 0.2. Median of 3, 5, 4 = 4.
    # Rounded to 0: (0.2 * 1000 + 0.6 * 3000 + 0.5 * 400000) / 404000 = 0.50.
    assert row == "| m_osc3 | 0.35 | - | 0.20 | 4.00 | 0.500 | 5e-05..2e-02 |"


def test_runtime_memory_counts_packed_weights_by_what_they_hold():
    import torch

    from hf_oscq import pack_codes, quantize_codes
    from hf_oscq.quantization.packed_tensor import PackedWeight

    runtime_memory = _load("runtime_memory")
    model = torch.nn.Sequential(torch.nn.Linear(40, 10), torch.nn.Linear(10, 3))
    codes, scale = quantize_codes(model[0].weight, 3)
    packed = PackedWeight(pack_codes(codes, 3), scale, 3, (10, 40), torch.float32)
    model[0].weight = torch.nn.Parameter(packed, requires_grad=False)
    counted = runtime_memory.weight_bytes(model, {"0.weight"})
    assert counted["quantized"] == 150 + 4  # ceil(400 * 3 / 8) code bytes and one float32 scale
    assert counted["quantized_vs_fp32"] == 154 / 1600
    assert counted["total"] == 154 + 4 * (10 + 30 + 3)  # plus the float biases and second weight


aggregate_full = _load("aggregate_full")
demo = _load("demo")


def test_full_grid_priority_names_and_normalizations():
    cells = quality.full_grid()
    names = [cell.name for cell in cells]
    assert len(names) == len(set(names))
    gm, lm = quality.FULL_LAMBDA["global_mean"], quality.FULL_LAMBDA["layer_mean"]
    assert names[:4] == ["vit_fp_s0", "vit_qat3_s0", f"vit_osc3gm_lam{gm:g}_s0", f"vit_osc3_lam{lm:g}_s0"]
    main = [
        cell
        for cell in cells
        if cell.method in ("none", "qat")
        or (cell.method == "oscillation" and cell.osc_lambda == quality.FULL_LAMBDA[cell.normalization])
    ]
    assert len(main) == 3 * 2 * 4  # 3 models, 2 seeds, FP + QAT + both regularizers
    assert cells[: len(main)] == main  # the main cells first, the CIFAR-stem ResNet-18 last among them
    assert {cell.model for cell in cells[len(main) - 8 : len(main)]} == {"resnet18"}
    peers = len(quality.FULL_PEERS) * 2  # the closest peer last, on the ImageNet-stem ResNet-18, seeds 0 and 1
    sweep, last = cells[len(main) : -peers], cells[-peers:]
    assert all(cell.method == "oscillation" and cell.bits == 3 and cell.model != "resnet18" for cell in sweep)
    assert [cell.name for cell in last] == ["resnet18in_kure_lam1_s0", "resnet18in_kure_lam1_s1"]
    assert [cell.seed for cell in sweep] == sorted(cell.seed for cell in sweep)  # seed 0 first
    assert quality.Cell("vit", "oscillation", 3, 30.0, 1, normalization="global_mean").name == "vit_osc3gm_lam30_s1"
    assert [cell.name for cell in quality.pilot_grid(("vit",))][:2] == ["vit_fp_s0", "vit_qat3_s0"]


def _full_record(model, method, normalization, osc_lambda, seed, table):
    record = _record(model, method, 3 if method != "none" else None, osc_lambda, seed, table)
    record["cell"]["normalization"] = normalization
    return record


def test_goal_rows_on_hand_made_means():
    records = [
        _full_record("m", "none", "layer_mean", None, 0, _table(0.90, {2: 0.10, 3: 0.88})),
        _full_record("m", "qat", "layer_mean", None, 0, _table(0.89, {2: 0.20, 3: 0.89})),
        # within 1 point of QAT at w3 (88.5 vs 89.0); w2 60 >= 10 + 20 and >= 20 + (90 - 20) / 2 = 55
        _full_record("m", "oscillation", "global_mean", 100.0, 0, _table(0.90, {2: 0.60, 3: 0.885})),
        # 2 points under QAT at w3; w2 50: 20 points above FP + PTQ exactly, short of halfway (55)
        _full_record("m", "oscillation", "layer_mean", 10.0, 0, _table(0.90, {2: 0.50, 3: 0.87})),
    ]
    groups = aggregate_full.summarize(records)
    good = aggregate_full.goal_rows(groups, "m", "plain", ("m", "oscillation", 3, 100.0, "global_mean"))
    assert [(row["values"], row["holds"]) for row in good] == [
        ("88.5 vs 89.0", True),
        ("60.0 vs 10.0", True),
        ("60.0 vs 55.0", True),
    ]
    short = aggregate_full.goal_rows(groups, "m", "plain", ("m", "oscillation", 3, 10.0, "layer_mean"))
    assert [(row["values"], row["holds"]) for row in short] == [
        ("87.0 vs 89.0", False),
        ("50.0 vs 10.0", True),
        ("50.0 vs 55.0", False),
    ]
    # without the FP cell, the bars that need it are neither met nor missed, and the verdict waits for them
    partial = aggregate_full.summarize(records[1:])
    rows = aggregate_full.goal_rows(partial, "m", "plain", ("m", "oscillation", 3, 100.0, "global_mean"))
    assert [(row["values"], row["holds"]) for row in rows] == [
        ("88.5 vs 89.0", True),
        ("not measured yet", None),
        ("not measured yet", None),
    ]
    table = aggregate_full.goal_table(partial, "m", [("m", "oscillation", 3, 100.0, "global_mean")], ("plain",))
    assert table.splitlines()[-1].endswith("| not yet known |")
    table = aggregate_full.goal_table(partial, "m", [("m", "oscillation", 3, 10.0, "layer_mean")], ("plain",))
    assert table.splitlines()[-1].endswith("| no |")  # one bar already missed


def test_demo_checks_on_hand_made_tables():
    def table(fp, **bits):
        return {"fp": {"accuracy": fp}, **{f"w{b}": {"accuracy": bits.get(f"w{b}", fp)} for b in range(2, 9)}}

    tables = {
        "oscillation": table(0.80, w2=0.45, w3=0.785, w5=0.795),
        "qat": table(0.79, w2=0.20, w3=0.80),
        "none": table(0.80, w2=0.10, w3=0.79),
    }
    rows = demo.checks(tables, target=3)
    assert [row["holds"] for row in rows] == [True, True, True, True]
    assert rows[1]["values"] == "45.0 vs 10.0 / 20.0"
    assert rows[2]["values"] == "79.5..80.0 vs 80.0"  # w5-w8 against the regularizer's own full precision
    tables["qat"]["w2"]["accuracy"] = 0.26  # the regularizer is then only 19 points above QAT at 2 bits
    tables["oscillation"]["w6"]["accuracy"] = 0.788  # 1.2 points under its full precision
    assert [row["holds"] for row in demo.checks(tables, target=3)] == [True, False, False, False]
    tables["oscillation"]["w6"]["accuracy"] = 0.812  # 1.2 points above it: also more than 1 point away
    assert demo.checks(tables, target=3)[2]["holds"] is False
    tables["oscillation"]["w6"]["accuracy"] = 0.80
    tables["none"]["fp"]["accuracy"] = 0.81  # the FP run 1.5 points better than the regularizer's 79.5 at w5
    rows = demo.checks(tables, target=3)
    assert [row["holds"] for row in rows] == [True, False, True, False]
    assert rows[3]["values"] == "79.5..80.0 vs 81.0"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian packages bible-kjv, bible-kjv-text")
def test_lm_quality_bench_records_every_bit_width_and_its_ratios(tmp_path):
    import math
    import subprocess

    output = tmp_path / "lm_quality.json"
    command = [sys.executable, str(BENCH / "lm_quality.py"), "--block_size", "16", "--batch_size", "4"]
    command += ["--max_steps", "2", "--seeds", "0", "--max_eval_blocks", "2", "--workdir", str(tmp_path / "work")]
    done = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(output.read_text())
    variants = ["fp", "w2", "w3", "w4", "w5", "w6", "w7", "w8"]
    for method in ("none", "qat", "oscillation"):
        [run] = record["runs"][method]
        assert list(run["table"]) == variants
        for row in run["table"].values():
            assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-9)
        assert record["mean_perplexity"][method]["w3"] == run["table"]["w3"]["perplexity"]
    runs = {method: record["runs"][method][0]["table"] for method in record["runs"]}
    assert record["ratios"]["oscillation_over_qat_w4"] == pytest.approx(
        runs["oscillation"]["w4"]["perplexity"] / runs["qat"]["w4"]["perplexity"]
    )
    assert record["ratios"]["oscillation_over_fp_ptq_w2"] == pytest.approx(
        runs["oscillation"]["w2"]["perplexity"] / runs["none"]["w2"]["perplexity"]
    )
    assert "oscillation_over_qat_w4" in done.stdout


def test_overhead_lm_workload_times_every_mode_on_the_decoder_projections_group_wise():
    overhead = _load("overhead")

    from hf_oscq import QuantSpec, select_weights

    _, model = overhead.build("lm")
    selected = select_weights(model, spec=QuantSpec(3, "group", group_size=32))
    # 4 decoder layers x (q, k, v, o, gate, up, down); the embedding and lm_head stay in float by default
    assert len(selected) == 4 * 7 and not any("embed" in name or "lm_head" in name for name in selected)
    result = overhead.measure(2, "cpu", rounds=1, warmup=0, bits=3, osc_lambda=10.0, model_name="lm")
    medians = result["median_step_seconds"]
    assert set(medians) == set(overhead.MODES) and all(value > 0 for value in medians.values())
    assert result["ratio_to_fp"] == {mode: medians[mode] / medians["fp"] for mode in overhead.MODES}


aggregate_peers = _load("aggregate_peers")


def _peer_record(method, osc_lambda, seed, table, bits=None, multibit=None):
    record = _record("vit", method, bits, osc_lambda, seed, table)
    record["method_settings"] = {"osc_method": method, **({"osc_multibit_bits": multibit} if multibit else {})}
    record["train_seconds"] = 600.0
    record["evaluated_on"] = {"dataset": "d", "split": "train (held out of training)", "examples": 2, "metric": "m"}
    return record


def test_peers_grid_covers_every_method_and_seed_in_priority_order():
    cells = quality.peers_grid()
    names = [cell.name for cell in cells]
    assert len(names) == len(set(names)) == 2 * 2 * 7
    assert names[:7] == [
        "vit_fp_s0",
        "vit_osc3_lam10_s0",
        "vit_qat3_s0",
        "vit_kure_lam0.1_s0",
        "vit_kure_lam1_s0",
        "vit_damp3_lam10_s0",
        "vit_mbqat248_s0",
    ]
    assert [cell.seed for cell in cells] == [0] * 14 + [1] * 14
    assert quality.results_folder("peers").name == "peers"


def test_peers_goal_rows_on_hand_made_means():
    """Regularizer vs KURE's better lambda at every bit-width, vs multi-bit QAT at the bit-widths neither trained (5,
    6, 7) with the step-cost ratio, and dampening measurably worse at the bit below the target (two seeds each)."""
    flat = {b: 0.80 for b in range(2, 9)}
    records = []
    for seed, jitter in ((0, 0.0), (1, 0.002)):
        records += [
            _peer_record("oscillation", 10.0, seed, _table(0.80, {**flat, 2: 0.60 + jitter, 5: 0.795}), bits=3),
            _peer_record("kure", 0.1, seed, _table(0.80, {**flat, 2: 0.30, 5: 0.79}), bits=None),
            _peer_record("kure", 1.0, seed, _table(0.80, {**flat, 2: 0.40, 3: 0.805}), bits=None),
            _peer_record("multibit_qat", None, seed, _table(0.80, {**flat, 5: 0.80, 6: 0.81}), 8, [2, 4, 8]),
            _peer_record("dampening", 10.0, seed, _table(0.80, {**flat, 2: 0.20 - jitter}), bits=3),
        ]
    groups = aggregate_peers.summarize(records)
    costs = {"results": {"vit": {"ratio_to_plain": {"oscillation": 1.3, "multibit_qat": 3.0}}}}
    rows = aggregate_peers.goal_rows(groups, "vit", "plain", costs, 10.0)
    assert [row["holds"] for row in rows] == [False, True, True]
    assert rows[0]["values"] == "smallest margin -0.5 points at w3"  # 80.0 against KURE lambda 1's 80.5
    assert "(w5, w6, w7)" in rows[1]["goal"] and rows[1]["values"].startswith("smallest margin -1.0 points at w6")
    assert "step cost 0.43 of multi-bit QAT's" in rows[1]["values"]
    assert rows[2]["values"].startswith("60.1 vs 19.9 (+40.2 points")
    table = aggregate_peers.table_markdown(groups, aggregate_peers.ordered(groups, "vit"), "plain")
    assert "| multi-bit QAT {2,4,8} | 2 | 80.0 ± 0.0 | **80.0 ± 0.0** | 80.0 ± 0.0 | **80.0 ± 0.0** |" in table
    assert table.index("regularizer @3") < table.index("KURE, lambda 0.1") < table.index("dampening @3")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian packages bible-kjv, bible-kjv-text")
def test_serve_bench_dry_run_scores_each_variant_as_hf_oscq_does(tmp_path):
    """bench/serve_vllm.py's path with transformers as the engine (float32, CPU): the perplexity it computes from
    the engine's own log-probabilities equals hf_oscq's `quantize_model` perplexity of the same blocks, and the
    tokens/s ratios are against the fp row."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors (Python >= 3.11) is not installed")
    import subprocess

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from _export_models import tiny_llama

    import hf_oscq
    from hf_oscq.scripts.text import byte_tokenizer

    spec = hf_oscq.QuantSpec(4, "group", group_size=16)
    out = hf_oscq.export_quantized(
        tiny_llama(),
        tmp_path / "export",
        bits=(4, 8),
        spec=spec,
        tokenizer=byte_tokenizer(),
        format="compressed-tensors",
    )
    output = tmp_path / "serve.json"
    command = [sys.executable, str(BENCH / "serve_vllm.py"), "--export", str(out), "--engine", "transformers"]
    command += ["--device", "cpu", "--dry-run", "--block_size", "16", "--tolerance", "1e-6", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(output.read_text())
    assert list(record["variants"]) == ["fp", "w4", "w8"] and record["eval_blocks"] == 2
    for row in record["variants"].values():
        assert row["perplexity_check"] and row["perplexity"] == pytest.approx(row["perplexity_hf_oscq"], rel=1e-6)
    assert record["variants"]["fp"]["speed_vs_fp"] == 1.0
    assert record["versions"]["compressed_tensors"] and record["spec"]["group_size"] == 16


def test_runtime_memory_marks_each_goal_from_the_measures():
    """The goal rows of bench/runtime_memory.py: the worst ratio over bit-widths and thread counts decides, against
    the thresholds of the goals (decode >= 1.0x fp32 at every bit-width and >= 1.5x at 2-4 bits; image batch 1 <= 1.2x,
    batch 64 <= 1.05x; quantized tensors <= b/32 of fp32 + 3 %; load <= 1.2x)."""
    runtime_memory = _load("runtime_memory")
    bits = runtime_memory.BITS

    def speed(ratios):  # {variant: {measure: ratio}} at 1 thread, and 1.1 times each ratio at 2 threads
        return {
            threads: {
                variant: {"vs_fp32": {m: r * factor for m, r in measures.items()}}
                for variant, measures in ratios.items()
            }
            for threads, factor in (("1", 1.0), ("2", 1.1))
        }

    lm = {
        "speed": speed(
            {f"w{b}": {"decode_tokens_per_s": 1.6 if b <= 4 else 1.02} for b in bits}
            | {"w3": {"decode_tokens_per_s": 1.4}}
        ),
        "memory": {f"w{b}": {"quantized_vs_fp32": b / 32 + 1 / 32} for b in bits},  # group-wise 32: a bit more
        "load": {"fp32": {"load_seconds": 1.0}} | {f"w{b}": {"load_seconds": 1.1} for b in bits},
    }
    image = {
        "speed": speed(
            {f"w{b}": {"forward_b1_ms": 1.1, "forward_b64_ms": 1.0} for b in bits}
            | {"w8": {"forward_b1_ms": 1.3, "forward_b64_ms": 1.04}}
        ),
        "memory": {f"w{b}": {"quantized_vs_fp32": b / 32 * 1.001} for b in bits},
        "load": {},
    }
    rows = runtime_memory.evaluate_goals({"models": {"lm1024": lm, "resnet18": image}})
    goals = [goal for goal, *_ in runtime_memory.GOALS]  # every bit-width, 2-4 bits, batch 1, batch 64, memory, load
    found = {(goals.index(row["goal"]), row["model"], row["threads"]): row for row in rows}

    def check(goal, model, threads, met, worst, where):
        row = found[(goal, model, threads)]
        assert (row["met"], round(row["worst"], 4), row["where"]) == (met, worst, where), (goal, model, threads)

    check(0, "lm1024", "1", True, 1.02, "w5")  # decode >= 1.0x at every bit-width: the worst is w5..w8's 1.02x
    check(0, "lm1024", "2", True, 1.122, "w5")
    check(1, "lm1024", "1", False, 1.4, "w3")  # decode >= 1.5x at 2-4 bits: w3 below
    check(1, "lm1024", "2", True, 1.54, "w3")
    check(2, "resnet18", "1", False, 1.3, "w8")  # batch 1 <= 1.2x
    check(2, "resnet18", "2", False, 1.43, "w8")
    check(3, "resnet18", "1", True, 1.04, "w8")  # batch 64 <= 1.05x
    check(3, "resnet18", "2", False, 1.144, "w8")
    check(4, "lm1024", "-", False, 1.5, "w2: quantized tensors / (b/32 of fp32)")  # group-wise 32: 3/32, not 2/32
    check(4, "resnet18", "-", True, 1.001, "w2: quantized tensors / (b/32 of fp32)")
    check(5, "lm1024", "-", True, 1.1, "w2 (1 thread)")
    assert not found[(5, "resnet18", "-")]["met"]  # not measured is not met
    assert len(rows) == 2 * 2 + 2 * 2 + 2 + 2  # speed goals per thread count, memory and load once per model
