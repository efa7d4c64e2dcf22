"""Train on Modal in the image of docker/Dockerfile (AVATARL_IMAGE from a registry, else built by Modal:
modal_image.py), the same image compose and Kubernetes run.

    TRAINING_MODE=modal avatarl train        # also: make modal, python train_generic.py --mode modal

What happens: from the local settings (environment > flags > .env > preset, see `collect_settings`) a
Modal app is defined with that image, `GPU_TYPE:N_GPUS` GPUs, two persistent volumes
(MODAL_DATA_VOLUME at /data, MODAL_CHECKPOINT_VOLUME at /checkpoints, created on first use), the secrets
(config.is_secret: WANDB_API_KEY, HF_TOKEN, any *_KEY of .env) as a Modal secret (a named one,
MODAL_WANDB_SECRET, or the local keys sent as an ephemeral secret; never part of the image or of the
function's arguments), retries, and a MODAL_TIMEOUT_HOURS limit. The remote
function runs `avatarl train` (or, for N_GPUS > 1, `avatarl launch --nproc-per-node=N_GPUS -m avatarl
train`, i.e. torchrun) with CHECKPOINT_DIR=/checkpoints, so a retried or preempted run resumes from its
newest checkpoint. MODAL_NODES > 1 makes it a clustered function (`modal.clustered`): that many
containers of 8 GPUs, scheduled together, each running `avatarl launch` as one node of a c10d
rendezvous hosted by container 0 (`cluster_settings`); a failed container fails the cluster's call,
and Modal's retries start a new cluster that resumes from the newest committed checkpoint.

Volume commits: a thread polls CHECKPOINT_DIR/latest every COMMIT_POLL_SECONDS and commits the
checkpoint volume when it names a new checkpoint; both volumes are committed again when the trainer
exits. A run stopped by Modal's preemption signal before it finished raises, so Modal runs it again.

Data preparation (`avatarl prepare` into the data volume, on CPUs) is avatarl/launchers/modal_prepare.py.
`modal` is imported only inside the functions that need it: this module imports without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast

from avatarl import exit_codes
from avatarl.config import LAUNCHER_NAMES, LAUNCHER_VARIABLES, config_fields, is_secret
from avatarl.config_sources import default_of, layer_sources
from avatarl.errors import ConfigError
from avatarl.launchers.modal_image import function_image, image_setting
from avatarl.run_dir import heartbeat_age, run_directory
from avatarl.signals import STOP_SIGNALS, forwarding_signals, send

APP_NAME = "avatarl"
DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
MAX_GPUS = 8  # GPUs Modal attaches to one container
MAX_NODES = 32  # containers of one Modal cluster
RDZV_PORT = 29400  # the c10d rendezvous on container 0 of a cluster
MAX_TIMEOUT_HOURS = 24.0  # Modal's limit for one function call
RETRIES = 3
# Hugging Face downloads and the token cache live in the data volume, so a retry does not fetch them again.
VOLUME_CACHES = {"DATA_CACHE_DIR": f"{DATA_MOUNT}/cache", "HF_HOME": f"{DATA_MOUNT}/hf"}
COMMIT_POLL_SECONDS = 30.0
# Variables that describe this machine, not the container: never sent. Every other setting is sent, and
# every other variable of .env (WANDB_ENTITY...); secrets (config.is_secret) only inside a Modal secret.
HOST_ONLY = frozenset({"CHECKPOINT_DIR", "DATA_CACHE_DIR", "HF_HOME", "TRAINING_MODE", "AVATARL_IMAGE",
                       "CHECKPOINT_HOST_DIR", "DATA_HOST_DIR", "CACHE_HOST_DIR", "HOST_UID",
                       "CUDA_VISIBLE_DEVICES", "TIKTOKEN_CACHE_DIR", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET",
                       "PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV"})
INSTALL_HINT = "Modal is not installed: pip install 'avatarl[modal]' (then `modal setup` once to log in)."


class ModalSetupError(ConfigError):
    """The Modal run cannot be set up as configured; each line says what to change (exit 2)."""


def in_modal_container(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Modal container (Modal sets MODAL_TASK_ID and MODAL_IS_REMOTE=1 there)."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("MODAL_TASK_ID")) or environ.get("MODAL_IS_REMOTE") == "1"


def collect_settings(env_file: str | os.PathLike | None = None, cli: Mapping[str, str] | None = None,
                     environ: Mapping[str, str] | None = None, preset: str | None = None) -> dict[str, str]:
    """What the local sources set, as text, decided as for every command (config_sources.layer_sources:
    env > flags > .env > preset): settings, launcher variables and every other variable of .env."""
    return dict(layer_sources(cli, env_file, environ, preset).values)


def trainer_command(n_gpus: int, nodes: int = 1) -> list[str]:
    """`avatarl train` on one GPU; otherwise one process per GPU under `avatarl launch` (torchrun whose
    workers get the stop signal directly, so a stopped run exits 0 with its checkpoint), on one node
    or, for a cluster, as one node of the rendezvous that cluster_settings describes."""
    if nodes > 1:
        return ["avatarl", "launch", "-m", "avatarl", "train"]
    if n_gpus > 1:
        return ["avatarl", "launch", "--standalone", f"--nproc-per-node={n_gpus}", "-m", "avatarl", "train"]
    return ["avatarl", "train"]


@dataclass(frozen=True)
class ModalPlan:
    """Everything the Modal app needs, decided from the settings without touching Modal."""

    gpu: str
    n_gpus: int
    nodes: int
    timeout_s: int
    data_volume: str
    checkpoint_volume: str
    named_secret: str
    remote_settings: dict[str, str]
    # (local file, path inside the data volume) when DATA_PATH is a file on this machine.
    upload: tuple[Path, str] | None
    local_secrets: dict[str, str] = field(repr=False)
    image: str = ""  # AVATARL_IMAGE (modal_image.function_image: pulled, or the Dockerfile built)


def _setting(settings: Mapping[str, str], name: str) -> str:
    defaults = {n: d for n, d, _ in LAUNCHER_VARIABLES}
    if name in settings:
        return settings[name]
    fields = config_fields()
    return str(default_of(fields[name])) if name in fields else defaults.get(name, "")


def time_limit_hours(settings: Mapping[str, str], given: float | None = None) -> float | None:
    """A Modal function's time limit in hours: `given`, else MODAL_TIMEOUT_HOURS; None unless it is a
    number above 0 and within Modal's limit."""
    if given is None:
        try:
            given = float(_setting(settings, "MODAL_TIMEOUT_HOURS"))
        except ValueError:
            return None
    return given if 0 < given <= MAX_TIMEOUT_HOURS else None


