"""The README is a contract: its commands and flags table must match the code and CI."""
import re
from pathlib import Path

from celery_health_exporter.cli import flags_markdown

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_flags_table_matches_the_cli():
    table = README.split("<!-- flags:start -->")[1].split("<!-- flags:end -->")[0].strip()
    assert table == flags_markdown(), "README flags table is stale: regenerate it from celery_health_exporter.cli.flags_markdown()"


def test_ci_runs_exactly_the_test_command_of_the_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r'^TEST_COMMAND="([^"]+)"', ci, re.M).group(1)
    assert f"`{command}`" in README
    assert "$TEST_COMMAND" in ci


def test_readme_starts_with_the_two_commands():
    blocks = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    assert blocks[:2] == ["pip install '.[demo]' && celery-health-exporter demo", "bash .ci/run"]
