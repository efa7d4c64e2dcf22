"""One typed configuration tree in sections, read from the environment, a `.env` file and CLI flags.

`Config` holds one section per component (data, model, optim, grpo, avatarl, referee, run,
distributed, launch); a component is handed its section, the maths its section or plain numbers.
Every field is a setting whose environment variable is the field name in UPPER_SNAKE case
(`context_len` -> `CONTEXT_LEN`), unique across sections, so the sections change no variable name.
Modes are enums (`Rollouts.TEACHER_FORCED`), compared by member rather than by string.
The one-line `doc` of each field is the CLI help, the `avatarl config` listing and the generated
`.env.example`, so the documentation cannot drift from the code. Where the values come from, and
which source wins, is config_sources.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from avatarl.config_distributed import DistributedSettings, LaunchSettings
from avatarl.config_schema import Choice, ConfigError, Section
from avatarl.config_sections import (
    AvatarlSettings,
    DataSettings,
    GRPOSettings,
    ModelSettings,
    OptimSettings,
    RefereeSettings,
    RunSettings,
)

# Secrets: values never printed, logged, saved or passed as a Modal function argument. These names, and
# every name ending in a suffix below (OPENAI_API_KEY, GITHUB_TOKEN, DB_PASSWORD): a suffix, not a
# substring, so that TOKENIZER is a setting like any other.
SECRET_NAMES = frozenset({"WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODAL_TOKEN_ID",
                          "MODAL_TOKEN_SECRET"})
SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")
# Names that end like a secret but hold none: MODAL_WANDB_SECRET is the name of a Modal secret.
NOT_SECRETS = frozenset({"MODAL_WANDB_SECRET"})
__all__ = ["Config", "ConfigError", "SECTIONS", "config_fields", "env_name", "is_secret", "setting_fields"]


SECTIONS: dict[str, type[Section]] = {
    "data": DataSettings, "model": ModelSettings, "optim": OptimSettings, "grpo": GRPOSettings,
    "avatarl": AvatarlSettings, "referee": RefereeSettings, "run": RunSettings,
    "distributed": DistributedSettings, "launch": LaunchSettings,
}


def section_of() -> dict[str, str]:
    """{setting field name: its section's name}, e.g. {"lr": "optim"}."""
    return {f.name: name for name, section in SECTIONS.items() for f in fields(section)}  # type: ignore


@dataclass
class Config:
    """Every setting of a run, one section per component."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    avatarl: AvatarlSettings = field(default_factory=AvatarlSettings)
    referee: RefereeSettings = field(default_factory=RefereeSettings)
    run: RunSettings = field(default_factory=RunSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    launch: LaunchSettings = field(default_factory=LaunchSettings)

    @classmethod
    def of(cls, **settings: Any) -> Config:
        """A Config from settings named by field (`Config.of(lr=1e-3, n_layer=2)`); every problem of every
        section in one ConfigError."""
        owner = section_of()
        unknown = sorted(set(settings) - set(owner))
        if unknown:
            raise TypeError(f"not settings: {', '.join(unknown)}")
        grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in settings.items():
            grouped[owner[name]][name] = value
        built, problems = {}, []
        for name, section in SECTIONS.items():
            try:
                built[name] = section(**grouped[name])
            except ConfigError as err:
                problems += err.problems
        if problems:
            raise ConfigError(problems)
        return cls(**built)

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed, named by field; the changed sections are checked again."""
        owner = section_of()
        unknown = sorted(set(changes) - set(owner))
        if unknown:
            raise TypeError(f"not settings: {', '.join(unknown)}")
        sections = {name: getattr(self, name) for name in SECTIONS}
        for name in {owner[change] for change in changes}:
            mine = {key: value for key, value in changes.items() if owner[key] == name}
            sections[name] = dataclasses.replace(sections[name], **mine)
        return Config(**sections)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by field name, modes as plain text: what checkpoints and loggers store."""
        flat = {}
        for name in SECTIONS:
            section = getattr(self, name)
            for f in fields(section):
                value = getattr(section, f.name)
                flat[f.name] = value.value if isinstance(value, Choice) else value
        return flat

    @property
    def seq_len(self) -> int:
        """Longest sequence the model sees: a context plus a full rollout."""
        return self.model.context_len + self.grpo.horizon


# Variables that are not trainer settings but are ours to document in `.env.example`: launchers,
# containers, secrets. Any other variable may be in `.env` too (config_sources.export_environment).
LAUNCHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("AVATARL_IMAGE", "avatarl:latest", "Image name:tag that compose and Modal build and run."),
    ("CHECKPOINT_HOST_DIR", "./checkpoints", "Host directory mounted at /checkpoints in the containers."),
    ("DATA_HOST_DIR", "./data", "Host directory mounted at /data (corpora, DATA_PATH=/data/...)."),
    ("CACHE_HOST_DIR", "./.cache", "Host directory mounted at /cache (downloads, HF models)."),
    ("HOST_UID", "1000", "User id the containers run as, so host-mounted files stay yours."),
    ("MODAL_DATA_VOLUME", "avatarl-data", "Modal volume holding corpora and caches."),
    ("MODAL_CHECKPOINT_VOLUME", "avatarl-checkpoints", "Modal volume holding checkpoints."),
    ("MODAL_WANDB_SECRET", "", "Name of a Modal secret with WANDB_API_KEY (empty = pass the local one)."),
    ("MODAL_TIMEOUT_HOURS", "24", "Wall-clock limit of the Modal training function."),
    ("MODAL_NODES", "1", "Containers of one Modal cluster (modal.clustered), each with N_GPUS=8; 1 = one."),
    ("NCCL_SOCKET_IFNAME", "", "Network interface NCCL uses between nodes (eth0...); unset: NCCL's choice."),
    ("GLOO_SOCKET_IFNAME", "", "Network interface gloo (CPU runs) uses between nodes; unset: gloo's."),
    ("NCCL_IB_DISABLE", "", "1 turns InfiniBand off for NCCL (nodes joined by Ethernet only)."),
    ("NCCL_DEBUG", "", "INFO prints NCCL's choice of interfaces and transports (debugging several nodes)."),
    ("WANDB_API_KEY", "", "Weights & Biases key; never printed, logged or saved."),
    ("WANDB_MODE", "", "offline writes runs locally (sync later with `wandb sync`)."),
    ("HF_TOKEN", "", "Hugging Face token for gated REFERENCE_MODEL; never printed."),
    ("HF_HOME", "", "Hugging Face cache directory."),
)
LAUNCHER_NAMES = frozenset(name for name, _, _ in LAUNCHER_VARIABLES)


def env_name(field_name: str) -> str:
    return field_name.upper()


def is_secret(name: str) -> bool:
    """Whether the variable `name` holds a secret (SECRET_NAMES, SECRET_SUFFIXES); no setting does."""
    upper = name.upper()
    if upper in NOT_SECRETS:
        return False
    if upper in SECRET_NAMES:
        return True
    return any(upper.endswith(suffix) or upper == suffix[1:] for suffix in SECRET_SUFFIXES)


def setting_fields() -> dict[str, Any]:
    """{field name: its dataclass Field} for every setting, in section order."""
    return {f.name: f for section in SECTIONS.values() for f in fields(section)}  # type: ignore


def config_fields() -> dict[str, Any]:
    """{ENV_NAME: its dataclass Field} for every setting, in section order."""
    return {env_name(name): f for name, f in setting_fields().items()}
