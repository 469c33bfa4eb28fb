import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "--dataset",
    "digits",
    "--vit_size",
    "micro",
    "--max_steps",
    "4",
    "--export",
    "false",
    "--track_oscillations",
    "false",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--osc_eval_bits",
    "3",
    "--export_bits",
    "3",
    "--max_eval_samples",
    "64",
    "--learning_rate",
    "0.003",
    "--seed",
    "0",
    "--disable_tqdm",
    "true",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _run(launcher, output, batch):
    command = [
        *launcher,
        str(ROOT / "recipes" / "train_vit.py"),
        *COMMON,
        "--output_dir",
        str(output),
        "--per_device_train_batch_size",
        str(batch),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, cwd=output.parent)


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two = _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"],
        tmp_path / "two",
        16,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run([sys.executable], tmp_path / "one", 32)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run_info.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "run_info.json").read_text())["world_size"] == 1
    weights = [load_file(str(tmp_path / run / "training/oscillation/model.safetensors")) for run in ("one", "two")]
    differences = torch.cat([(weights[0][k] - weights[1][k]).abs().flatten() for k in weights[0]])
    # float32, 4 Adam steps. Adam divides each gradient by its own running magnitude, so an element whose gradient is
    # at float32 rounding level (the all-reduce sums in another order) can step by up to the learning rate either
    # way: a handful of such elements may differ by up to 2 * lr * steps; every other weight agrees to 1e-5.
    assert (differences > 1e-5).float().mean().item() < 1e-3
    assert differences.max().item() < 2 * 0.003 * 4
    losses = [
        [
            entry["loss"]
            for entry in json.loads((tmp_path / run / "training/oscillation/trainer_state.json").read_text())[
                "log_history"
            ]
            if "loss" in entry
        ]
        for run in ("one", "two")
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.slow
def test_accelerate_cpu_flag_trap_is_a_clear_error(tmp_path):
    trapped = _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"], tmp_path / "trap", 16
    )
    assert trapped.returncode != 0
    assert "asked for 2 process(es), but this run has 1" in trapped.stderr
    assert not (tmp_path / "trap" / "run_info.json").exists()


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_load_and_are_accepted(config, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    from hf_oscq import OscillationConfig

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1 and loaded.mixed_precision == "no"
    if loaded.fsdp_config:  # what `accelerate launch` exports to the processes it starts
        assert loaded.fsdp_config["fsdp_version"] == 2
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", str(loaded.fsdp_config["fsdp_version"]))
    OscillationConfig(output_dir="out", report_to="none", use_cpu=True)


def test_push_to_hub_without_a_repository_is_refused_before_anything_loads(tmp_path):
    from hf_oscq import OscillationConfig
    from hf_oscq.errors import OscqValueError
    from hf_oscq.scripts.launch import check_run_settings

    training = OscillationConfig(output_dir=str(tmp_path), push_to_hub=True, use_cpu=True, report_to="none")
    with pytest.raises(OscqValueError, match="--push_to_hub needs --hub_model_id ORG/NAME"):
        check_run_settings(training)


def test_resume_point_finds_each_runs_own_last_checkpoint(tmp_path):
    """A recipe trains one run per method, each in its own folder: `true` resumes each from its last checkpoint
    (numerically last: checkpoint-10 after checkpoint-9); a run never reached starts over; a path applies to its
    run."""
    from hf_oscq.errors import OscqValueError
    from hf_oscq.scripts.launch import resume_point

    main, baseline, unreached = (tmp_path / "training" / m for m in ("oscillation", "qat", "none"))
    for step in (9, 10):
        (main / f"checkpoint-{step}").mkdir(parents=True)
    (baseline / "checkpoint-4").mkdir(parents=True)
    for off in (None, False, "", "false", "False"):
        assert resume_point(off, main) is None
    for on in (True, "true", "True"):
        assert resume_point(on, main) == str(main / "checkpoint-10")
        assert resume_point(on, baseline) == str(baseline / "checkpoint-4")
        assert resume_point(on, unreached) is None
    assert resume_point(str(main / "checkpoint-9"), main) == str(main / "checkpoint-9")
    assert resume_point(str(main / "checkpoint-9"), baseline) == str(baseline / "checkpoint-4")
    with pytest.raises(OscqValueError, match="no such folder.*or true to resume every run"):
        resume_point(str(tmp_path / "nowhere"), main)


def test_recipe_entry_points_destroy_the_process_group_they_ran_in(tmp_path):
    """A recipe's entry point ends the process group its launcher started, after success and after an error, so that
    no communication thread is left for the interpreter's exit to abort (SIGABRT, `terminate called without an active
    exception`). Places: `recipes/train_{vit,resnet18}.py` and `recipes/train_lm.py` through
    `run_and_end_processes`, the test workers through `end_processes` (a one-process gloo group here)."""
    import torch.distributed as dist

    from hf_oscq.scripts import lm_recipe, recipe
    from hf_oscq.scripts.launch import end_processes, run_and_end_processes

    store = dist.FileStore(str(tmp_path / "store"), 1)
    for outcome in ("returns", "raises"):
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

        def run(outcome=outcome):
            dist.barrier()
            if outcome == "raises":
                raise ValueError("bad input")
            return 0

        if outcome == "raises":
            with pytest.raises(ValueError, match="bad input"):
                run_and_end_processes(run)()
        else:
            assert run_and_end_processes(run)() == 0
        assert not dist.is_initialized(), outcome
    end_processes()  # without a group: nothing to do
    # the recipes' entry points go through it (a bad argument fails before any training)
    for main, argv in (
        (lambda a: recipe.main("vit", a), ["--dataset", "bogus"]),
        (lm_recipe.main, ["--dataset", "x"]),
    ):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / f"{argv[1]}"), 1), rank=0, world_size=1)
        assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 1
        assert not dist.is_initialized()
