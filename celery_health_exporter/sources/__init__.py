"""The data sources, each a module of its own that can be switched on or off.

``source_classes`` is the one place that decides which run, from the config; it
imports their modules, so that a missing dependency of any of them shows at start
(see ``broker.check_dependencies``), not as a source that is down for ever.
"""
from __future__ import annotations


def source_classes(config) -> list[type]:
    classes = []
    if config.events:
        from .events import EventsSource

        classes.append(EventsSource)
    if config.inspect_interval > 0:
        from .inspect import InspectSource

        classes.append(InspectSource)
    if config.broker_poll:  # broker pollers: one module per broker family
        if config.broker_kind == "amqp":
            from .rabbitmq import RabbitMQSource as BrokerPoller
        else:
            from .redis_queues import RedisQueuesSource as BrokerPoller
        classes.append(BrokerPoller)
    if config.host_metrics:  # host agent: worker processes of this host (psutil)
        from .host import HostSource

        classes.append(HostSource)
    return classes


def build_sources(config, state, celery_app) -> list:
    return [cls(config, state, celery_app) for cls in source_classes(config)]
