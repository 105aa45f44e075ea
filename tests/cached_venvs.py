"""Virtualenvs the tests build once and reuse across runs, under
``~/.cache/celery-health-exporter-tests/`` (or $CELERY_HEALTH_EXPORTER_TEST_CACHE): the oldest
supported Celery (tests/celery_versions.py) and the peer exporter (tests/peers.py).

Each is named by what it holds (its pins, the Python version, whatever else its owner puts
in the name), built under a file lock (another pytest process may be building the same one),
verified by a script that prints its installed versions as JSON, and rebuilt when the cached
one no longer verifies.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

CACHE = Path(os.environ.get("CELERY_HEALTH_EXPORTER_TEST_CACHE",
                            Path.home() / ".cache" / "celery-health-exporter-tests"))
BUILD_TIMEOUT = 600
UNUSED_FOR = 7 * 86400  # a venv of a name not used for a week is dropped


def _verify(python: Path, script: str, pins: dict) -> str | None:
    """None when the venv has exactly ``pins`` and ``script`` runs; else why not."""
    if not python.exists():
        return f"{python} does not exist"
    # from a neutral directory: what is installed, not the work tree
    proc = subprocess.run([str(python), "-c", script, *pins], capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), timeout=120)
    if proc.returncode != 0:
        return f"imports fail in {python}:\n{proc.stderr.strip()[-3000:]}"
    found = json.loads(proc.stdout)
    return None if found == pins else f"{python} has {found}, wanted exactly {pins}"


def _build(venv: Path, log: Path, what: str, install: Callable) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        def run(*args) -> None:
            out.write(f"$ {' '.join(map(str, args))}\n")
            out.flush()
            proc = subprocess.run([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT,
                                  timeout=BUILD_TIMEOUT, cwd=tempfile.gettempdir())
            if proc.returncode != 0:
                raise RuntimeError(f"building the {what} venv failed ({' '.join(map(str, args[:4]))}...); "
                                   f"see {log}:\n" + log.read_text(errors="replace")[-3000:])

        run(sys.executable, "-m", "venv", venv)
        install(run, venv / "bin" / "python")


def _prune(prefix: str, keep: Path) -> None:
    """Venvs of the same owner under other names (an older pyproject.toml, older pins) unused for a week."""
    for other in CACHE.glob(f"{prefix}*"):
        if other == keep or not other.is_dir():
            continue
        marker = other / "built.json"
        if time.time() - (marker if marker.exists() else other).stat().st_mtime > UNUSED_FOR:
            shutil.rmtree(other, ignore_errors=True)
            for suffix in (".lock", ".log"):
                (CACHE / f"{other.name}{suffix}").unlink(missing_ok=True)


def cached_python(prefix: str, name: str, what: str, pins: dict, verify_script: str, install: Callable) -> str:
    """The python of the venv ``prefix + name``, built with ``install(run, python)`` if the cached
    one is missing or does not verify. ``verify_script`` gets the pins' names as arguments and
    prints ``{name: version}`` as JSON."""
    venv = CACHE / f"{prefix}{name}"
    python = venv / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / "built.json").exists() and _verify(python, verify_script, pins) is None:
            (venv / "built.json").touch()  # in use: see _prune
            return str(python)
        _build(venv, CACHE / f"{venv.name}.log", what, install)
        problem = _verify(python, verify_script, pins)
        if problem:
            raise RuntimeError(f"the {what} venv is not what the pins say: {problem}")
        (venv / "built.json").write_text(json.dumps(pins))
        _prune(prefix, keep=venv)
        return str(python)
