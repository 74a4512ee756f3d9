"""What works on this machine: versions, and each accelerated path tried on a tiny input.

A feature that imports is not a feature that runs: a CUDA build without a driver, a
``torch.compile`` without a C++ compiler or a mamba-ssm built against another torch all
import fine and fail at the first call. So every check runs the real thing on a few numbers
and reports one of

* ``ok``       it ran and gave the right answer
* ``missing``  not installed or not present here; ``fix`` says what to install
* ``failed``   present but it raised or gave a wrong answer; ``detail`` has the error
* ``skipped``  does not apply here (Triton without a GPU)
* ``unknown``  no answer within the time limit (a first ``torch.compile`` is slow)

``parallax doctor`` is a thin layer over ``diagnose``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

# distribution name -> install command, for the packages whose versions are reported
PACKAGES = {
    "numpy": "pip install numpy",
    "safetensors": "pip install safetensors",
    "tokenizers": "pip install tokenizers",
    "triton": "pip install 'parallax[gpu]'",
    "mamba-ssm": "pip install mamba-ssm --no-build-isolation",
    "transformers": "pip install 'parallax[hf]'",
    "lm_eval": "pip install 'parallax[eval]'",
}
CUDA_TORCH_FIX = "pip install torch --index-url https://download.pytorch.org/whl/cu128"


@dataclass
class Check:
    name: str
    status: str  # ok | missing | failed | skipped | unknown
    detail: str
    fix: str = ""


def package_version(name: str) -> str | None:
    """The installed version of a distribution, without importing it (None if absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
    }
    found.update({name: package_version(name) for name in PACKAGES})
    return found


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def check_cuda() -> Check:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            detail = f"torch {torch.__version__} is a CPU-only build (builds for other CUDAs: pytorch.org/get-started)"
            return Check("cuda", "missing", detail, CUDA_TORCH_FIX)
        return Check("cuda", "missing", f"torch is built for CUDA {torch.version.cuda} but sees no GPU",
                     "check the NVIDIA driver with nvidia-smi (and CUDA_VISIBLE_DEVICES)")
    try:
        ones = torch.ones(4, 4, device="cuda")
        total = (ones @ ones).sum().item()
    except RuntimeError as exc:
        return Check("cuda", "failed", _error(exc))
    if total != 64:
        return Check("cuda", "failed", f"a 4x4 matmul of ones summed to {total}, not 64")
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return Check("cuda", "ok", f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_bf16() -> Check:
    """A bf16 matmul on the device the trainer would pick (it autocasts to bf16 on CUDA only)."""
    device = _device()
    try:
        ones = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        product = ones @ ones
    except RuntimeError as exc:
        return Check("bf16", "failed", f"bf16 matmul on {device}: {_error(exc)}")
    if product.dtype != torch.bfloat16 or not bool((product == 16).all()):
        return Check("bf16", "failed", f"bf16 matmul on {device} gave a wrong result")
    note = "" if device == "cuda" else " (training on CPU uses fp32; bf16 autocast is for CUDA)"
    return Check("bf16", "ok", f"bf16 matmul on {device}{note}")


_COMPILE_PROBE = """
import torch
x = torch.randn(8, device={device!r})
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)
"""


def _run_python(code: str, timeout: float) -> subprocess.CompletedProcess | None:
    """Run ``code`` in a fresh interpreter; None if it is still running after ``timeout`` s.

    A separate process, so a slow or crashing compile cannot hang or kill the doctor; its own
    session, so a timeout also ends any compiler it started.
    """
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")  # no worker pool for one tiny kernel
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_compile(timeout: float = 120.0) -> Check:
    """``torch.compile`` (inductor) of a one-line function on the default device.

    On CPU inductor writes C++ and builds it with ``$CXX`` (default g++), so without a
    compiler it fails; that case is reported without trying. A first compile takes tens of
    seconds on a small CPU (later ones hit the cache), hence the time limit.
    """
    device = _device()
    compiler = os.environ.get("CXX", "g++")
    if device == "cpu" and shutil.which(compiler) is None:
        return Check("torch.compile", "missing", f"no C++ compiler ({compiler}) for inductor on CPU",
                     "apt-get install -y g++")
    result = _run_python(_COMPILE_PROBE.format(device=device), timeout)
    if result is None:
        return Check("torch.compile", "unknown",
                     f"no answer within {timeout:g} s on {device} (a first compile is slow; raise --timeout)")
    if result.returncode == 0:
        return Check("torch.compile", "ok", f"inductor compiled and ran a small function on {device}")
    lines = result.stderr.strip().splitlines()
    last = lines[-1] if lines else f"exit code {result.returncode}"
    if "Python.h" in result.stderr:
        return Check("torch.compile", "failed", last, "apt-get install -y python3-dev")
    return Check("torch.compile", "failed", last)


def check_triton() -> Check:
    if importlib.util.find_spec("triton") is None:
        return Check("triton", "missing", "not installed", PACKAGES["triton"])
    if not torch.cuda.is_available():
        return Check("triton", "skipped", "installed, but Triton kernels need a CUDA GPU")
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offsets < n
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

        x = torch.zeros(100, device="cuda")
        add_one[(1,)](x, x.numel(), BLOCK=128)
    except Exception as exc:  # a broken Triton fails in many ways: compiler, driver, ABI
        return Check("triton", "failed", _error(exc))
    if not bool((x == 1).all()):
        return Check("triton", "failed", "a Triton kernel on cuda gave a wrong result")
    return Check("triton", "ok", f"triton {triton.__version__} ran a kernel on cuda")


def check_mamba() -> Check:
    """mamba-ssm's selective-scan kernel through the CWS dispatch, against the PyTorch reference."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return Check("mamba kernel", "missing",
                     "mamba-ssm not installed (the CWS uses the Triton scan on CUDA, else the PyTorch one)",
                     PACKAGES["mamba-ssm"])
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as exc:  # typically an extension built against another torch or CUDA
        return Check("mamba kernel", "failed", f"mamba_ssm does not import: {_error(exc)}",
                     f"{PACKAGES['mamba-ssm']} --force-reinstall --no-cache-dir")
    if not torch.cuda.is_available():
        return Check("mamba kernel", "skipped", "installed, but the kernel needs a CUDA GPU")
    from parallax.ops.ssm_scan import selective_scan, selective_scan_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, t, d, n = 2, 16, 8, 4
    u, delta = torch.randn(b, t, d, device="cuda", generator=gen), torch.rand(b, t, d, device="cuda", generator=gen)
    A = -torch.rand(d, n, device="cuda", generator=gen)
    B, C = (torch.randn(b, t, n, device="cuda", generator=gen) for _ in range(2))
    try:
        y, _ = selective_scan(u, delta, A, B, C)
        y_ref, _ = selective_scan_ref(u, delta, A, B, C)
        torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    except Exception as exc:  # kernel errors and mismatches alike mean "do not trust it"
        return Check("mamba kernel", "failed", _error(exc))
    return Check("mamba kernel", "ok", "selective scan on cuda matches the PyTorch reference")


def diagnose(compile_timeout: float = 120.0) -> dict:
    """Versions, checks and the install commands for what is missing, JSON-serialisable."""
    found = versions()
    checks = [check_cuda(), check_bf16(), check_compile(compile_timeout), check_triton(), check_mamba()]
    fixes: dict[str, str] = {}  # command -> what it is for; one line per command
    for name, version in found.items():
        if name in PACKAGES and version is None:
            fixes.setdefault(PACKAGES[name], name)
    for check in checks:
        if check.fix:
            fixes.setdefault(check.fix, check.name)
    return {
        "versions": found,
        "checks": [asdict(c) for c in checks],
        "fixes": [{"for": name, "run": command} for command, name in fixes.items()],
    }
