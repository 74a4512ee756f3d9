"""`parallax doctor` on a CPU machine: honest versions, CUDA reported absent, valid JSON."""

import json

import pytest
import torch

from parallax.cli.main import main
from parallax.doctor import check_compile, diagnose

STATUSES = {"ok", "missing", "failed", "skipped", "unknown"}


def test_doctor_json_reports_this_torch_and_no_cuda(capsys):
    # a 1 s limit keeps the test fast: a first torch.compile then answers "unknown"
    assert main(["doctor", "--json", "--timeout", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    assert {"python", "cuda", "numpy", "safetensors", "tokenizers", "triton", "mamba-ssm", "transformers",
            "lm_eval"} <= report["versions"].keys()
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"cuda", "bf16", "torch.compile", "triton", "mamba kernel"}
    assert all(c["status"] in STATUSES for c in checks.values())
    if not torch.cuda.is_available():
        assert checks["cuda"]["status"] == "missing" and checks["cuda"]["fix"]
        assert report["versions"]["cuda"] is None or "no GPU" in checks["cuda"]["detail"]
        assert checks["triton"]["status"] in {"missing", "skipped"}
    assert checks["bf16"]["status"] == "ok"
    for fix in report["fixes"]:
        assert fix["run"].startswith(("pip install", "apt-get install"))


def test_doctor_text_names_every_check(capsys):
    assert main(["doctor", "--timeout", "1"]) == 0
    out = capsys.readouterr().out
    assert f"torch          {torch.__version__}" in out
    for name in ("cuda", "bf16", "torch.compile", "triton", "mamba kernel"):
        assert name in out


def test_compile_without_a_compiler_says_what_to_install(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on CUDA inductor compiles with Triton, not the C++ compiler")
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    check = check_compile(timeout=1)
    assert check.status == "missing" and check.fix == "apt-get install -y g++"


def test_missing_optional_packages_come_with_an_install_command():
    report = diagnose(compile_timeout=1)
    commands = {fix["for"]: fix["run"] for fix in report["fixes"]}
    for name, version in report["versions"].items():
        if version is None and name not in ("cuda", "cudnn"):
            assert commands[name].startswith("pip install")
