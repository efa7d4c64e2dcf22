"""Documentation generated from the config docs must match the code."""

from __future__ import annotations

from avatarl.config_docs import env_example, markdown_table
from scripts.update_readme import END, START
from tests.helpers import REPO


def readme_settings_table() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index(START) + len(START):text.index(END)]


def test_readme_settings_table_is_current():
    assert readme_settings_table() == markdown_table(), "run `make docs` to regenerate the README table"


def test_env_example_is_current():
    committed = (REPO / ".env.example").read_text()
    assert committed == env_example(), "run `make docs` (avatarl config --env-example > .env.example)"
