"""Session fixtures of the image tests: one engine, one build, containers removed at the end."""
from tests.image.docker import docker, image  # noqa: F401
