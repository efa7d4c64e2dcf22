"""Where settings come from, and which source wins. Highest first:

    process environment  >  command-line flags  >  .env file  >  --preset NAME  >  defaults

`layer_sources` is the one place this order is applied; every command (`load_config`), `avatarl config`,
the Modal plan (launchers/modal.collect_settings) and the benches (`--quick` is `--preset bench-quick`)
read what it decided. The rules:

- A flag beats `.env`: what is typed on the command line runs, whatever a copied `.env` says.
- The process environment beats everything, so that a scheduler, container or CI job can pin a value;
  a flag or preset value it overrides gets one WARNING line naming both, and so does a preset value
  that `.env` overrides. (Inside compose, the `.env` reaches the container as its environment.)
- An empty value means unset, in every source: `LR=` in `.env` leaves LR to the preset or the default.
- `.env` may hold any variable. Settings are read from it; every other variable (WANDB_ENTITY,
  CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, TIKTOKEN_CACHE_DIR...) is copied into the process environment
  where that does not set it already (`export_environment`), as compose's env_file does in a container.
  Only a near-miss of a setting name (LEARNING_RATE, N_LAYERS, lr) is an error, with a "did you mean".
- A preset holds settings only.

Every problem found becomes one line of a ConfigError.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from avatarl.config import LAUNCHER_NAMES, Config, ConfigError, config_fields

log = logging.getLogger(__name__)

TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}

SOURCE_DEFAULT, SOURCE_PRESET, SOURCE_CLI, SOURCE_DOTENV = "default", "preset", "cli", ".env"
SOURCE_ENV = "env"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # NAME.env files, shipped with the package
QUICK_PRESET = "bench-quick"  # what `avatarl bench ... --quick` stands for
# Names other projects use for a setting: difflib cannot see that LEARNING_RATE means LR.
ALIASES = {"LEARNING_RATE": "LR", "MIN_LEARNING_RATE": "MIN_LR", "BATCH_SIZE": "BATCH",
           "MICRO_BATCH_SIZE": "MICRO_BATCH", "BLOCK_SIZE": "CONTEXT_LEN", "MAX_ITERS": "TOTAL_ITERS",
           "OUT_DIR": "CHECKPOINT_DIR", "WANDB_RUN_NAME": "WANDB_NAME", "WARMUP_STEPS": "WARMUP_ITERS",
           "MAX_GRAD_NORM": "GRAD_CLIP"}
# How alike a name must be to a setting's to be taken for a typo of it: N_LAYERS and CONTEXT_LENGTH are,
# WANDB_NOTES (0.76 of WANDB_NAME) and TOP_P (0.8 of TOP_K) are other programs' variables.
NEAR_MISS_CUTOFF = 0.85


def parse_value(f: Any, raw: str) -> Any:
    """Turn the text of one variable into the field's type (a mode into its enum member, matched
    case-insensitively), or raise ValueError with the reason."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    text = raw.strip()
    if f.metadata.get("enum") is not None:
        return f.metadata["enum"].parse(text)
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
    """NAME -> text of a dotenv file; a name without a value reads as empty."""
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
    """A preset's settings as typed Config field values, e.g. for Config.replace."""
    known = config_fields()
    return {known[key].name: parse_value(known[key], value) for key, value in preset_settings(name).items()}


def near_miss(name: str) -> str | None:
    """The setting that `name`, which is none, was probably meant to be (a typo, another case, another
    project's name for it), or None for a variable of its own."""
    known = config_fields()
    if name.upper() in known:
        return name.upper()
    if name.upper() in ALIASES:
        return ALIASES[name.upper()]
    close = difflib.get_close_matches(name.upper(), list(known), n=1, cutoff=NEAR_MISS_CUTOFF)
    return close[0] if close else None


def set_values(layer: Mapping[str, str | None]) -> dict[str, str]:
    """The variables of a source that are set: an empty value means unset, whatever the source."""
    return {name: value for name, value in layer.items() if value is not None and value.strip()}


@dataclass(frozen=True)
class Layered:
    """What the sources decided together (`layer_sources`)."""

    values: dict[str, str]  # every variable some source sets: the winning text
    sources: dict[str, str]  # where each of `values` came from; a setting no source sets: SOURCE_DEFAULT
    shadowed: tuple[str, ...]  # one warning per flag or preset value that another source overrides
    problems: tuple[str, ...]  # near-misses, a missing --env-file, a preset holding a non-setting
    unset: tuple[str, ...]  # variables of ours that the process environment holds empty

    def others(self) -> dict[str, tuple[str, str]]:
        """The variables set that are not settings (launcher, library, container): {NAME: (text, source)}."""
        known = config_fields()
        return {name: (value, self.sources[name]) for name, value in self.values.items() if name not in known}


def _same(name: str, one: str, other: str) -> bool:
    """Whether two texts give a setting the same value (LR=0.01 and LR=1e-2 do)."""
    f = config_fields()[name]
    try:
        return bool(parse_value(f, one) == parse_value(f, other))
    except ValueError:
        return one.strip() == other.strip()


