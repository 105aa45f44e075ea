"""The beat tests' app with django-celery-beat's DatabaseScheduler on PostgreSQL.

``celery -A tests.apps.beatdjango beat -S django_celery_beat.schedulers:DatabaseScheduler``:
the schedule lives in the database TEST_DATABASE_NAME (127.0.0.1:5432, user postgres,
trust auth); the app, its tasks, its ``beat_schedule`` (which the DatabaseScheduler
copies into the database) and the beat hook are tests.apps.beatapp's.
"""
import os

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": os.environ["TEST_DATABASE_NAME"],
                               "USER": "postgres", "HOST": "127.0.0.1", "PORT": "5432"}},
        INSTALLED_APPS=["django_celery_beat"],
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()

from tests.apps.beatapp import app  # noqa: E402,F401  (the app celery -A finds here)


def migrate_and_add(entry: str, task: str, every_seconds: int) -> None:
    """Create the tables and one entry that exists only in the database."""
    from django.core.management import call_command
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    call_command("migrate", verbosity=0)
    interval, _ = IntervalSchedule.objects.get_or_create(every=every_seconds, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name=entry, task=task, interval=interval)


if __name__ == "__main__":
    import sys

    migrate_and_add(sys.argv[1], sys.argv[2], int(sys.argv[3]))
