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


def test_readme_and_env_example_state_the_precedence_config_sources_applies():
    """The order is written in three places for people; test_config.py checks the one the code applies."""
    stated = "process environment > command-line flags > .env > --preset > defaults"
    readme = " ".join((REPO / "README.md").read_text().replace("`", "").replace("*", "").split())
    assert f"highest first: {stated}" in readme
    assert f"#   {stated}\n" in env_example()
    import avatarl.config_sources

    assert "process environment  >  command-line flags  >  .env file  >  --preset NAME  >  defaults" in \
        avatarl.config_sources.__doc__
