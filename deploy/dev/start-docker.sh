#!/usr/bin/env bash
# Start a Docker engine of our own for the image tests, unless one already answers.
#
#   eval "$(bash deploy/dev/start-docker.sh)"   # prints: export DOCKER_HOST=unix://...
#
# Idempotent: a daemon that answers on $DOCKER_HOST (when set) or on our own socket is
# reused. Ours keeps everything under $CHE_DOCKER_ROOT (default /tmp/celery-health-exporter-docker):
# data root, exec root, socket, pidfile and the log (dockerd.log). Needs root and Debian's
# docker.io (dockerd, containerd, runc). Bridge networking works on this machine (dockerd sets
# up docker0 and the NAT rules with iptables itself); the tests still run containers with
# --network host, so that they reach the brokers on 127.0.0.1.
# Stops with one line on stderr and exit code 1 when no engine can start.
set -euo pipefail

root="${CHE_DOCKER_ROOT:-/tmp/celery-health-exporter-docker}"
sock="unix://$root/docker.sock"
log="$root/dockerd.log"
timeout_s="${CHE_DOCKER_START_TIMEOUT:-60}"

fail() { echo "start-docker: $*" >&2; exit 1; }
answers() { DOCKER_HOST="$1" timeout 10 docker info >/dev/null 2>&1; }

command -v docker >/dev/null || fail "no docker client on PATH (apt-get install docker.io)"

if [ -n "${DOCKER_HOST:-}" ] && answers "$DOCKER_HOST"; then
  echo "export DOCKER_HOST=$DOCKER_HOST"
  exit 0
fi
if answers "$sock"; then
  echo "export DOCKER_HOST=$sock"
  exit 0
fi

command -v dockerd >/dev/null || fail "no dockerd on PATH (apt-get install docker.io)"
[ "$(id -u)" = 0 ] || fail "dockerd needs root"
mkdir -p "$root/data" "$root/exec"

# A pidfile left by a daemon that died (or that hangs without answering) stops a new one.
if [ -s "$root/dockerd.pid" ]; then
  old="$(cat "$root/dockerd.pid")"
  if kill -0 "$old" 2>/dev/null && [ "$(cat "/proc/$old/comm" 2>/dev/null)" = dockerd ]; then
    echo "start-docker: dockerd $old does not answer on $sock; stopping it" >&2
    kill "$old" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$root/dockerd.pid"
fi

echo "start-docker: starting dockerd (data root $root/data, log $log)" >&2
# setsid: the daemon outlives the shell (and the pytest session) that started it.
setsid dockerd \
  --data-root "$root/data" \
  --exec-root "$root/exec" \
  --pidfile "$root/dockerd.pid" \
  --host "$sock" \
  >>"$log" 2>&1 </dev/null &
pid=$!

deadline=$((SECONDS + timeout_s))
until answers "$sock"; do
  if ! kill -0 "$pid" 2>/dev/null; then
    why="$(grep -E 'level=(error|fatal)|failed to start' "$log" | tail -n 1 | cut -c1-300 || true)"
    fail "dockerd exited during startup: ${why:-$(tail -n 1 "$log" | cut -c1-300)}"
  fi
  [ "$SECONDS" -lt "$deadline" ] || fail "dockerd did not answer on $sock within ${timeout_s}s (see $log)"
  sleep 0.2
done
echo "export DOCKER_HOST=$sock"