def shadow_warning(name: str, given: Mapping[str, str], preset: str | None, dotenv: Path) -> str | None:
    """The warning for a flag or preset value of `name` that a higher source overrides, or None.
    `given` maps each source that sets `name` to its text, highest first."""
    source, text = next(iter(given.items()))
    if source == SOURCE_ENV and SOURCE_CLI in given:
        if _same(name, text, given[SOURCE_CLI]):
            return None
        lost = f"--{name.lower().replace('_', '-')} {given[SOURCE_CLI]}"
        why = f"the environment wins over flags; unset {name} to use the flag"
    # A preset value that a flag replaces is what presets are for; one the environment or .env replaces
    # is a surprise.
    elif source in (SOURCE_ENV, SOURCE_DOTENV) and SOURCE_PRESET in given and SOURCE_CLI not in given:
        if _same(name, text, given[SOURCE_PRESET]):
            return None
        lost = f"{name}={given[SOURCE_PRESET]} of preset {preset}"
        why = (f"unset {name} to use the preset's" if source == SOURCE_ENV
               else "a .env wins over a preset; remove the line to use the preset's")
    else:
        return None
    where = "the process environment" if source == SOURCE_ENV else str(dotenv)
    return f"{name}={text} from {where} overrides {lost} ({why})."


def layer_sources(cli: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = None,
                  environ: Mapping[str, str] | None = None, preset: str | None = None) -> Layered:
    """Apply the precedence env > flags > .env > preset > defaults to every variable.

    `cli` maps setting names (UPPER_SNAKE) to the raw text of flags; `env_file` None means ./.env when
    present; `preset` names a file of avatarl/presets/. Of the process environment only the settings and
    the launcher variables are read; of `.env`, every variable.
    """
    environ = os.environ if environ is None else environ
    known = config_fields()
    ours = set(known) | LAUNCHER_NAMES
    path = dotenv_path(env_file)
    problems = [f"--env-file {path}: no such file."] if env_file is not None and not path.is_file() else []
    raw_dotenv = dotenv_values_if_present(env_file)
    for name in raw_dotenv:
        if name not in ours and (meant := near_miss(name)):
            problems.append(f"{path}: {name} is not a setting. Did you mean {meant}?")
    presets = set_values(preset_settings(preset)) if preset else {}
    problems += [f"preset {preset}: {name} is not a setting." for name in presets if name not in known]
    dotenv = {k: v for k, v in raw_dotenv.items() if k in ours or not near_miss(k)}  # near-misses: problems
    layers = ((SOURCE_ENV, set_values({k: v for k, v in environ.items() if k in ours})),
              (SOURCE_CLI, set_values({k: v for k, v in (cli or {}).items() if k in known})),
              (SOURCE_DOTENV, set_values(dotenv)),
              (SOURCE_PRESET, {k: v for k, v in presets.items() if k in known}))
    values, sources, shadowed = {}, {}, []
    for name in dict.fromkeys([*known, *(k for _, layer in layers for k in layer)]):
        given = {source: layer[name] for source, layer in layers if name in layer}
        if not given:
            sources[name] = SOURCE_DEFAULT
            continue
        sources[name], values[name] = next(iter(given.items()))
        if warning := shadow_warning(name, given, preset, path):
            shadowed.append(warning)
    unset = tuple(name for name, value in environ.items()
                  if (name in ours or name in raw_dotenv) and not value.strip())
    return Layered(values, sources, tuple(shadowed), tuple(problems), unset)


def build_config(layered: Layered) -> Config:
    """The Config of what `layer_sources` decided; logs its shadow warnings (on rank 0 alone under
    torchrun, whose ranks all read the same sources); ConfigError lists every problem, one per line."""
    if os.environ.get("RANK", "0") in ("", "0"):
        for line in layered.shadowed:
            log.warning("%s", line)
    problems = list(layered.problems)
    values: dict[str, Any] = {}
    for name, f in config_fields().items():
        if name not in layered.values:
            continue
        text = layered.values[name]
        try:
            values[f.name] = parse_value(f, text)
        except ValueError as err:
            verb = "is not allowed" if f.metadata.get("enum") is not None else "is invalid"
            problems.append(f"{name}={text!r} ({layered.sources[name]}) {verb}: {err}.")
    if problems:
        raise ConfigError(problems)
    return Config.of(**values)


def load_config(cli: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None, preset: str | None = None
                ) -> tuple[Config, dict[str, str]]:
    """Resolve every setting with its source (`layer_sources`). Returns (config, {SETTING: source}).
    Changes no environment; raises ConfigError listing every problem, one per line."""
    layered = layer_sources(cli, env_file, environ, preset)
    known = config_fields()
    return build_config(layered), {name: source for name, source in layered.sources.items() if name in known}


def export_environment(layered: Layered, environ: MutableMapping[str, str] | None = None) -> None:
    """Make what `.env` holds besides settings (WANDB_MODE, HF_TOKEN, WANDB_ENTITY, CUDA_VISIBLE_DEVICES,
    ...) visible to this process and its children, as compose's env_file does; the process environment
    still wins. Variables of ours that it holds empty are removed: empty means unset (an empty WANDB_MODE
    would reach wandb as a mode)."""
    environ = os.environ if environ is None else environ
    for name in layered.unset:
        environ.pop(name, None)
    for name, (value, source) in layered.others().items():
        if source == SOURCE_DOTENV and name not in environ:
            environ[name] = value
            if name == "OMP_NUM_THREADS" and environ is os.environ:
                apply_thread_count(value)


def apply_thread_count(value: str) -> None:
    """Give torch, when already imported, the OMP_NUM_THREADS of a .env: its OpenMP runtime read that
    variable when torch was loaded, before the .env was."""
    torch = sys.modules.get("torch")
    if torch is not None and value.strip().isdigit() and int(value) > 0:
        torch.set_num_threads(int(value))


def resolve_settings(cli: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = None,
                     preset: str | None = None) -> tuple[Config, Layered]:
    """What a command runs with: `load_config` from os.environ, then `export_environment`."""
    layered = layer_sources(cli, env_file, None, preset)
    cfg = build_config(layered)
    export_environment(layered)
    return cfg, layered
