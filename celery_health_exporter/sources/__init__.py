"""The data sources, each a module of its own that can be switched on or off.

``build_sources`` is the one place that decides which run, from the config.
"""
from __future__ import annotations


def build_sources(config, state, celery_app) -> list:
    sources = []
    if config.events:
        from .events import EventsSource

        sources.append(EventsSource(config, state, celery_app))
    if config.inspect_interval > 0:
        from .inspect import InspectSource

        sources.append(InspectSource(config, state, celery_app))
    if config.broker_poll:  # broker pollers: one module per broker family
        if config.broker_kind == "amqp":
            from .rabbitmq import RabbitMQSource as BrokerPoller
        else:
            from .redis_queues import RedisQueuesSource as BrokerPoller
        sources.append(BrokerPoller(config, state, celery_app))
    if config.host_metrics:  # host agent: worker processes of this host (psutil)
        from .host import HostSource

        sources.append(HostSource(config, state))
    # Further sources (remote control, broker pollers, host agent) register here,
    # one block each, guarded by their own flags.
    return sources
