"""Where settings come from, and in which order they win: the process environment, a `.env` file,
command-line flags, a named preset (avatarl/presets/NAME.env), then the defaults of `Config`.

    process environment  >  .env file  >  command-line flags  >  --preset NAME  >  defaults

(the seed's documented order: a deployment's environment always wins over a developer's flags).
Every problem found while reading them becomes one line of a ConfigError.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from avatarl.config import LAUNCHER_NAMES, Config, ConfigError, config_fields

TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}

SOURCE_DEFAULT, SOURCE_PRESET, SOURCE_CLI, SOURCE_DOTENV, SOURCE_ENV = "default", "preset", "cli", ".env", "env"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # NAME.env files, shipped with the package


def parse_value(f: Any, raw: str) -> Any:
    """Turn the text of one variable into the field's type, or raise ValueError with the reason."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    text = raw.strip()
    if kind == "bool":
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ValueError("expected a boolean: true/false/1/0/yes/no")
    if kind == "int":
        try:
            number = float(text)
        except ValueError:
            raise ValueError("expected an integer") from None
        if not number.is_integer():
            raise ValueError("expected an integer")
        return int(number)
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    return text


def default_of(f: Any) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def read_dotenv(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {key: value or "" for key, value in dotenv_values(path).items()}


def dotenv_path(env_file: str | os.PathLike | None) -> Path:
    """The .env file a command reads: `--env-file` when given, else ./.env."""
    return Path(env_file) if env_file is not None else Path(".env")


def dotenv_values_if_present(env_file: str | os.PathLike | None) -> dict[str, str]:
    """The values of dotenv_path(env_file), or none when that file does not exist."""
    path = dotenv_path(env_file)
    return read_dotenv(path) if path.is_file() else {}


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.env"))


def preset_settings(name: str) -> dict[str, str]:
    """The NAME=value lines of avatarl/presets/NAME.env, as text; ConfigError naming the presets there are."""
    path = PRESETS_DIR / f"{name}.env"
    if not path.is_file():
        raise ConfigError([f"--preset {name}: no such preset; choose one of {', '.join(preset_names())}."])
    return read_dotenv(path)


def preset_values(name: str) -> dict[str, Any]:
    """A preset's settings as typed Config field values, e.g. for dataclasses.replace."""
    known = config_fields()
    return {known[key].name: parse_value(known[key], value) for key, value in preset_settings(name).items()}


def unknown_keys(where: str, keys: Iterable[str]) -> list[str]:
    """One problem per key that is neither a setting nor a launcher variable, with a "did you mean"."""
    known = config_fields()
    problems = []
    for key in keys:
        if key not in known and key not in LAUNCHER_NAMES:
            close = difflib.get_close_matches(key, list(known) + sorted(LAUNCHER_NAMES), n=1)
            hint = f" Did you mean {close[0]}?" if close else " See `avatarl config --env-example`."
            problems.append(f"{where}: {key} is not a setting.{hint}")
    return problems


def load_config(cli: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None, preset: str | None = None
                ) -> tuple[Config, dict[str, str]]:
    """Resolve every setting with its source. Returns (config, {VAR: source}).

    `cli` maps UPPER_SNAKE names to the raw text of flags. `env_file` None means `./.env` when present;
    `preset` names a file of avatarl/presets/ whose values replace the defaults.
    Raises ConfigError listing every problem, one per line.
    """
    environ = os.environ if environ is None else environ
    known = config_fields()
    problems: list[str] = []
    path = dotenv_path(env_file)
    if env_file is not None and not path.is_file():
        problems.append(f"--env-file {path}: no such file.")
    dotenv = dotenv_values_if_present(env_file)
    problems += unknown_keys(str(path), dotenv)
    presets = preset_settings(preset) if preset else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = ((SOURCE_ENV, environ), (SOURCE_DOTENV, dotenv), (SOURCE_CLI, cli or {}), (SOURCE_PRESET, presets))
    for name, f in known.items():
        for source, layer in layers:
            if name in layer:
                try:
                    values[f.name] = parse_value(f, layer[name])
                except ValueError as err:
                    problems.append(f"{name}={layer[name]!r} ({source}) is invalid: {err}.")
                sources[name] = source
                break
        else:
            sources[name] = SOURCE_DEFAULT
    if problems:
        raise ConfigError(problems)
    return Config.of(**values), sources


def export_launcher_variables(env_file: str | os.PathLike | None, environ: dict[str, str] | None = None) -> None:
    """Make the library variables of `.env` (WANDB_API_KEY, WANDB_MODE, HF_TOKEN, HF_HOME...) visible to
    wandb and transformers, as compose's env_file does; the process environment still wins."""
    environ = os.environ if environ is None else environ
    for name, value in dotenv_values_if_present(env_file).items():
        if name in LAUNCHER_NAMES and value and name not in environ:
            environ[name] = value
