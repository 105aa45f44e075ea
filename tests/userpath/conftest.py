"""Fresh virtual environments with the project installed the way a user installs it.

`pip install <checkout>` (or `<checkout>[extra]`) into a new venv made with the stdlib
`venv` module, nothing else: what the test suite's own interpreter happens to have
(it has the test extras) proves nothing about a clean install.
"""
from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class UserVenv:
    def __init__(self, path: Path):
        self.path = path
        self.python = str(path / "bin" / "python")
        self.bin = path / "bin"

    def run(self, *args: str, env: dict | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(env), capture_output=True, text=True, timeout=timeout,
                              **kwargs)

    def env(self, extra: dict | None = None) -> dict:
        """The environment a user's shell would have with this venv activated: no
        PYTHONPATH into our checkout, the venv first on PATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        env.update(extra or {})
        return env

    def imports(self, module: str) -> bool:
        return self.run(self.python, "-c", f"import {module}").returncode == 0


def make_user_venv(path: Path, requirement: str) -> UserVenv:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    user = UserVenv(path)
    # Installed from a copy-free path argument exactly like the README's `pip install .`.
    result = user.run(user.python, "-m", "pip", "install", "--disable-pip-version-check", "-q", requirement,
                      timeout=600, cwd=str(ROOT))
    if result.returncode != 0:
        pytest.fail(f"pip install {requirement} failed in a fresh venv:\n{result.stdout}\n{result.stderr}")
    return user


@pytest.fixture(scope="session")
def user_venv(tmp_path_factory) -> UserVenv:
    """`pip install .` and nothing else."""
    return make_user_venv(tmp_path_factory.mktemp("user-venv") / "venv", ".")


@pytest.fixture(scope="session")
def demo_venv(tmp_path_factory) -> UserVenv:
    """`pip install '.[demo]'`, the README's first command."""
    return make_user_venv(tmp_path_factory.mktemp("demo-venv") / "venv", ".[demo]")
