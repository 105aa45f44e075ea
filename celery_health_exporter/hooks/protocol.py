"""What the hooks and the exporter agree on: command, config key and event names.

Kept apart from the hook modules so that the exporter can read them without
importing (and so activating) a hook in its own process.
"""

# worker hook: the custom inspect command it answers, and the conf key that tells
# the exporter (through `inspect conf`) that a worker answers it
WORKER_HOOK_COMMAND = "celery_health"
WORKER_HOOK_CONF_KEY = "celery_health_hook"

# publisher hook: the event it sends on the Celery event exchange, and its format version
PUBLISHER_EVENT_TYPE = "exporter-publisher-stats"
PUBLISHER_EVENT_FORMAT = 1

# worker hook: the event its main process sends when it stops on an unrecoverable error
WORKER_UNRECOVERABLE_EVENT = "exporter-worker-unrecoverable"

# beat hook: its events on the Celery event exchange (routing keys exporter.beat.*), and their format version
BEAT_EVENT_TYPE = "exporter-beat"  # liveness and the schedule, every interval
BEAT_SENT_EVENT_TYPE = "exporter-beat-sent"  # the sends beat made, shipped at once
BEAT_OFFLINE_EVENT_TYPE = "exporter-beat-offline"  # a beat that stops cleanly
BEAT_EVENT_FORMAT = 1
