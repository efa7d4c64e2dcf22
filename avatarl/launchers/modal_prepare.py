"""`avatarl prepare` on Modal's CPUs, in the training image, writing into the data volume (docs/data.md)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, cast

from avatarl import exit_codes
from avatarl.errors import run_entry
from avatarl.launchers.modal import (
    DATA_MOUNT,
    MAX_TIMEOUT_HOURS,
    VOLUME_CACHES,
    ModalSetupError,
    _import_modal,
    _setting,
    collect_settings,
    function_options,
    supervise,
    time_limit_hours,
)
from avatarl.launchers.modal_image import image_setting

APP_NAME = "avatarl-prepare"
DEFAULT_CPU = 16.0
DEFAULT_MEMORY_GB = 32.0
# A rerun starts over from the sources and writes the same bytes; the download cache survives in the volume.
RETRIES = 2


@dataclass(frozen=True)
class PreparePlan:
    """What the Modal prepare app needs, decided from the settings and arguments without touching Modal."""

    args: tuple[str, ...]  # of `avatarl prepare`, run as they are in the container
    cpu: float
    memory_mib: int
    timeout_s: int
    data_volume: str
    named_secret: str
    local_secrets: dict[str, str] = field(repr=False)
    image: str = ""  # AVATARL_IMAGE, as for training (modal_image.function_image)


def _on_volume(path: str) -> bool:
    return PurePosixPath(path).is_relative_to(DATA_MOUNT) and PurePosixPath(path) != PurePosixPath(DATA_MOUNT)


def plan_modal_prepare(settings: Mapping[str, str], prepare_args: Sequence[str], cpu: float = DEFAULT_CPU,
                       memory_gb: float = DEFAULT_MEMORY_GB,
                       timeout_hours: float | None = None) -> PreparePlan:
    """Check the `avatarl prepare` arguments here, before a container is paid for; ModalSetupError lists
    every problem. Paths must be inside the data volume: nothing else exists in the container or
    survives it."""
    from avatarl.cli import build_parser

    try:
        parsed = build_parser().parse_args(["prepare", *prepare_args])
    except SystemExit as err:  # argparse has printed what is wrong
        raise ModalSetupError("the arguments of `avatarl prepare` above are not valid "
                              "(avatarl prepare --help)") from err
    problems = []
    if not _on_volume(parsed.output):
        problems.append(f"--output {parsed.output}: write under {DATA_MOUNT}/ (the data volume); "
                        "anything else is lost when the container ends.")
    local = [source for source in parsed.sources if not _on_volume(source)]
    dataset = parsed.hf_dataset
    if dataset and dataset.startswith(("/", ".", "~")) and not _on_volume(dataset):
        local.append(dataset)
    tokenizer = parsed.tokenizer or ""
    if tokenizer.startswith(("/", ".", "~")) and not _on_volume(tokenizer):
        local.append(tokenizer)
    volume = _setting(settings, "MODAL_DATA_VOLUME")
    for path in local:
        problems.append(f"{path}: not in the data volume; upload it first "
                        f"(modal volume put {volume or 'VOLUME'} {path} /corpus/) "
                        f"and name it {DATA_MOUNT}/corpus/...")
    if parsed.env_file is not None:
        problems.append("--env-file names a file on this machine; give the settings as flags instead.")
    hours = time_limit_hours(settings, timeout_hours)
    if hours is None:
        asked = (f"{timeout_hours:g}" if timeout_hours is not None
                 else _setting(settings, "MODAL_TIMEOUT_HOURS"))
        problems.append(f"timeout {asked} h: give a number of hours above 0 and at most "
                        f"{MAX_TIMEOUT_HOURS:g}.")
    if not cpu > 0 or not memory_gb > 0:
        problems.append(f"--cpu {cpu:g} --memory-gb {memory_gb:g}: both must be above 0.")
    if not volume:
        problems.append("MODAL_DATA_VOLUME is empty: name the Modal volume.")
    if problems:
        raise ModalSetupError("\n".join(problems))
    args = list(prepare_args)
    if parsed.num_proc is None:  # os.cpu_count() in a container counts the host's cores
        args += ["--num-proc", str(max(1, int(cpu)))]
    return PreparePlan(args=tuple(args), cpu=cpu, memory_mib=round(memory_gb * 1024),
                       timeout_s=round(cast(float, hours) * 3600),
                       data_volume=volume, named_secret=_setting(settings, "MODAL_WANDB_SECRET"),
                       local_secrets={"HF_TOKEN": settings["HF_TOKEN"]} if settings.get("HF_TOKEN") else {},
                       image=image_setting(settings))


def build_prepare_app(plan: PreparePlan) -> tuple[Any, Any]:
    """The Modal app and its prepare function: the training's image, CPUs only, the data volume at /data."""
    modal = _import_modal()
    app = modal.App(APP_NAME)
    volumes = {DATA_MOUNT: modal.Volume.from_name(plan.data_volume, create_if_missing=True)}
    # The local secret is HF_TOKEN, for gated datasets.
    options = function_options(modal, plan.timeout_s, RETRIES, plan.named_secret, plan.local_secrets,
                               plan.image)
    function = app.function(cpu=plan.cpu, memory=plan.memory_mib, volumes=volumes,
                            **options)(prepare_in_container)
    return app, function


