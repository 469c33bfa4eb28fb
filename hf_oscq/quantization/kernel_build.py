"""Builds and loads the compiled CPU kernels of packed weights (kernels/packed_kernels.c) on first use.

The C source is compiled once per machine with the system's C compiler into a per-user cache
(`$HF_OSCQ_KERNEL_CACHE`, else `$XDG_CACHE_HOME/hf_oscq/kernels`, else `~/.cache/hf_oscq/kernels`), keyed by the
source, the compiler and the processor's features, and loaded with `ctypes`: no Python headers, no build tool, no
download. It is compiled with `-march=native` (the SIMD instructions of the building machine: AVX2, AVX-512, NEON)
where the compiler accepts that and as plain C otherwise, with OpenMP where available, linked to the OpenMP runtime
torch itself uses so that both share one thread pool.

Where nothing builds (no compiler, a big-endian host) or `HF_OSCQ_DISABLE_KERNELS=1` is set, `load_kernels()`
returns `None` and packed weights are dequantized with torch operations instead (slower, same values); the first
case logs one warning per process saying so.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

DISABLE_ENV = "HF_OSCQ_DISABLE_KERNELS"
CACHE_ENV = "HF_OSCQ_KERNEL_CACHE"
SOURCE = Path(__file__).resolve().parent / "kernels" / "packed_kernels.c"
MAX_ROWS = 16  # rows of input the fused products take (MAX_ROWS in the C source)

_LOCK = threading.Lock()
_state: dict[str, object] = {}  # "library": the loaded CDLL or None once tried; "reason": why not


def disabled() -> bool:
    """Whether `HF_OSCQ_DISABLE_KERNELS` asks for the torch fallback."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def cache_dir() -> Path:
    """The folder compiled kernels are cached in."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hf_oscq" / "kernels"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _torch_openmp() -> Path | None:
    """The GNU OpenMP runtime shipped inside torch (torch/lib/libgomp*.so*), if any."""
    import torch

    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _cpu_features() -> str:
    """What `-march=native` depends on: the processor's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _run(command: list[str]) -> str | None:
    """Runs a compiler command; None on success, else the first line of its error output."""
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    if completed.returncode == 0:
        return None
    lines = (completed.stderr or completed.stdout).strip().splitlines()
    return lines[0] if lines else f"exit code {completed.returncode}"


def _compile(compiler: str, target: Path, defines: tuple[str, ...] = (), native: bool = True) -> str | None:
    """Compiles the source into `target`, trying the fastest flags first (`-march=native` unless `native` is False,
    OpenMP); None on success, else the last error. `defines` are extra `-D` flags (`-DOSCQ_PLAIN_C` builds the plain C
    loops without the compiler's vector extensions)."""
    openmp = _torch_openmp()
    # OpenMP through torch's own runtime (one thread pool), through the compiler's, or none (one thread)
    linkings = ([["-fopenmp"], [str(openmp), f"-Wl,-rpath,{openmp.parent}"]],) if openmp else ()
    linkings += ([["-fopenmp"], ["-fopenmp"]], [[], []])
    error = None
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        obj, library = Path(scratch) / "packed_kernels.o", Path(scratch) / target.name
        for isa in (["-march=native"], []) if native else ([],):
            for compile_flags, link_flags in linkings:
                base = [compiler, "-O3", "-fPIC", "-std=gnu99", *isa, *compile_flags, *defines]
                error = _run([*base, "-c", str(SOURCE), "-o", str(obj)]) or _run(
                    [compiler, "-shared", str(obj), *link_flags, "-o", str(library)]
                )
                if error is None:
                    os.replace(library, target)  # atomic: concurrent builds each write a whole file
                    return None
    return error


def _build() -> tuple[ctypes.CDLL | None, str]:
    if disabled():
        return None, f"{DISABLE_ENV} is set"
    if sys.byteorder != "little":
        return None, "the kernels read the packed stream as little-endian words, and this host is big-endian"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (cc, gcc or clang; or set CC)"
    import torch

    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), compiler, _cpu_features(), str(_torch_openmp()), torch.__version__]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"packed_kernels-{key}.so"
    if not target.is_file():
        logger.info("Compiling hf_oscq's CPU kernels for packed weights into %s (once per machine)", target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            error = _compile(compiler, target)
        except OSError as error:  # an unwritable cache folder
            return None, f"cannot write the kernel cache {target.parent} ({error}; set {CACHE_ENV} to another folder)"
        if error is not None:
            return None, f"{compiler} failed: {error}"
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        return None, f"cannot load {target}: {error}"
    _declare(library)
    return library, ""


def _declare(library: ctypes.CDLL) -> None:
    pointer, size, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.oscq_dequantize.argtypes = [pointer, size, integer, size, pointer, size, size, pointer, integer]
    library.oscq_matmul_rows.argtypes = [
        pointer,
        size,
        integer,
        size,
        size,
        pointer,
        size,
        pointer,
        size,
        pointer,
        pointer,
        integer,
    ]  # fmt: skip (the tenth: the bias, or None)
    library.oscq_matmul_cols.argtypes = [pointer, size, integer, size, size, pointer, size, pointer, size, pointer,
                                         integer]  # fmt: skip
    library.oscq_codes_valid.argtypes = [pointer, size, integer, size, integer]
    for function in (library.oscq_dequantize, library.oscq_matmul_rows, library.oscq_matmul_cols,
                     library.oscq_codes_valid):  # fmt: skip
        function.restype = integer


def load_kernels() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call of the process (seconds, once per machine: cached); `None`
    where they cannot be built or are disabled, after one logged warning naming the reason (none when disabled)."""
    if "library" not in _state:
        with _LOCK:
            if "library" not in _state:
                library, reason = _build()
                _state["reason"] = reason
                _state["library"] = library
                if library is None and not disabled():
                    logger.warning(
                        "hf_oscq's compiled CPU kernels for packed weights are not available (%s): packed weights "
                        "are dequantized with torch operations in each forward pass instead, which gives the same "
                        "values more slowly. Install a C compiler (e.g. `apt install gcc`) for the fast path, or set "
                        "%s=1 to use the fallback without this warning.",
                        reason,
                        DISABLE_ENV,
                    )
    return _state["library"]  # type: ignore[return-value]


def kernels_unavailable_reason() -> str:
    """Why `load_kernels()` returns `None` ('' when it does not)."""
    load_kernels()
    return str(_state.get("reason", ""))


def reset() -> None:
    """Forgets the loaded kernels, so that the next `load_kernels()` looks again (for tests that switch
    `HF_OSCQ_DISABLE_KERNELS`)."""
    with _LOCK:
        _state.clear()