def plan_modal_run(settings: Mapping[str, str]) -> ModalPlan:
    """Turn local settings into a Modal plan; ModalSetupError lists every problem."""
    problems = []
    try:
        n_gpus = int(_setting(settings, "N_GPUS"))
    except ValueError:
        n_gpus = 0
    if not 1 <= n_gpus <= MAX_GPUS:
        problems.append(f"N_GPUS={_setting(settings, 'N_GPUS')!r}: Modal attaches 1 to {MAX_GPUS} GPUs "
                        "to a container.")
    try:
        nodes = int(_setting(settings, "MODAL_NODES"))
    except ValueError:
        nodes = 0
    if not 1 <= nodes <= MAX_NODES:
        problems.append(f"MODAL_NODES={_setting(settings, 'MODAL_NODES')!r}: "
                        f"give 1 to {MAX_NODES} containers.")
    elif nodes > 1 and n_gpus != MAX_GPUS:
        problems.append(f"MODAL_NODES={nodes} needs N_GPUS={MAX_GPUS}: each container of a Modal cluster "
                        f"takes every GPU of its host (N_GPUS is {_setting(settings, 'N_GPUS')}).")
    if nodes > 1 and _setting(settings, "MAX_RESTARTS").strip() not in ("", "0"):
        # Each container mounts the checkpoint volume as committed when it started: after a torchrun restart
        # inside the same containers, rank 0 would choose a checkpoint that the other containers cannot see.
        problems.append(f"MAX_RESTARTS={_setting(settings, 'MAX_RESTARTS')} with MODAL_NODES={nodes}: set "
                        "MAX_RESTARTS=0; on Modal a failed cluster is retried as a new cluster "
                        "(Modal's retries), whose containers all see the newest committed checkpoint.")
    hours = time_limit_hours(settings)
    if hours is None:
        problems.append(f"MODAL_TIMEOUT_HOURS={_setting(settings, 'MODAL_TIMEOUT_HOURS')!r}: "
                        f"give a number of hours above 0 and at most {MAX_TIMEOUT_HOURS:g} (Modal's limit).")
    volumes = {name: _setting(settings, name) for name in ("MODAL_DATA_VOLUME", "MODAL_CHECKPOINT_VOLUME")}
    problems += [f"{name} is empty: name the Modal volume." for name, value in volumes.items() if not value]
    if len(set(volumes.values())) < len(volumes):
        problems.append("MODAL_DATA_VOLUME and MODAL_CHECKPOINT_VOLUME must name different volumes.")

    remote = {name: value for name, value in settings.items()
              if name not in LAUNCHER_NAMES and name not in HOST_ONLY and not is_secret(name)}
    # TRAINING_MODE=generic: the hand-over happened; the trainer in the container must not start another.
    remote.update(volumes, **VOLUME_CACHES, CHECKPOINT_DIR=CHECKPOINT_MOUNT, N_GPUS=str(n_gpus),
                  TRAINING_MODE="generic", MODAL_NODES=str(nodes))
    if settings.get("WANDB_MODE"):
        remote["WANDB_MODE"] = settings["WANDB_MODE"]
    upload = None
    data_path = settings.get("DATA_PATH", "")
    if data_path and not PurePosixPath(data_path).is_relative_to(DATA_MOUNT):
        local = Path(data_path).expanduser()
        if not local.is_file():
            problems.append(f"DATA_PATH={data_path}: no such file here; give a local file (it is uploaded to "
                            f"the data volume) or a path under {DATA_MOUNT} in volume "
                            f"{volumes['MODAL_DATA_VOLUME']}.")
        upload = (local, f"/corpus/{local.name}")
        remote["DATA_PATH"] = f"{DATA_MOUNT}/corpus/{local.name}"
    if problems:
        raise ModalSetupError("\n".join(problems))

    gpu_type = _setting(settings, "GPU_TYPE")
    return ModalPlan(gpu=f"{gpu_type}:{n_gpus}" if n_gpus > 1 else gpu_type, n_gpus=n_gpus, nodes=nodes,
                     timeout_s=round(cast(float, hours) * 3600), data_volume=volumes["MODAL_DATA_VOLUME"],
                     checkpoint_volume=volumes["MODAL_CHECKPOINT_VOLUME"],
                     named_secret=_setting(settings, "MODAL_WANDB_SECRET"), remote_settings=remote,
                     upload=upload,
                     local_secrets={key: value for key, value in settings.items()
                                    if is_secret(key) and key not in HOST_ONLY and value},
                     image=image_setting(settings))