def run_modal_prepare(settings: Mapping[str, str], prepare_args: Sequence[str], cpu: float = DEFAULT_CPU,
                      memory_gb: float = DEFAULT_MEMORY_GB, timeout_hours: float | None = None) -> int:
    """Run `avatarl prepare ARGS` on Modal; returns its exit code."""
    plan = plan_modal_prepare(settings, prepare_args, cpu, memory_gb, timeout_hours)
    modal = _import_modal()
    app, function = build_prepare_app(plan)
    print(f"[avatarl] Modal: avatarl prepare {' '.join(plan.args)} on {plan.cpu:g} CPUs, "
          f"{plan.memory_mib / 1024:g} GiB, timeout {plan.timeout_s / 3600:g} h, "
          f"volume {plan.data_volume} -> {DATA_MOUNT}")
    # detach: the preparation continues if this machine disconnects; `modal app stop avatarl-prepare` ends it.
    with modal.enable_output(), app.run(detach=True):
        return int(function.remote(list(plan.args), plan.data_volume))


def prepare_in_container(args: list[str], data_volume: str) -> int:
    """The Modal function: `avatarl prepare ARGS`, then commit the data volume (also after a failure, so a
    retry finds the downloads). Exit 2 (bad arguments) is returned, since a retry cannot fix it; any other
    failure raises, and Modal runs it again."""
    import modal

    code, _ = supervise(["avatarl", "prepare", *args], {**os.environ, **VOLUME_CACHES})
    modal.Volume.from_name(data_volume).commit()
    if code in (exit_codes.OK, *exit_codes.NOT_RETRYABLE):
        return code
    raise RuntimeError(f"avatarl prepare exited with {code}: Modal runs it again")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m avatarl.launchers.modal_prepare", allow_abbrev=False,
        description="Run `avatarl prepare` on Modal (CPUs only) into the data volume MODAL_DATA_VOLUME "
                    "at /data.",
        epilog="Every other argument goes to `avatarl prepare` (after an optional --); paths must be under "
               "/data. Example: python -m avatarl.launchers.modal_prepare --cpu 16 "
               "--hf-dataset Skylion007/openwebtext --tokenizer gpt2 --output /data/owt "
               "--val-fraction 0.0005")
    parser.add_argument("--cpu", type=float, default=DEFAULT_CPU, help=f"CPU cores (default {DEFAULT_CPU:g}; "
                        "also --num-proc unless that is given)")
    parser.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_GB,
                        help=f"memory in GiB (default {DEFAULT_MEMORY_GB:g})")
    parser.add_argument("--timeout-hours", type=float, default=None, help="wall-clock limit (default "
                        "MODAL_TIMEOUT_HOURS, 24)")
    parser.add_argument("--env-file", default=None, help="dotenv file with MODAL_DATA_VOLUME, HF_TOKEN ... "
                        "(default ./.env when present)")
    ours, rest = parser.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return run_entry(lambda: run_modal_prepare(collect_settings(ours.env_file), rest, ours.cpu,
                                               ours.memory_gb, ours.timeout_hours))


if __name__ == "__main__":
    # The package's copy of this module, not this __main__ one: Modal finds the function in the image by its
    # module name, and the image holds no source mounted from here.
    from avatarl.launchers.modal_prepare import main as package_main

    sys.exit(package_main())
