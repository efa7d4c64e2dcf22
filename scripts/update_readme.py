"""Replace the settings table between the README markers with the one generated from the config."""

from pathlib import Path

from avatarl.config_docs import markdown_table

START, END = "<!-- settings:start -->\n", "<!-- settings:end -->"


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + markdown_table() + END + tail)


if __name__ == "__main__":
    main()
