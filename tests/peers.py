"""Other Celery exporters the side-by-side tests run next to this one: the ONE place of their pins.

prometheus-exporter-celery (danihodovic/celery-exporter), the released version from PyPI, in a
virtualenv of its own (it pins its own Celery, Flask and prometheus-client), built once and
cached under ``~/.cache/celery-health-exporter-tests/`` like the old-Celery venv of
tests/celery_versions.py, keyed by the pin and the Python version (rebuilt when the cached
one no longer verifies).

Its wheel installs a package named ``src`` and no console script; its Docker image runs
``cli(auto_envvar_prefix="CE")``, which ``PEER_COMMAND`` does too.
"""
from __future__ import annotations

import fcntl
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.celery_versions import BUILD_TIMEOUT, CACHE

# The release, with the dependencies its image runs (poetry.lock of the tag v0.11.2): its wheel's
# ranges let pip take a kombu that needs a redis-py the wheel excludes, and not packaging, which
# kombu's Redis transport imports.
DANIHODOVIC = {"prometheus-exporter-celery": "0.11.2", "celery": "5.5.2", "kombu": "5.5.2", "redis": "5.2.1",
               "amqp": "5.3.1", "prometheus-client": "0.21.1", "packaging": "24.2"}
_RUN = "import sys; from src.cli import cli; sys.argv[0] = 'celery-exporter'; cli(auto_envvar_prefix='CE')"

_VERIFY = """
import json, sys
from importlib.metadata import version
from src.cli import cli
from src.exporter import Exporter
import kombu.transport.redis
json.dump({name: version(name) for name in sys.argv[1:]}, sys.stdout)
"""


def _key() -> str:
    pins = "-".join(f"{name}{version}" for name, version in list(DANIHODOVIC.items())[:1])
    return f"py{sys.version_info.major}.{sys.version_info.minor}-{pins}"


def _verify(python: Path) -> str | None:
    if not python.exists():
        return f"{python} does not exist"
    proc = subprocess.run([str(python), "-c", _VERIFY, *DANIHODOVIC], capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), timeout=120)
    if proc.returncode != 0:
        return f"imports fail in {python}:\n{proc.stderr.strip()[-3000:]}"
    found = json.loads(proc.stdout)
    return None if found == DANIHODOVIC else f"{python} has {found}, wanted {DANIHODOVIC}"


def _build(venv: Path, log: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        for args in ([sys.executable, "-m", "venv", str(venv)],
                     [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                      "--no-input", *(f"{name}=={version}" for name, version in DANIHODOVIC.items())]):
            out.write(f"$ {' '.join(args)}\n")
            out.flush()
            proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT,
                                  cwd=tempfile.gettempdir())
            if proc.returncode != 0:
                raise RuntimeError(f"building the {DANIHODOVIC} venv failed; see {log}:\n"
                                   + log.read_text(errors="replace")[-3000:])


@functools.cache
def danihodovic_python() -> str:
    """The python of a venv with the released prometheus-exporter-celery; built at most once per key."""
    venv = CACHE / f"peer-{_key()}"
    python = venv / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be building it right now
        if (venv / "built.json").exists() and _verify(python) is None:
            return str(python)
        _build(venv, CACHE / f"{venv.name}.log")
        problem = _verify(python)
        if problem:
            raise RuntimeError(f"the {DANIHODOVIC} venv is not what the pin says: {problem}")
        (venv / "built.json").write_text(json.dumps(DANIHODOVIC))
        return str(python)


def danihodovic_command() -> tuple[str, ...]:
    """The peer's command line up to its flags (run it from a neutral directory: cwd=tempfile.gettempdir())."""
    return (danihodovic_python(), "-c", _RUN)
