"""How a setting is declared: a dataclass field whose metadata (one-line doc, allowed values, range)
drives parsing, validation, CLI help and `.env.example`; enums for the modes. ConfigError
(errors.py) is imported from here and from config.py too."""

from __future__ import annotations

import enum
import math
from dataclasses import field, fields
from typing import Any

from avatarl.errors import ConfigError


class Choice(str, enum.Enum):
    """A mode setting: compares equal to its text, prints as its text, parses case-insensitively."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, text: str) -> Choice:
        for member in cls:
            if member.value.lower() == text.strip().lower():
                return member
        raise ValueError(f"choose one of {', '.join(m.value for m in cls)}")


class Algorithm(Choice):
    GRPO = "grpo"
    AVATARL = "avatarl"


class Rollouts(Choice):
    AUTOREGRESSIVE = "autoregressive"
    TEACHER_FORCED = "teacher_forced"


class Sampling(Choice):
    WITH_REPLACEMENT = "with_replacement"
    WITHOUT_REPLACEMENT = "without_replacement"


class Advantage(Choice):
    GROUP_STD = "group_std"
    LOG_REWARD = "log_reward"
    IMPORTANCE = "importance"


class Credit(Choice):
    ALL = "all"
    PREFIX = "prefix"


class Reference(Choice):
    NGRAM = "ngram"
    GPT2 = "gpt2"


class Quantize(Choice):
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class ActionSet(Choice):
    TOPK = "topk"
    FULL = "full"
    SAMPLED = "sampled"


class RewardNorm(Choice):
    REWARDS = "rewards"
    ACTIONS = "actions"


class SampledAdvantage(Choice):
    IMPORTANCE = "importance"
    LOG_REWARD = "log_reward"
    MEAN = "mean"


class LrDecay(Choice):
    COSINE = "cosine"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


class AmpDtype(Choice):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class LogLevel(Choice):
    INFO = "INFO"
    DEBUG = "DEBUG"


class DeviceKind(Choice):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class TrainingMode(Choice):
    GENERIC = "generic"
    MODAL = "modal"


class GpuType(Choice):
    T4 = "T4"
    L4 = "L4"
    A10G = "A10G"
    L40S = "L40S"
    A100 = "A100"
    A100_80GB = "A100-80GB"
    H100 = "H100"
    H200 = "H200"
    B200 = "B200"


def setting(default: Any, doc: str, *, choices: type[Choice] | None = None, low: float | None = None,
            high: float | None = None, low_exclusive: bool = False) -> Any:
    """A config field with the metadata that drives parsing, validation, help and `.env.example`."""
    meta = {"doc": doc, "choices": tuple(m.value for m in choices) if choices else (), "enum": choices,
            "low": low, "high": high, "low_exclusive": low_exclusive}
    return field(default=default, metadata=meta)


class Section:
    """A group of settings owned by one component; checks its own ranges and relations when built."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            enum_type = f.metadata["enum"]
            value = getattr(self, f.name)
            if enum_type is not None and not isinstance(value, enum_type) and isinstance(value, str):
                try:
                    setattr(self, f.name, enum_type.parse(value))
                except ValueError:
                    pass  # range_problem names the allowed values
        problems = [p for f in fields(self) if (p := range_problem(f, getattr(self, f.name)))]  # type: ignore
        problems += self.problems() if not problems else []
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """What is wrong between this section's settings, one line each (ranges are already checked)."""
        return []



def range_problem(f: Any, value: Any) -> str | None:
    meta, name = f.metadata, f.name.upper()
    if meta["choices"] and value not in meta["choices"]:
        return f"{name}={value!r} is not allowed: choose one of {', '.join(meta['choices'])}."
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}={value} is not a finite number."
    low, high = meta["low"], meta["high"]
    if low is not None and (value <= low if meta["low_exclusive"] else value < low):
        bound = f"greater than {low:g}" if meta["low_exclusive"] else f"at least {low:g}"
        return f"{name}={value} is out of range: it must be {bound}."
    if high is not None and value > high:
        return f"{name}={value} is out of range: it must be at most {high:g}."
    return None