def hand_over_to_modal(env_file: str | None, cli: Mapping[str, str], preset: str | None = None) -> int:
    """TRAINING_MODE=modal: start the Modal run with this machine's settings (collect_settings); secrets
    travel as a Modal secret, never as function arguments. Returns the remote trainer's exit code; raises
    ModalSetupError when the run cannot be set up."""
    try:
        import modal  # noqa: F401
    except ImportError:
        raise ModalSetupError("TRAINING_MODE=modal needs the Modal client: pip install 'avatarl[modal]' "
                              "and run `modal setup` (or use TRAINING_MODE=generic to train on this "
                              "machine).") from None
    return run_modal(collect_settings(env_file, cli, preset=preset))


def _import_modal() -> Any:
    try:
        import modal
    except ImportError as err:
        raise ModalSetupError(INSTALL_HINT) from err
    return modal


def function_options(modal: Any, timeout_s: int, retries: int, named_secret: str,
                     local_secrets: Mapping[str, str], image: str = "") -> dict[str, Any]:
    """What the training and the prepare function share: the image of AVATARL_IMAGE=`image` (from its
    registry, else the Dockerfile's) with no source mounted over it (it holds this package), the named
    secret and the local ones (a Modal secret, never a function argument), the time limit, and retries
    with backoff."""
    secrets = [modal.Secret.from_name(named_secret)] if named_secret else []
    if local_secrets:
        secrets.append(modal.Secret.from_dict(dict(local_secrets)))
    return dict(image=function_image(modal, image), secrets=secrets, timeout=timeout_s, include_source=False,
                retries=modal.Retries(max_retries=retries, initial_delay=10.0, backoff_coefficient=2.0))


