"""The install instructions: pip builds hf_oscq from a git URL (here the file URL of this clone) into a wheel that
carries its package data (the evaluate module, the card templates, the C source of the packed-weight kernels) and the
`hf-oscq` command."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_builds_from_a_git_url_with_package_data_and_command(tmp_path):
    pytest.importorskip("wheel", reason="the dev extra installs wheel: pip install -e '.[dev]'")
    from hf_oscq.versions import WHEEL

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git clone")
    url = f"git+file://{ROOT}@{head.stdout.strip()}"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    completed = subprocess.run([*command, url], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_oscq-*.whl")
    assert wheel.name == WHEEL  # the file the README and every card tell users to install
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "__init__.py" not in names  # the clone's root file stays out of the package
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


def test_a_script_next_to_a_clone_named_hf_oscq_is_told_the_folder_shadows_the_package(tmp_path):
    """`import hf_oscq` in a script that sits next to a clone folder named `hf_oscq` finds the folder, not the
    installed package: the clone's root stops it with an error naming the folder (instead of later errors that say
    to import hf_oscq). Run from inside the clone, or from elsewhere, the package imports as usual."""
    clone = tmp_path / "hf_oscq"
    (clone / "hf_oscq").mkdir(parents=True)
    shutil.copy(ROOT / "__init__.py", clone / "__init__.py")
    (clone / "hf_oscq" / "__init__.py").write_text("WHO = 'the package'\n")
    script = tmp_path / "script.py"
    script.write_text("import hf_oscq\nprint(hf_oscq.WHO)\n")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    shadowed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=environment
    )
    assert shadowed.returncode == 1
    last = shadowed.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: `import hf_oscq` found the folder") and str(clone) in last
    assert "shadows it" in last and f"pip install -e {clone}" in last
    inside = subprocess.run(
        [sys.executable, "-c", "import hf_oscq; print(hf_oscq.WHO)"],
        capture_output=True,
        text=True,
        cwd=clone,
        env=environment,
    )
    assert inside.stdout.strip() == "the package", inside.stderr
