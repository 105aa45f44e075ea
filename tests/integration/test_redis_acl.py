"""A Redis ACL user allowed only what the exporter uses (the list of docs/brokers.md, derived from
the code and from MONITOR): on a redis-server of the test's own, with a real worker, everything
works and Redis's ACL LOG stays empty; without one command, the exporter names it in one log line
and on the status page or /readyz.
"""
import html
import json

import pytest

from tests.apps.brokerapp import client
from tests.harness import HOST, wait_for
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.integration

DB = 3
FAST = ("--broker-poll-interval", "1", "--inspect-interval", "1", "--queues", "acl-hole")


def exporter_acl(db: int = DB, prefix: str = "") -> list[str]:
    """The exporter's ACL rules, as docs/brokers.md gives them (kombu 5.7, redis-py 8)."""
    return [
        "resetkeys", "resetchannels", "-@all",
        # connecting: redis-py's handshake, kombu's PING when it opens a channel
        "+hello", "+auth", "+select", "+ping",
        # queue poller: bindings, lengths, unacked (read only)
        "+scan", "+smembers", "+llen", "+hlen", "+hscan", "+hmget", "+zscore", "+zrange",
        # events: kombu declares the exporter's binding (SADD and a Lua script that refreshes its
        # deadline), then the subscription; the binding and its keys are deleted at exit
        "+sadd", "+srem", "+del", "+multi", "+exec", "+evalsha", "+eval", "+script|load", "+script|exists",
        "+time", "+zadd", "+zrem", "+zrangebyscore", "+exists",
        "+psubscribe", "+punsubscribe",
        # remote control: publish on the pidbox exchange, replies popped from a queue of our own,
        # kombu's unacked_mutex (SET NX, released by a Lua GET + DEL)
        "+publish", "+brpop", "+set", "+get",
        f"%R~{prefix}*",
        f"~{prefix}_kombu.binding*", f"~{prefix}celeryev.celery-health-exporter.*",
        f"~{prefix}*.reply.celery.pidbox*", f"~{prefix}unacked_mutex",
        f"&{prefix}/{db}.celeryev/*", f"&{prefix}/{db}.celery.pidbox*",
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis-acl"), []).start()
    yield s
    s.stop()


def add_user(server, name: str, password: str, *, without: str = "", db: int = DB, prefix: str = "") -> str:
    rules = [r for r in exporter_acl(db, prefix) if r != f"+{without}"]
    with server.client() as admin:
        admin.acl_deluser(name)
        admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", *rules)
    return f"redis://{name}:{password}@127.0.0.1:{server.port}/{db}"


@pytest.mark.parametrize("prefix, db", [("", DB), ("app1:", DB + 1)])
def test_an_acl_user_with_only_the_documented_commands_is_enough(server, make_exporter, make_worker, prefix, db):
    admin = server.client(db=db)
    admin.acl_log_reset()
    options = {"global_keyprefix": prefix} if prefix else {}
    worker_url = f"redis://127.0.0.1:{server.port}/{db}"  # the workers keep their full user
    make_worker(worker_url, "acl", queues="celery", app="tests.apps.brokerapp",
                env={"TEST_TRANSPORT_OPTIONS": json.dumps(options)})
    publisher = client(worker_url, options)
    # A message delivered and never acked, older than the exporter's visibility timeout: kombu would
    # have the exporter's remote-control connection push it back into its queue (writes the ACL
    # refuses and a monitor must not do).
    publisher.send_task("brokers.hold")
    wait_for(lambda: admin.hlen(f"{prefix}unacked") == 1, 20, message="a message held unacked")
    password = "acl-exporter-pw"
    exporter = make_exporter(add_user(server, f"exporter-{db}", password, db=db, prefix=prefix), *FAST,
                             "--broker-transport-option", "visibility_timeout=1",
                             *(["--broker-transport-option", f"global_keyprefix={prefix}"] if prefix else []))
    for _ in range(3):
        publisher.send_task("brokers.noop")
        publisher.send_task("brokers.noop", queue="acl-hole")

    def works():
        m = exporter.scrape()
        return (m.value("celery_task_succeeded_total", name="brokers.noop", hostname=f"acl@{HOST}",
                        queue_name="celery") == 3
                and m.value("celery_queue_length", queue_name="acl-hole") == 3
                and m.value("celery_queue_unacked", queue_name="celery") == 1
                and m.value("celery_active_consumer_count", queue_name="celery") == 1
                and {labels["source"]: v for labels, v in m.find("celery_exporter_source_up")} == {
                    "events": 1, "inspect": 1, "redis": 1})

    wait_for(works, 40, message="events, queue polls and remote control with the ACL user")
    # one more whole remote-control poll, its waits for replies each a chance for kombu to restore
    # the held message
    polled = exporter.scrape().value("celery_exporter_source_last_success_timestamp_seconds", source="inspect")
    wait_for(lambda: exporter.scrape().value("celery_exporter_source_last_success_timestamp_seconds",
                                             source="inspect") > polled, 30, message="one more remote-control poll")
    # Redis logs every command or key an ACL user was refused: none.
    assert admin.acl_log() == [], admin.acl_log()
    assert admin.hlen(f"{prefix}unacked") == 1 and admin.llen(f"{prefix}celery") == 0  # held, not re-delivered
    assert "NOPERM" not in exporter.log() and password not in exporter.log()


@pytest.mark.parametrize("without, where", [("scan", "/"), ("psubscribe", "/readyz")])
def test_a_missing_command_is_named(server, make_exporter, without, where):
    exporter = make_exporter(add_user(server, f"no-{without}", "pw-" + without, without=without), *FAST,
                             wait=False)

    def named():
        page = html.unescape(exporter.get(where)[1])
        return page if f"'{without}'" in page and "no permissions" in page else None

    page = wait_for(named, 30, message=f"the missing {without} named on {where}")
    if where == "/readyz":
        assert exporter.get("/readyz")[0] == 503
        assert len(page.strip().splitlines()) == 1, page
    # one line per source that needs the command, however many retries
    wait_for(lambda: exporter.get("/readyz")[1] != "starting", 10, message="a first attempt")
    lines = [line for line in exporter.log().splitlines() if f"'{without}'" in line]
    assert len(lines) == 1 and ": down: " in lines[0] and "docs/brokers.md" in lines[0], exporter.log()
    assert "Traceback" not in exporter.log()