def build_app(plan: ModalPlan) -> tuple[Any, Any]:
    """The Modal app and its training function for `plan` (defined offline; nothing runs yet)."""
    modal = _import_modal()
    volumes = {DATA_MOUNT: modal.Volume.from_name(plan.data_volume, create_if_missing=True),
               CHECKPOINT_MOUNT: modal.Volume.from_name(plan.checkpoint_volume, create_if_missing=True)}
    app = modal.App(APP_NAME)
    # Several containers scheduled together, all or nothing, with RDMA between them for NCCL.
    body = train_in_container
    if plan.nodes > 1:
        body = modal.clustered(size=plan.nodes, rdma=True)(train_in_container)
    function = app.function(gpu=plan.gpu, volumes=volumes, **function_options(
        modal, plan.timeout_s, RETRIES, plan.named_secret, plan.local_secrets, plan.image))(body)
    return app, function


def run_modal(settings: Mapping[str, str]) -> int:
    """Train on Modal with these settings; returns the remote trainer's exit code."""
    plan = plan_modal_run(settings)
    modal = _import_modal()
    app, function = build_app(plan)
    if plan.upload:
        local, remote = plan.upload
        print(f"[avatarl] uploading {local} to Modal volume {plan.data_volume} at {remote}")
        volume = modal.Volume.from_name(plan.data_volume, create_if_missing=True)
        with volume.batch_upload(force=True) as batch:
            batch.put_file(str(local), remote)
    print(f"[avatarl] Modal: {plan.nodes} x {plan.gpu}, timeout {plan.timeout_s / 3600:g} h, volumes "
          f"{plan.data_volume} -> {DATA_MOUNT}, {plan.checkpoint_volume} -> {CHECKPOINT_MOUNT}")
    # detach: the run continues if this machine disconnects; `modal app stop avatarl` ends it.
    with modal.enable_output(), app.run(detach=True):
        return int(function.remote(plan.remote_settings))


class CheckpointCommitter:
    """Calls `commit` whenever the checkpoint pointer file names a checkpoint it has not seen."""

    def __init__(self, pointer: Path, commit: Callable[[], None]):
        self.pointer, self.commit = pointer, commit
        self.seen = self._read()

    def _read(self) -> str | None:
        try:
            return self.pointer.read_text()
        except OSError:
            return None

    def poll(self) -> bool:
        current = self._read()
        if current is None or current == self.seen:
            return False
        try:
            self.commit()
        except Exception as err:  # a failed commit must not end the run; the next change retries
            print(f"[avatarl] warning: volume commit failed: {err}", file=sys.stderr)
            return False
        self.seen = current
        return True


