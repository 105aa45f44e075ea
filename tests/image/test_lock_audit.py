"""The image's pinned dependencies (requirements.lock) against PyPI's advisory data.

PyPI publishes the known vulnerabilities of a project's releases in its JSON API. pip-audit asks
the per-release address (https://pypi.org/pypi/NAME/VERSION/json), which the package-index access
of this CI answers with 404 for every release, and osv.dev is not reachable from it: pip-audit
audits nothing here. The per-project address (https://pypi.org/pypi/NAME/json) does answer; its
`vulnerabilities` are those of the project's newest release. So every pin that is the newest
release is audited for real, and any vulnerability fails the test with its id and fixed versions;
a pin that is not the newest cannot be checked here and is listed in a warning (regenerate the lock
with deploy/dev/lock-requirements.sh to take the newest releases within pyproject's ranges). When
PyPI answers nothing at all, the test is skipped with the reason: it proves nothing then.
"""
from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
import warnings

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.integration
LOCK = ROOT / "requirements.lock"
PROJECT_JSON = "https://pypi.org/pypi/{name}/json"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def pins() -> dict[str, str]:
    found = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", LOCK.read_text(), re.M))
    assert found, f"no pins in {LOCK}"
    return found


def project(name: str, context: ssl.SSLContext) -> dict | None:
    try:
        with urllib.request.urlopen(PROJECT_JSON.format(name=name), timeout=20, context=context) as response:
            return json.load(response)
    except (urllib.error.URLError, TimeoutError, ValueError):
        return None


def test_the_locks_newest_pins_have_no_known_vulnerability():
    context = ssl.create_default_context(cafile=CA_BUNDLE)
    audited, stale, unanswered, vulnerable = [], [], [], []
    for name, version in sorted(pins().items()):
        data = project(name, context)
        if data is None:
            unanswered.append(name)
            continue
        newest = data["info"]["version"]
        if version != newest:
            stale.append(f"{name}=={version} (newest {newest})")
            continue
        audited.append(name)
        for vuln in data.get("vulnerabilities") or []:
            if not vuln.get("withdrawn"):
                vulnerable.append(f"{name}=={version}: {vuln.get('id')} {'/'.join(vuln.get('aliases') or [])} "
                                  f"fixed in {', '.join(vuln.get('fixed_in') or []) or 'no release yet'}")
    if not audited:
        pytest.skip(f"PyPI's JSON API answered for none of the {len(unanswered) + len(stale)} pins: not audited")
    assert not vulnerable, "known vulnerabilities in requirements.lock:\n  " + "\n  ".join(vulnerable)
    if stale or unanswered:
        warnings.warn(f"requirements.lock: {len(audited)} pins audited; not audited here: "
                      f"{', '.join(stale + [f'{n} (no answer)' for n in unanswered])}", UserWarning)
    print(f"audited {len(audited)} of {len(pins())} pins")
