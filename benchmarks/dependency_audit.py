"""Dependency audit: pip-audit over the packages installed in this environment, summarised.

    python -m benchmarks.dependency_audit --out-json audit.json

Runs ``pip-audit`` (PyPI's vulnerability data) on the environment of this interpreter, the one
the service runs in, leaving out the project itself (installed editable, not on PyPI). The
summary counts the packages audited, those the service could not answer for (with the reason),
and every known vulnerability with its fixed versions. A vulnerability is a failure (exit code
1); an unreachable vulnerability service, or packages it does not know, are reported and are not
a failure — the audit then proves nothing about them, and the summary says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AUDIT_TIMEOUT_S = 600


@dataclass
class AuditSummary:
    """What pip-audit found, or why it could not run."""

    ran: bool
    packages: int = 0
    audited: int = 0
    not_audited: int = 0
    not_audited_reasons: dict[str, int] = field(default_factory=dict)
    vulnerabilities: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    started: str = ""
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """No known vulnerability in what could be audited."""
        return not self.vulnerabilities

    @property
    def conclusive(self) -> bool:
        """Every package was audited (nothing unknown, the service reachable)."""
        return self.ran and self.not_audited == 0 and self.packages > 0

    def describe(self) -> str:
        if not self.ran:
            return f"pip-audit could not run: {self.error}"
        found = (
            "so it proves nothing"
            if self.audited == 0
            else "no known vulnerability"
            if self.clean
            else f"{len(self.vulnerabilities)} known vulnerabilities: "
            + ", ".join(f"{v['name']} {v['version']} {v['id']}" for v in self.vulnerabilities)
        )
        text = f"pip-audit: {self.audited} of {self.packages} packages audited, {found}"
        if self.not_audited:
            reasons = "; ".join(f"{n} × {r}" for r, n in self.not_audited_reasons.items())
            text += f"; {self.not_audited} could not be audited ({reasons})"
        return text + "."


def _reason(skip_reason: str) -> str:
    """A skip reason without the package's own name, so that equal reasons add up."""
    return skip_reason.split(":", 1)[0].strip()


def summarise(document: dict[str, Any]) -> AuditSummary:
    """The summary of pip-audit's JSON output."""
    dependencies = document.get("dependencies", [])
    summary = AuditSummary(ran=True, packages=len(dependencies))
    reasons: Counter[str] = Counter()
    for dependency in dependencies:
        if "skip_reason" in dependency:
            if dependency["skip_reason"] != "distribution marked as editable":
                reasons[_reason(dependency["skip_reason"])] += 1
            else:
                summary.packages -= 1  # the project itself
            continue
        summary.audited += 1
        for vulnerability in dependency.get("vulns", []):
            summary.vulnerabilities.append(
                {
                    "name": dependency["name"],
                    "version": dependency.get("version"),
                    "id": vulnerability.get("id"),
                    "aliases": vulnerability.get("aliases", []),
                    "fix_versions": vulnerability.get("fix_versions", []),
                }
            )
    summary.not_audited = sum(reasons.values())
    summary.not_audited_reasons = dict(reasons)
    return summary


def run_audit(timeout_s: float = AUDIT_TIMEOUT_S) -> AuditSummary:
    """Run pip-audit on this interpreter's environment and summarise it; never raises."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    begin = time.perf_counter()
    command = [
        sys.executable,
        *("-m", "pip_audit", "--skip-editable", "--progress-spinner", "off"),
        *("--format", "json"),
    ]
    try:
        result = subprocess.run(  # noqa: S603 (a fixed command, no shell)
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        summary = AuditSummary(ran=False, error=f"{type(exc).__name__}: {exc}")
    else:
        try:
            summary = summarise(json.loads(result.stdout))
        except ValueError:
            lines = (result.stderr or result.stdout).strip().splitlines()
            summary = AuditSummary(
                ran=False,
                error=f"exit code {result.returncode}: {lines[-1] if lines else 'no output'}",
            )
    summary.started = started
    summary.seconds = round(time.perf_counter() - begin, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args(argv)
    summary = run_audit()
    if args.out_json is not None:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        report = {**asdict(summary), "clean": summary.clean, "conclusive": summary.conclusive}
        args.out_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(summary.describe() + "\n")
    return 0 if summary.clean else 1


if __name__ == "__main__":
    sys.exit(main())
