"""Task publishing, counted in the publishing processes by the hook `celery_health_exporter.hooks.publisher` (docs/hooks.md)."""
from __future__ import annotations

from .definitions import counter, histogram


PUBLISHES = counter("publish", "Task publishes (send_task_message calls), successful or not, summed over the "
                    "publisher's processes.", "publisher")
RETRIES = counter("publish_retries", "Publish retries: calls of the retry policy's errback (kombu calls it on "
                  "each retry and on each failed reconnect).", "publisher")
FAILURES = counter("publish_failures", "Publishes that raised after their retries ran out, by exception class.",
                   "publisher", "exception")
EXCEEDED = counter("publish_retry_policy_exceeded", "Publishes that retried more often than their "
                   "task_publish_retry_policy allows (errback calls > max_retries + 1), counted while they retry.",
                   "publisher")
DURATION = histogram("publish_duration_seconds", "Duration of task publishes, retries included (buckets set in "
                     "the hook).", "publisher")
HOOK_ERRORS = counter("publish_hook_errors", "The hook's own failures by stage (ship = totals not sent, the broker "
                      "being unreachable; others = hook bugs, swallowed). Never raised into the application.",
                      "publisher", "stage")

DEFINITIONS = (PUBLISHES, RETRIES, FAILURES, EXCEEDED, DURATION, HOOK_ERRORS)


def collect(ctx):
    publishers = getattr(ctx.state, "publishers", None)
    if publishers is None:
        return
    for publisher, totals in publishers.totals().items():
        labels = (publisher,)
        yield PUBLISHES, labels, totals.publishes
        yield RETRIES, labels, totals.retries
        yield EXCEEDED, labels, totals.exceeded
        for exception, count in sorted(totals.failures.items()):
            yield FAILURES, (publisher, exception), count
        if totals.duration is not None:
            yield DURATION, labels, totals.duration
        for stage, count in sorted(totals.hook_errors.items()):
            yield HOOK_ERRORS, (publisher, stage), count
