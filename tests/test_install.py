"""The install instructions: pip builds hf_oscq from a git URL (here the file URL of this clone) into a wheel that
carries its package data (the evaluate module, the card templates, the C source of the packed-weight kernels) and the
`hf-oscq` command."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_builds_from_a_git_url_with_package_data_and_command(tmp_path):
    pytest.importorskip("wheel", reason="the dev extra installs wheel: pip install -e '.[dev]'")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git clone")
    url = f"git+file://{ROOT}@{head.stdout.strip()}"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    completed = subprocess.run([*command, url], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_oscq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for packaged in (
        "hf_oscq/evaluate_modules/accuracy/accuracy.py",
        "hf_oscq/templates/model_card.md",
        "hf_oscq/templates/trainer_card.md",
        "hf_oscq/cli/eval.py",
        "hf_oscq/quantization/kernels/packed_kernels.c",  # compiled on first use (quantization/kernel_build.py)
    ):
        assert packaged in names, packaged
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "hf-oscq = hf_oscq.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
