"""Cost of one host-agent scan on a host with thousands of processes.

    python -m benchmarks.host_scan                    # 2,000 sleeping processes + 10 fake prefork workers
    python -m benchmarks.host_scan --processes 5000 --scans 30

Spawns ``--processes`` sleeping processes and ``--workers`` fake Celery workers
(a Python script named ``celery`` started as ``python .../celery -A bench
worker -n benchN@%h``, which forks ``--children`` pool-like children: the same
command line, parent and process group as a real prefork worker), then times:

- ``scan``: the psutil pass of ``HostSource.scan`` (command line of every
  process; ppid, create time, RSS, CPU, pgid of the worker processes only);
- ``model``: ``HostState.apply_scan`` (classification and counters);
- for reference, the same pass with ``psutil.process_iter(["cmdline"])``
  (``as_dict`` per process) and with plain ``/proc/<pid>/cmdline`` reads.

Prints the median and 95th percentile in milliseconds, the cost per process,
and the CPU share of one core at the default ``--host-scan-interval`` of 5 s.
Everything it started is killed at the end.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_health_exporter.sources.host import HostSource, _LiveLeaders  # noqa: E402
from celery_health_exporter.state.hosts import HostState, parse_worker_command  # noqa: E402

FAKE_WORKER = """\
import os, signal, sys, time
children = int(os.environ.get("BENCH_CHILDREN", "4"))
for _ in range(children):
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
signal.pause()
"""


def spawn(n_sleepers: int, n_workers: int, children: int, tmp: Path) -> list[subprocess.Popen]:
    script = tmp / "celery"
    script.write_text(FAKE_WORKER)
    procs = [subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL) for _ in range(n_sleepers)]
    for i in range(n_workers):
        procs.append(subprocess.Popen(
            [sys.executable, str(script), "-A", "bench", "worker", "-n", f"bench{i}@%h", "-c", str(children)],
            env={**os.environ, "BENCH_CHILDREN": str(children)}, start_new_session=True))
    return procs


def stop(procs: list[subprocess.Popen], workers: int) -> None:
    for proc in procs[len(procs) - workers:]:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the fake worker and its children
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def timed(fn, scans: int) -> list[float]:
    out = []
    for _ in range(scans):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def scan_with_as_dict():
    found = 0
    for proc in psutil.process_iter(["cmdline"], ad_value=None):
        if parse_worker_command(proc.info["cmdline"]) is not None:
            found += 1
    return found


def scan_raw_proc():
    found = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if parse_worker_command(argv) is not None:
            found += 1
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2000, help="sleeping processes to add to the host")
    parser.add_argument("--workers", type=int, default=10, help="fake prefork workers")
    parser.add_argument("--children", type=int, default=4, help="children per fake worker")
    parser.add_argument("--scans", type=int, default=20)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        procs = spawn(args.processes, args.workers, args.children, Path(tmp))
        try:
            time.sleep(1.0)
            config = SimpleNamespace(events=False, host_scan_interval=5.0, host_worker_pattern="")
            source = HostSource(config, SimpleNamespace(hosts=HostState()))
            first = timed(source.scan, 1)[0]  # psutil builds its process cache
            samples, pids = source.scan()
            state = HostState()
            results = {
                "scan (HostSource.scan, psutil)": timed(source.scan, args.scans),
                "model (HostState.apply_scan)": timed(
                    lambda: state.apply_scan(samples, _LiveLeaders(pids), time.time()), args.scans),
                "ref: process_iter(['cmdline'])": timed(scan_with_as_dict, args.scans),
                "ref: raw /proc/<pid>/cmdline": timed(scan_raw_proc, args.scans),
            }
            scan = state.last
            total = len(pids)
        finally:
            stop(procs, args.workers)

    workers = sum(n for (node, role), n in scan.processes.items() if node.startswith("bench"))
    print(f"host: {total} processes ({os.cpu_count()} CPUs), {len(samples)} Celery worker processes found "
          f"({workers} of the {args.workers * (args.children + 1)} fake ones)")
    print(f"first scan (cold psutil cache): {first:.1f} ms")
    print(f"{'':34} {'median ms':>10} {'p95 ms':>8} {'µs/process':>11} {'CPU at 5 s':>11}")
    for name, values in results.items():
        median = statistics.median(values)
        p95 = sorted(values)[int(0.95 * (len(values) - 1))]
        print(f"{name:34} {median:10.1f} {p95:8.1f} {median * 1000 / total:11.1f} {median / 5000:11.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
