"""The host part of the model: Celery worker processes found on this host.

Pure Python, no I/O. The host agent (``celery_health_exporter/sources/host.py``) reads the
process table and hands a list of ``ProcessSample`` to ``HostState.apply_scan``;
everything that decides what a process is (main, pool child, orphan) lives
here so that it can be tested without processes.

Attached to ``ClusterState`` as ``state.hosts``; guarded by ``state.lock``
like the rest of the model.

What is an orphan
-----------------
A prefork pool child is forked from its worker's main process (same command
line). When the main dies and the child survives (Celery <= 5.2, or 5.3+ when
the parent-death signal did not fire), the kernel re-parents the child to init
or to a subreaper. A worker process is counted as an orphan when:

1. it was seen as a child of a worker process at an earlier scan and its
   parent now is not a worker process (certain: the agent watched it happen);
2. setproctitle shows a pool process (``[celeryd: node:ForkPoolWorker-1]``)
   whose parent is not a worker process;
3. it has no worker children while a worker main process of the same node,
   started after it, is alive (left behind by a restart);
4. it has no worker children, its process group leader is gone (a pool child
   keeps its main's process group), its pool forks children (not
   ``-P solo/threads/gevent/eventlet``) and it is older than ``orphan_grace``
   (a worker started with ``--detach`` also lives in a dead leader's group
   until its pool has started).

Descendants of an orphan are orphans too.

The numbers of a sample go through ``state.events``' readers: a process whose
create time is not a plausible Unix time is left out of the scan, a bad RSS
counts as 0 and a bad CPU time adds nothing this scan (each counted in
``celery_exporter_events_malformed_total{reason}``).
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from .events import BAD_TIMESTAMP, MAX_CLOCK_AHEAD, MAX_COUNT, Report, count, finite_number, ignore
from .events import duration as seconds

MAIN, CHILD, ORPHAN = "main", "child", "orphan"
ROLES = (MAIN, CHILD)
# Pools without forked children: their main process never has worker children.
NON_FORKING_POOLS = frozenset({"solo", "threads", "gevent", "eventlet"})
DEFAULT_ORPHAN_GRACE = 10.0

# celery's global options that take a value (celery/bin/celery.py)
_GLOBAL_VALUE_OPTIONS = frozenset({"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config",
                                   "--workdir"})
_TITLE = re.compile(r"^\[celeryd: (?P<inner>[^\]]+)\]")


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """What a worker process's command line says about it."""

    node: str  # the worker's node name, as Celery computes it (``-n w1@%h`` -> ``w1@myhost``)
    pool: str | None = None  # -P/--pool, None when not on the command line
    title_role: str | None = None  # MAIN or CHILD when setproctitle rewrote the command line


@dataclass(slots=True)
class ProcessSample:
    pid: int
    ppid: int
    pgid: int | None
    create_time: float
    command: WorkerCommand
    rss: int = 0
    cpu: float = 0.0  # user + system seconds of the process itself

    @property
    def key(self) -> tuple[int, float]:
        """(pid, create time): a pid reused by a later process is another process."""
        return (self.pid, self.create_time)


# ------------------------------------------------------------------ commands

