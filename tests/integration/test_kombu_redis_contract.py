"""The kombu and redis-py internals the events source's Redis path relies on, checked on a
live Redis exactly as ``EventsSource._consume_redis`` uses them: the channel's subscription
topic(s) of a fanout queue (``_get_subscribe_topics`` since kombu 5.6, ``_get_subscribe_topic``
before), its pub/sub client (``subclient``) and that client's socket (``connection._sock``),
which the read-ahead thread reads raw. pyproject.toml bounds kombu and redis to releases
these passed on; when one changes, the failure names the attribute."""
from __future__ import annotations

import socket

import kombu
import pytest
import redis
from celery import Celery
from celery.events.event import get_exchange

from celery_health_exporter.sources.redis_wire import PubSubParser

pytestmark = pytest.mark.integration
WHO = f"kombu {kombu.__version__}, redis-py {redis.__version__}"


def test_the_events_source_reads_the_subscription_socket_kombu_opens(redis_broker):
    app = Celery("contract", broker=redis_broker.url, set_as_current=False)
    with app.connection_for_read() as connection:
        channel = connection.channel()
        exchange = get_exchange(connection, name=app.conf.event_exchange)  # fanout on Redis, as for the source
        queue = kombu.Queue("celeryev.contract", exchange=exchange, routing_key="#", auto_delete=True)(channel)
        queue.declare()
        if hasattr(channel, "_get_subscribe_topics"):
            topics = channel._get_subscribe_topics(queue.name)
        else:
            assert hasattr(channel, "_get_subscribe_topic"), f"{WHO}: Channel._get_subscribe_topic(s) is gone"
            topics = [channel._get_subscribe_topic(queue.name)]
        assert topics and all(isinstance(t, (str, bytes)) for t in topics), f"{WHO}: subscribe topics {topics!r}"
        pubsub = getattr(channel, "subclient", None)
        assert pubsub is not None and hasattr(pubsub, "psubscribe"), f"{WHO}: Channel.subclient is not a PubSub"
        pubsub.psubscribe(*topics)
        sock = getattr(pubsub.connection, "_sock", None)
        assert isinstance(sock, socket.socket), f"{WHO}: PubSub.connection._sock is {sock!r}, not a socket"

        # what the events source then does: read the raw socket, parse with our reader
        publisher = redis.Redis.from_url(redis_broker.url)
        topic = topics[0].decode() if isinstance(topics[0], bytes) else topics[0]
        channel_name = topic.replace("*", "worker.heartbeat")
        received, parser = [], PubSubParser()
        sock.settimeout(5)
        publisher.publish(channel_name, b'{"body": "e30=", "content-type": "application/json"}')
        while not received:
            received.extend(parser.feed(sock.recv(65536)))
        assert received == [b'{"body": "e30=", "content-type": "application/json"}']
        publisher.close()
