#!/usr/bin/env bash
# Regenerate requirements.lock, the image's pinned and hashed Python dependencies:
# pyproject.toml's [project] dependencies and its [build-system] requires (the Dockerfile
# builds the project without build isolation, from the pinned setuptools and wheel),
# resolved for the image: CPython 3.11 on x86_64 glibc (Debian bookworm) Linux.
#
#   pip install uv && bash deploy/dev/lock-requirements.sh
#
# Run it after every change of those requirements (tests/deploy/test_dockerfile.py fails
# until the lock matches pyproject.toml again), and to take newer releases, e.g. for a fix
# that pip-audit (tests/image/test_lock_audit.py) asks for. Needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v uv >/dev/null || { echo "lock-requirements: needs uv (pip install uv)" >&2; exit 1; }
python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
  | uv pip compile pyproject.toml - \
      --generate-hashes \
      --python-version 3.11 \
      --python-platform x86_64-manylinux_2_28 \
      --custom-compile-command "bash deploy/dev/lock-requirements.sh" \
      --quiet \
      --output-file requirements.lock