def expand_node(value: str | None, host: str | None = None) -> str:
    """``-n`` value to node name the way ``celery worker`` does it:
    ``host_format(default_nodename(value))`` with %h, %n, %d expanded."""
    host = host or socket.gethostname()
    name, _, rest = (value or "").partition("@") if "@" in (value or "") else ("", "", value or "")
    node = f"{name or 'celery'}@{rest or host}"
    hname, _, domain = host.partition(".")
    out = []
    i = 0
    while i < len(node):  # celery's simple_format: %h %n %d %%, anything else kept as is
        ch = node[i]
        if ch == "%" and i + 1 < len(node) and node[i + 1] in "hnd%":
            out.append({"h": host, "n": hname, "d": domain, "%": "%"}[node[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _basename(token: str) -> str:
    return token.rsplit("/", 1)[-1]


def _celery_args(argv: list[str]) -> list[str] | None:
    """The arguments after the ``celery`` program, whichever way it was started:
    ``celery ...``, ``/venv/bin/celery ...``, ``python /venv/bin/celery ...``,
    ``python -m celery ...`` (interpreter options before ``-m`` allowed)."""
    for i, token in enumerate(argv[:6]):
        if token == "-m" and i + 1 < len(argv) and argv[i + 1] == "celery":
            return argv[i + 2:]
        if _basename(token) in ("celery", "celery.exe"):
            return argv[i + 1:]
        if i > 0 and not token.startswith("-"):
            return None  # a script of another program
    return None


def _subcommand(args: list[str]) -> tuple[str | None, list[str]]:
    i = 0
    while i < len(args):
        token = args[i]
        if token in _GLOBAL_VALUE_OPTIONS:
            i += 2
            continue
        if token.startswith("-"):
            i += 1
            continue
        return token, args[i + 1:]
    return None, []


def _option(args: list[str], short: str, long: str) -> str | None:
    value = None
    for i, token in enumerate(args):
        if token in (short, long):
            if i + 1 < len(args):
                value = args[i + 1]
        elif token.startswith(long + "="):
            value = token[len(long) + 1:]
        elif token.startswith(short) and len(token) > len(short) and not token.startswith("--"):
            value = token[len(short):]
    return value


def parse_worker_command(argv: list[str] | None, *, pattern: re.Pattern | None = None,
                         host: str | None = None) -> WorkerCommand | None:
    """A ``WorkerCommand`` when the command line is a Celery worker's, else None.

    Without ``pattern``: ``celery [global options] worker ...`` in any of its
    spellings, or a setproctitle title ``[celeryd: node:ProcessName]``. With
    ``pattern`` (``--host-worker-pattern``): the regex searched in the command
    line joined by spaces decides; node and pool are still read from it.
    """
    if not argv:
        return None
    joined = " ".join(argv)
    if pattern is not None and not pattern.search(joined):
        return None
    title = _TITLE.match(joined)
    if title:
        node, _, process_name = title.group("inner").rpartition(":")
        return WorkerCommand(node or expand_node(None, host), None, MAIN if process_name == "MainProcess" else CHILD)
    args = _celery_args(argv)
    if args is not None:
        subcommand, worker_args = _subcommand(args)
        if subcommand != "worker" and pattern is None:
            return None
    elif pattern is None:
        return None
    else:
        worker_args = argv[1:]
    return WorkerCommand(
        expand_node(_option(worker_args, "-n", "--hostname"), host),
        _option(worker_args, "-P", "--pool"),
    )


# ------------------------------------------------------------ classification

def classify(samples: list[ProcessSample], alive_pids, now: float, *, was_child=frozenset(),
             orphan_grace: float = DEFAULT_ORPHAN_GRACE) -> dict[int, str]:
    """pid -> MAIN | CHILD | ORPHAN for every sample (see the module doc).

    ``alive_pids``: every pid on the host (to know whether a process group
    leader still exists); ``was_child``: keys of processes seen earlier as
    children of a worker process.
    """
    by_pid = {s.pid: s for s in samples}
    kids: dict[int, list[int]] = {}
    for s in samples:
        if s.ppid in by_pid and s.ppid != s.pid and s.command.title_role != MAIN:
            kids.setdefault(s.ppid, []).append(s.pid)

    def is_root(s: ProcessSample) -> bool:
        return s.command.title_role == MAIN or s.ppid not in by_pid or s.ppid == s.pid

    roles: dict[int, str] = {}
    roots = [s for s in samples if is_root(s)]
    for s in roots:
        title = s.command.title_role
        if title == MAIN:
            roles[s.pid] = MAIN
        elif title == CHILD or s.key in was_child:
            roles[s.pid] = ORPHAN
        elif s.pid in kids:
            roles[s.pid] = MAIN
        elif (s.pgid is not None and s.pgid != s.pid and s.pgid not in alive_pids
              and (s.command.pool or "prefork") not in NON_FORKING_POOLS
              and now - s.create_time >= orphan_grace):
            roles[s.pid] = ORPHAN
        else:
            roles[s.pid] = MAIN
    # A childless "main" older than a main of the same node that has children
    # (or that setproctitle names MainProcess) was left behind by a restart.
    newest_main: dict[str, float] = {}
    for s in roots:
        if roles[s.pid] == MAIN and (s.pid in kids or s.command.title_role == MAIN):
            newest_main[s.command.node] = max(newest_main.get(s.command.node, 0.0), s.create_time)
    for s in roots:
        if (roles[s.pid] == MAIN and s.pid not in kids and s.command.title_role != MAIN
                and newest_main.get(s.command.node, 0.0) > s.create_time):
            roles[s.pid] = ORPHAN
    # Everything below a root takes the root's fate.
    stack = [(s.pid, roles[s.pid]) for s in roots]
    while stack:
        pid, root_role = stack.pop()
        for kid in kids.get(pid, ()):
            if kid not in roles:
                roles[kid] = ORPHAN if root_role == ORPHAN else CHILD
                stack.append((kid, root_role))
    for s in samples:  # a parent cycle (impossible on a real host) must not lose a process
        roles.setdefault(s.pid, ORPHAN)
    return roles


# --------------------------------------------------------------------- state

@dataclass(slots=True)
class _Known:
    node: str
    role: str
    cpu: float
    was_child: bool


@dataclass
class HostScan:
    """Gauges of the last scan."""

    processes: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, role) -> count
    rss: dict[tuple[str, str], int] = field(default_factory=dict)
    child_rss_min: dict[str, int] = field(default_factory=dict)
    child_rss_max: dict[str, int] = field(default_factory=dict)
    orphans: int = 0
    orphan_rss: int = 0
    orphan_pids: tuple = ()


class HostState:
    """What the host agent knows: the last scan's gauges and counters kept across scans."""

    def __init__(self, *, purge_after: float = 600.0, orphan_grace: float = DEFAULT_ORPHAN_GRACE,
                 report: Report = ignore):
        self.purge_after = purge_after
        self.report = report  # counts a refused number (ClusterState.count_malformed)
        self.orphan_grace = orphan_grace
        self.scans = 0
        self.last_scan_at: float | None = None
        self.scan_duration = 0.0
        self.scanned = 0  # processes looked at by the last scan
        self.last = HostScan()
        self.cpu_seconds: dict[tuple[str, str], float] = {}  # (node, role) -> counter
        self.child_spawns: dict[str, int] = {}  # node -> counter
        self.node_seen: dict[str, float] = {}
        self._known: dict[tuple[int, float], _Known] = {}

    def apply_scan(self, samples: list[ProcessSample], alive_pids, now: float, *, duration: float = 0.0,
                   scanned: int | None = None) -> HostScan:
        known = self._known
        report = self.report
        samples = [s for s in samples
                   if finite_number(s.create_time, 0.0, now + MAX_CLOCK_AHEAD, report, BAD_TIMESTAMP) is not None]
        was_child = {key for key, k in known.items() if k.was_child}
        roles = classify(samples, alive_pids, now, was_child=was_child, orphan_grace=self.orphan_grace)
        scan = HostScan()
        orphan_pids = []
        seen: dict[tuple[int, float], _Known] = {}
        for s in samples:
            role = roles[s.pid]
            node = s.command.node
            previous = known.get(s.key)
            rss = count(s.rss, report) or 0
            cpu = seconds(s.cpu, report, MAX_COUNT)  # seconds of all cores: may exceed wall time
            if cpu is None:
                cpu = previous.cpu if previous is not None else 0.0
            if role == ORPHAN:
                scan.orphans += 1
                scan.orphan_rss += rss
                orphan_pids.append(s.pid)
            else:
                self.node_seen[node] = now
                key = (node, role)
                scan.processes[key] = scan.processes.get(key, 0) + 1
                scan.rss[key] = scan.rss.get(key, 0) + rss
                delta = cpu - previous.cpu if previous is not None else cpu
                self.cpu_seconds[key] = self.cpu_seconds.get(key, 0.0) + max(0.0, delta)
                self.child_spawns.setdefault(node, 0)
                if role == CHILD:
                    scan.child_rss_min[node] = min(scan.child_rss_min.get(node, rss), rss)
                    scan.child_rss_max[node] = max(scan.child_rss_max.get(node, rss), rss)
                    if previous is None:
                        self.child_spawns[node] += 1
            seen[s.key] = _Known(node, role, cpu,
                                 role == CHILD or (previous is not None and previous.was_child))
        # Every live node has both roles, at 0 when it has no children (solo pool).
        for node, role in list(scan.processes):
            for other in ROLES:
                scan.processes.setdefault((node, other), 0)
                scan.rss.setdefault((node, other), 0)
                self.cpu_seconds.setdefault((node, other), 0.0)
        scan.orphan_pids = tuple(sorted(orphan_pids))
        self._known = seen  # processes gone are forgotten: memory follows the host
        self.last = scan
        self.scans += 1
        self.last_scan_at = now
        self.scan_duration = duration
        self.scanned = len(samples) if scanned is None else scanned
        self._purge(now)
        return scan

    def _purge(self, now: float) -> None:
        for node, seen_at in list(self.node_seen.items()):
            if now - seen_at > self.purge_after:
                del self.node_seen[node]
                self.child_spawns.pop(node, None)
                for role in ROLES:
                    self.cpu_seconds.pop((node, role), None)
