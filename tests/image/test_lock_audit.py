"""The image's pinned dependencies (requirements.lock) against the advisory database, with pip-audit.

It asks PyPI's vulnerability service over the network, for every pin. A dependency pip-audit could
not look up is a failure, not a pass: an unreachable or partial advisory service proves nothing.
A vulnerability fails with its id and the fixed versions; update the lock
(deploy/dev/lock-requirements.sh, within pyproject's ranges) to take the fix.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.integration
LOCK = ROOT / "requirements.lock"


def pip_audit() -> list[str]:
    found = shutil.which("pip-audit") or str(Path(sys.executable).parent / "pip-audit")
    if not Path(found).is_file():
        pytest.fail("pip-audit not found: install the test extra (`pip install -e .[test]`)")
    return [found]


def test_the_lock_has_no_known_vulnerability(tmp_path):
    report = tmp_path / "audit.json"
    env = {**os.environ, "REQUESTS_CA_BUNDLE": os.environ.get("REQUESTS_CA_BUNDLE",
                                                              "/etc/ssl/certs/ca-certificates.crt")}
    proc = subprocess.run(
        [*pip_audit(), "--requirement", str(LOCK), "--require-hashes", "--disable-pip", "--no-deps",
         "--progress-spinner", "off", "--format", "json", "--output", str(report)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert report.exists() and report.stat().st_size, (
        f"pip-audit wrote no report (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    deps = json.loads(report.read_text())["dependencies"]
    pinned = sum(1 for line in LOCK.read_text().splitlines() if "==" in line and not line.startswith("#"))
    assert len(deps) == pinned, f"pip-audit read {len(deps)} dependencies, the lock pins {pinned}"

    skipped = [f"{d['name']}: {d['skip_reason']}" for d in deps if d.get("skip_reason")]
    assert not skipped, (
        f"the advisory service could not audit {len(skipped)} of {len(deps)} pins (unreachable or incomplete: "
        "this is NOT a pass; pip-audit asks https://pypi.org/pypi/NAME/VERSION/json, a 404 where only the "
        "package index is reachable):\n  " + "\n  ".join(skipped[:10]))
    vulnerable = [
        f"{d['name']}=={d['version']}: {v['id']} {'/'.join(v.get('aliases', []))} fixed in "
        f"{', '.join(v.get('fix_versions', [])) or 'no release yet'}"
        for d in deps for v in d.get("vulns", [])
    ]
    assert not vulnerable, "known vulnerabilities in requirements.lock:\n  " + "\n  ".join(vulnerable)
    assert proc.returncode == 0, proc.stderr
