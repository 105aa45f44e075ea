"""celery-health-exporter: a Prometheus exporter that shows how Celery clusters fail."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("celery-health-exporter")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0.0.0+unknown"