def supervise(command: list[str], env: Mapping[str, str], poll: Callable[[], Any] = lambda: None,
              interval: float = COMMIT_POLL_SECONDS) -> tuple[int, bool]:
    """Run the trainer, forwarding SIGTERM/SIGINT to it as SIGTERM (finish the step, checkpoint, exit).

    Calls `poll` every `interval` seconds from a thread. Returns (exit code, whether a signal came).
    """
    signalled, stop = threading.Event(), threading.Event()
    started: list[subprocess.Popen] = []

    def to_trainer(signum: int) -> None:
        signalled.set()
        send([process.pid for process in started], signal.SIGTERM)

    def keep_polling() -> None:
        while not stop.wait(interval):
            poll()

    # Handlers go in before the child starts, so a signal during its start is not lost. They can only
    # be set from the main thread; elsewhere the child gets signals only directly.
    main_thread = threading.current_thread() is threading.main_thread()
    poller = threading.Thread(target=keep_polling, daemon=True)
    with forwarding_signals(to_trainer, STOP_SIGNALS if main_thread else ()):
        try:
            started.append(subprocess.Popen(command, env=dict(env)))
            if signalled.is_set():
                started[0].send_signal(signal.SIGTERM)
            poller.start()
            code = started[0].wait()
        finally:
            stop.set()
            if poller.is_alive():
                poller.join()
    return code, signalled.is_set()


def run_finished(directory: Path) -> bool:
    """Whether the trainer marked the run in `directory` complete in its heartbeat (not just stopped
    early)."""
    try:
        _, beat = heartbeat_age(directory)
    except (OSError, ValueError, KeyError):
        return False
    return bool(beat.get("finished"))


def cluster_settings(nodes: int, rank: int, ipv4: list[str], ipv6: list[str]) -> dict[str, str]:
    """The settings that make container `rank` of a Modal cluster one node of its job: a c10d rendezvous
    on container 0, and CHECKPOINT_DIR a volume that every container mounts as the same committed
    snapshot (what rank 0 writes reaches the others at the next start, which is when they read it); the
    container is known to the rendezvous by its own address."""
    from avatarl.distributed import SNAPSHOT_SHARED_ENV  # here: torch is not needed to plan a run

    addresses = ipv4 or ipv6
    host = ipv4[0] if ipv4 else f"[{ipv6[0]}]"
    # NODE_ADDR: this container's own address, not one a .env carried along (the same in every container).
    return {"NNODES": str(nodes), "NODE_RANK": str(rank), "RDZV_ENDPOINT": f"{host}:{RDZV_PORT}",
            "NODE_ADDR": addresses[rank], SNAPSHOT_SHARED_ENV: "1"}


def train_in_container(settings: dict[str, str]) -> int:
    """The Modal function: run the trainer in the container, keep the volumes committed. In a cluster
    every container runs it; the one holding global rank 0 writes, and so commits, the checkpoints."""
    import modal

    from avatarl.checkpoint import LATEST

    nodes = int(settings.get("MODAL_NODES", "1"))
    if nodes > 1:
        cluster = modal.Cluster.from_context()  # the API of modal.clustered (Modal >= 1.6), no network call
        settings = {**settings, **cluster_settings(nodes, cluster.container_rank(),
                                                   list(cluster.container_ips(family="ipv4")),
                                                   list(cluster.container_ips(family="ipv6")))}
    directory = run_directory(settings["CHECKPOINT_DIR"], settings.get("RUN_NAME", ""))  # the run's own
    checkpoint_volume = modal.Volume.from_name(settings["MODAL_CHECKPOINT_VOLUME"])
    committer = CheckpointCommitter(directory / LATEST, checkpoint_volume.commit)
    code, signalled = supervise(trainer_command(int(settings["N_GPUS"]), nodes), {**os.environ, **settings},
                                committer.poll)
    checkpoint_volume.commit()
    modal.Volume.from_name(settings["MODAL_DATA_VOLUME"]).commit()
    if code == exit_codes.OK and signalled and not run_finished(directory):
        raise RuntimeError("stopped by a signal before the end (preemption): Modal reruns it and it resumes")
    if code not in (exit_codes.OK, *exit_codes.NOT_RETRYABLE):
        raise RuntimeError(f"avatarl train exited with {code}: Modal retries it and it resumes from its "
                           "checkpoint")
    return code
