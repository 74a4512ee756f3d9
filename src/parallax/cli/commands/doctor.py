"""Check this machine: versions, and whether CUDA, bf16, torch.compile, Triton and the
optional mamba-ssm kernel actually work here (each is tried on a tiny input), with the
command that installs anything missing. Exit code 1 if something present is broken.

    parallax doctor
    parallax doctor --json
    parallax doctor --timeout 10        # give a first torch.compile less time
"""

from __future__ import annotations

import json

HELP = "check versions and which accelerated paths work on this machine"

MARKS = {"ok": "ok", "missing": "--", "failed": "FAIL", "skipped": "skip", "unknown": "??"}


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds the torch.compile check may take (default 120; a first compile is slow)")


def run(args) -> int:
    from parallax.doctor import diagnose

    report = diagnose(compile_timeout=args.timeout)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 1 if any(c["status"] == "failed" for c in report["checks"]) else 0


def format_report(report: dict) -> str:
    lines = ["versions"]
    for name, version in report["versions"].items():
        absent = "none" if name in ("cuda", "cudnn") else "not installed"
        lines.append(f"  {name:<14} {version or absent}")
    lines.append("checks")
    for check in report["checks"]:
        lines.append(f"  {MARKS[check['status']]:<5} {check['name']:<14} {check['detail']}")
    if report["fixes"]:
        lines.append("to install")
        lines += [f"  {fix['for']:<14} {fix['run']}" for fix in report["fixes"]]
    return "\n".join(lines)
