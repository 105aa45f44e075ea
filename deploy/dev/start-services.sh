#!/usr/bin/env bash
# Start the local RabbitMQ (with its management API) and Redis the tests and the demo use.
# Idempotent: what already runs is left alone. Needs root (Debian packages rabbitmq-server, redis-server).
set -euo pipefail

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "start-services: starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
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
echo "start-services: RabbitMQ (5672, management 15672) and Redis (6379) are up"
