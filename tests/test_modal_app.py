"""The Modal launcher, offline: the plan from settings, the app it defines, and the in-container
supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from avatarl.config import config_fields
from avatarl.config_sources import preset_settings
from avatarl.launchers import modal as modal_app
from avatarl.launchers import modal_prepare
from avatarl.launchers.modal import (
    CheckpointCommitter,
    ModalSetupError,
    collect_settings,
    in_modal_container,
    plan_modal_run,
    supervise,
    trainer_command,
)

REPO = Path(__file__).resolve().parents[1]


def test_imports_without_modal_and_says_how_to_install_it():
    code = ("import sys; sys.modules['modal'] = None\n"
            "from avatarl.launchers import modal as modal_app\n"
            "try:\n    modal_app.run_modal({})\n"
            "except modal_app.ModalSetupError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'avatarl[modal]'" in out.stdout


def test_gpu_string_timeout_and_volumes():
    plan = plan_modal_run({"GPU_TYPE": "H100", "N_GPUS": "4", "MODAL_TIMEOUT_HOURS": "1.5",
                           "MODAL_DATA_VOLUME": "corpora", "MODAL_CHECKPOINT_VOLUME": "runs"})
    assert (plan.gpu, plan.n_gpus, plan.timeout_s) == ("H100:4", 4, 5400)
    assert (plan.data_volume, plan.checkpoint_volume) == ("corpora", "runs")
    single = plan_modal_run({"GPU_TYPE": "A100-80GB"})
    assert (single.gpu, single.timeout_s) == ("A100-80GB", 24 * 3600)
    assert (single.data_volume, single.checkpoint_volume) == ("avatarl-data", "avatarl-checkpoints")


@pytest.mark.parametrize("settings,fragment", [
    ({"N_GPUS": "9"}, "N_GPUS='9': Modal attaches 1 to 8 GPUs"),
    ({"N_GPUS": "two"}, "N_GPUS='two'"),
    ({"MODAL_TIMEOUT_HOURS": "25"}, "MODAL_TIMEOUT_HOURS='25'"),
    ({"MODAL_TIMEOUT_HOURS": "0"}, "above 0 and at most 24"),
    ({"MODAL_CHECKPOINT_VOLUME": "avatarl-data"}, "must name different volumes"),
    ({"DATA_PATH": "/nonexistent/corpus.txt"}, "DATA_PATH=/nonexistent/corpus.txt: no such file here"),
])
def test_bad_settings_are_refused_with_the_fix(settings: dict[str, str], fragment: str):
    with pytest.raises(ModalSetupError) as err:
        plan_modal_run(settings)
    assert fragment in str(err.value)


def test_remote_settings_carry_no_secrets_or_host_paths():
    plan = plan_modal_run({"N_LAYER": "4", "LR": "0.001", "WANDB_API_KEY": "wk-123", "HF_TOKEN": "hf-456",
                           "CHECKPOINT_DIR": "/home/me/ckpt", "DATA_CACHE_DIR": "/home/me/.cache",
                           "CHECKPOINT_HOST_DIR": "/srv/ckpt", "TRAINING_MODE": "modal",
                           "WANDB_MODE": "offline", "PATH": "/usr/bin"})
    remote = plan.remote_settings
    assert remote["N_LAYER"] == "4" and remote["LR"] == "0.001" and remote["WANDB_MODE"] == "offline"
    assert remote["CHECKPOINT_DIR"] == "/checkpoints" and remote["DATA_CACHE_DIR"] == "/data/cache"
    assert remote["TRAINING_MODE"] == "generic" and remote["N_GPUS"] == "1"
    assert remote["MODAL_CHECKPOINT_VOLUME"] == "avatarl-checkpoints"
    assert not {"WANDB_API_KEY", "HF_TOKEN", "CHECKPOINT_HOST_DIR", "PATH"} & set(remote)
    assert "wk-123" not in repr(plan) and "hf-456" not in repr(plan)
    assert plan.local_secrets == {"WANDB_API_KEY": "wk-123", "HF_TOKEN": "hf-456"}


def test_local_corpus_is_uploaded_to_the_data_volume(tmp_path: Path):
    corpus = tmp_path / "poems.txt"
    corpus.write_text("abc")
    plan = plan_modal_run({"DATA_PATH": str(corpus)})
    assert plan.upload == (corpus, "/corpus/poems.txt")
    assert plan.remote_settings["DATA_PATH"] == "/data/corpus/poems.txt"
    on_volume = plan_modal_run({"DATA_PATH": "/data/corpus/big.txt"})
    assert on_volume.upload is None and on_volume.remote_settings["DATA_PATH"] == "/data/corpus/big.txt"


def test_collect_settings_precedence_env_over_cli_over_dotenv_over_preset(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("N_LAYER=3\nGPU_TYPE=L4\nMODAL_DATA_VOLUME=corpora\nN_EMB=96\nWANDB_MODE=\n")
    got = collect_settings(dotenv, cli={"N_LAYER": "2", "LR": "0.01"},
                           environ={"GPU_TYPE": "H100", "HOME": "/x"}, preset="cpu-small")
    cpu_small = {k: v for k, v in preset_settings("cpu-small").items()
                 if k not in ("N_LAYER", "N_EMB", "LR")}
    assert got == {**cpu_small, "N_LAYER": "2", "GPU_TYPE": "H100", "MODAL_DATA_VOLUME": "corpora",
                   "LR": "0.01", "N_EMB": "96"}, \
        "the process environment's HOME is no setting; an empty WANDB_MODE is unset"


def test_in_modal_container():
    assert in_modal_container({"MODAL_TASK_ID": "ta-123"})
    assert in_modal_container({"MODAL_IS_REMOTE": "1"})
    assert not in_modal_container({"MODAL_IS_REMOTE": "0", "HOME": "/root"})


def test_trainer_command():
    assert trainer_command(1) == ["avatarl", "train"]
    assert trainer_command(4) == ["avatarl", "launch", "--standalone", "--nproc-per-node=4", "-m", "avatarl",
                                  "train"]
    # NNODES... come from the settings
    assert trainer_command(8, nodes=2) == ["avatarl", "launch", "-m", "avatarl", "train"]


def test_a_cluster_needs_whole_hosts_and_tells_the_containers_how_many():
    plan = plan_modal_run({"GPU_TYPE": "H100", "N_GPUS": "8", "MODAL_NODES": "4"})
    assert (plan.gpu, plan.nodes, plan.remote_settings["MODAL_NODES"]) == ("H100:8", 4, "4")
    assert plan_modal_run({}).nodes == 1
    assert plan_modal_run({"MAX_RESTARTS": "2"}).nodes == 1, "one container reads what it wrote itself"
    for settings, fragment in [({"N_GPUS": "4", "MODAL_NODES": "2"}, "MODAL_NODES=2 needs N_GPUS=8"),
                               ({"N_GPUS": "8", "MODAL_NODES": "0"}, "MODAL_NODES='0': give 1 to 32"),
                               ({"MODAL_NODES": "two"}, "MODAL_NODES='two'"),
                               # a torchrun restart keeps the containers' stale volume snapshots
                               ({"N_GPUS": "8", "MODAL_NODES": "2", "MAX_RESTARTS": "1"},
                                "MAX_RESTARTS=1 with MODAL_NODES=2: set MAX_RESTARTS=0")]:
        with pytest.raises(ModalSetupError, match=fragment):
            plan_modal_run(settings)


def test_each_container_of_a_cluster_is_one_node_of_a_rendezvous_on_container_0():
    from avatarl.config import Config
    from avatarl.distributed import SNAPSHOT_SHARED_ENV
    from avatarl.launchers.torchrun import rendezvous_args

    ipv4 = modal_app.cluster_settings(2, 1, ["10.1.0.5", "10.1.0.6"], ["fd00::5", "fd00::6"])
    assert ipv4 == {"NNODES": "2", "NODE_RANK": "1", "RDZV_ENDPOINT": "10.1.0.5:29400",
                    "NODE_ADDR": "10.1.0.6", SNAPSHOT_SHARED_ENV: "1"}
    ipv6 = modal_app.cluster_settings(2, 0, [], ["fd00::5", "fd00::6"])
    assert (ipv6["RDZV_ENDPOINT"], ipv6["NODE_ADDR"]) == ("[fd00::5]:29400", "fd00::5")
    for node in (ipv4, ipv6):  # valid settings, and the launcher's c10d rendezvous follows them
        cfg = Config.of(nnodes=node["NNODES"], node_rank=int(node["NODE_RANK"]),
                        rdzv_endpoint=node["RDZV_ENDPOINT"], node_addr=node["NODE_ADDR"], n_gpus=8)
        args = rendezvous_args(cfg, ["-m", "avatarl", "train"])
        assert f"--rdzv-endpoint={node['RDZV_ENDPOINT']}" in args
        assert f"--local-addr={node['NODE_ADDR']}" in args


def test_committer_commits_once_per_new_checkpoint(tmp_path: Path):
    pointer = tmp_path / "latest"
    pointer.write_text("ckpt_00000100.pt\n")  # a resumed run: this one is already on the volume
    commits = []
    committer = CheckpointCommitter(pointer, lambda: commits.append(pointer.read_text()))
    assert not committer.poll() and commits == []
    pointer.write_text("ckpt_00000200.pt\n")
    assert committer.poll() and committer.poll() is False
    (tmp_path / "heartbeat.json").write_text("{}")  # heartbeats alone are not worth a commit
    assert not committer.poll()
    pointer.write_text("ckpt_00000300.pt\n")
    committer.poll()
    assert commits == ["ckpt_00000200.pt\n", "ckpt_00000300.pt\n"]


def test_committer_survives_a_failed_commit(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pointer = tmp_path / "latest"
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("network hiccup")

    committer = CheckpointCommitter(pointer, flaky)
    pointer.write_text("ckpt_00000001.pt\n")
    assert not committer.poll() and "network hiccup" in capsys.readouterr().err
    assert committer.poll() and len(calls) == 2


CHILD = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
pathlib.Path(sys.argv[1]).write_text("ready")
time.sleep(30)
sys.exit(7)
"""


def test_supervise_forwards_sigterm_and_reports_it(tmp_path: Path):
    ready, polls = tmp_path / "ready", []
    before = signal.getsignal(signal.SIGTERM)

    def terminate_when_ready() -> None:  # as Modal's preemption would, once the child listens
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    code, signalled = supervise([sys.executable, "-c", CHILD, str(ready)], os.environ,
                                lambda: polls.append(1), interval=0.01)
    assert (code, signalled) == (0, True)
    assert polls, "the poller never ran"
    assert signal.getsignal(signal.SIGTERM) is before, "the previous SIGTERM handler was not restored"


def test_supervise_passes_the_exit_code_through():
    code, signalled = supervise([sys.executable, "-c", "import sys; sys.exit(3)"], os.environ)
    assert (code, signalled) == (3, False)


@pytest.fixture
def recorded_modal(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """The real modal package, with its constructors wrapped to record how they were called."""
    modal = pytest.importorskip("modal")
    calls: dict[str, list] = {}

    def record(owner: object, name: str, key: str, static: bool = True) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.setdefault(key, []).append((args[0 if static else 1:], kwargs))
            return real(*args, **kwargs)

        bound = staticmethod(wrapper) if static and isinstance(owner, type) else wrapper
        monkeypatch.setattr(owner, name, bound)

    record(modal.Image, "from_dockerfile", "image")
    record(modal.Volume, "from_name", "volume")
    record(modal.Secret, "from_name", "secret_name")
    record(modal.Secret, "from_dict", "secret_dict")
    record(modal.App, "function", "function", static=False)
    record(modal, "clustered", "clustered")
    return calls


def test_app_uses_the_dockerfile_gpu_volumes_secrets_retries(recorded_modal: dict[str, list]):
    import modal

    plan = plan_modal_run({"GPU_TYPE": "H100", "N_GPUS": "4", "MODAL_TIMEOUT_HOURS": "12",
                           "MODAL_WANDB_SECRET": "wandb", "HF_TOKEN": "hf-456"})
    app, function = modal_app.build_app(plan)
    assert isinstance(app, modal.App) and isinstance(function, modal.Function)

    (args, kwargs), = recorded_modal["image"]
    assert Path(args[0]) == REPO / "docker" / "Dockerfile" and Path(kwargs["context_dir"]) == REPO
    assert sorted((a[0], k) for a, k in recorded_modal["volume"]) == [
        ("avatarl-checkpoints", {"create_if_missing": True}), ("avatarl-data", {"create_if_missing": True})]
    assert recorded_modal["secret_name"] == [(("wandb",), {})]
    assert recorded_modal["secret_dict"] == [(({"HF_TOKEN": "hf-456"},), {})]

    (_, options), = recorded_modal["function"]
    assert options["gpu"] == "H100:4" and options["timeout"] == 12 * 3600
    assert set(options["volumes"]) == {"/data", "/checkpoints"} and len(options["secrets"]) == 2
    retries = options["retries"]
    assert isinstance(retries, modal.Retries) and retries.max_retries == modal_app.RETRIES >= 1
    assert options["image"] is not None and options["include_source"] is False


def test_a_cluster_is_a_clustered_function_with_rdma(recorded_modal: dict[str, list]):
    import modal

    plan = plan_modal_run({"GPU_TYPE": "H100", "N_GPUS": "8", "MODAL_NODES": "2"})
    app, function = modal_app.build_app(plan)
    assert isinstance(function, modal.Function)
    assert recorded_modal["clustered"] == [((), {"size": 2, "rdma": True})]
    (_, options), = recorded_modal["function"]
    assert options["gpu"] == "H100:8" and set(options["volumes"]) == {"/data", "/checkpoints"}
    modal_app.build_app(plan_modal_run({"GPU_TYPE": "H100", "N_GPUS": "8"}))
    assert len(recorded_modal["clustered"]) == 1, "one container: no cluster"


def test_no_wandb_secret_when_none_is_given(recorded_modal: dict[str, list]):
    modal_app.build_app(plan_modal_run({"GPU_TYPE": "L4"}))
    (_, options), = recorded_modal["function"]
    assert options["gpu"] == "L4" and options["secrets"] == []
    assert "secret_name" not in recorded_modal and "secret_dict" not in recorded_modal


def test_run_finished_reads_the_trainers_final_heartbeat(tmp_path: Path):
    assert not modal_app.run_finished(tmp_path)  # no heartbeat yet
    (tmp_path / "heartbeat.json").write_text('{"time": 1.0, "iteration": 4, "finished": false}')
    assert not modal_app.run_finished(tmp_path)  # stopped early: Modal should retry
    (tmp_path / "heartbeat.json").write_text('{"time": 2.0, "iteration": 8, "finished": true}')
    assert modal_app.run_finished(tmp_path)
    (tmp_path / "heartbeat.json").write_text('{"iter')  # torn by hand: not finished
    assert not modal_app.run_finished(tmp_path)


# ---------------------------------------------------------------- `avatarl prepare` on Modal

PREPARE_OWT = ["--hf-dataset", "Skylion007/openwebtext", "--tokenizer", "gpt2", "--output", "/data/owt"]


def test_prepare_app_is_cpu_only_with_the_image_and_the_data_volume(recorded_modal: dict[str, list]):
    import modal

    plan = modal_prepare.plan_modal_prepare({"MODAL_DATA_VOLUME": "corpora", "HF_TOKEN": "hf-456"},
                                            PREPARE_OWT, cpu=8, memory_gb=16, timeout_hours=2)
    assert plan.args == (*PREPARE_OWT, "--num-proc", "8")  # not the container's os.cpu_count() (the host's)
    assert "hf-456" not in repr(plan)
    app, function = modal_prepare.build_prepare_app(plan)
    assert isinstance(app, modal.App) and isinstance(function, modal.Function)
    assert app.name == "avatarl-prepare"

    (args, kwargs), = recorded_modal["image"]
    assert Path(args[0]) == REPO / "docker" / "Dockerfile" and Path(kwargs["context_dir"]) == REPO
    assert [(a, k) for a, k in recorded_modal["volume"]] == [(("corpora",), {"create_if_missing": True})]
    assert recorded_modal["secret_dict"] == [(({"HF_TOKEN": "hf-456"},), {})]
    (_, options), = recorded_modal["function"]
    assert options.get("gpu") is None
    assert (options["cpu"], options["memory"], options["timeout"]) == (8, 16 * 1024, 2 * 3600)
    assert set(options["volumes"]) == {"/data"} and len(options["secrets"]) == 1
    assert isinstance(options["retries"], modal.Retries)
    assert options["retries"].max_retries == modal_prepare.RETRIES
    assert options["image"] is not None and options["include_source"] is False


def test_prepare_plan_defaults_and_an_explicit_num_proc():
    plan = modal_prepare.plan_modal_prepare({}, ["/data/corpus", "--output=/data/prepared", "--num-proc=3"])
    assert plan.args == ("/data/corpus", "--output=/data/prepared", "--num-proc=3")
    assert (plan.cpu, plan.timeout_s, plan.data_volume) == (modal_prepare.DEFAULT_CPU, 24 * 3600,
                                                            "avatarl-data")
    assert plan.local_secrets == {} and plan.named_secret == ""
    assert modal_prepare.plan_modal_prepare({"MODAL_TIMEOUT_HOURS": "3"}, PREPARE_OWT).timeout_s == 3 * 3600


@pytest.mark.parametrize("args,fragment", [
    (["--hf-dataset", "x", "--output", "/tmp/out"], "--output /tmp/out: write under /data/"),
    (["--hf-dataset", "x", "--output", "/data"], "--output /data: write under /data/"),
    (["./poems.txt", "--output", "/data/o"], "./poems.txt: not in the data volume; upload it first"),
    (["/data/c", "--output", "/data/o", "--tokenizer", "/home/me/tok"],
     "/home/me/tok: not in the data volume"),
    (["--hf-dataset", "/srv/ds", "--output", "/data/o"], "/srv/ds: not in the data volume"),
    (["/data/c", "--output", "/data/o", "--env-file", "/tmp/.env"],
     "--env-file names a file on this machine"),
    (["--hf-dataset", "x"], "arguments of `avatarl prepare` above are not valid"),
    (["--hf-dataset", "x", "--output", "/data/o", "--bogus"], "not valid"),
])
def test_prepare_plan_refuses_what_cannot_work_in_the_container(args: list[str], fragment: str):
    with pytest.raises(ModalSetupError) as err:
        modal_prepare.plan_modal_prepare({}, args)
    assert fragment in str(err.value)


def test_prepare_plan_refuses_bad_resources():
    with pytest.raises(ModalSetupError, match="above 0 and at most 24"):
        modal_prepare.plan_modal_prepare({}, PREPARE_OWT, timeout_hours=30)
    with pytest.raises(ModalSetupError, match="both must be above 0"):
        modal_prepare.plan_modal_prepare({}, PREPARE_OWT, cpu=0)


class FakeVolume:
    commits: list[str] = []

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def from_name(cls, name: str, **_: object) -> FakeVolume:
        return cls(name)

    def commit(self) -> None:
        FakeVolume.commits.append(self.name)


@dataclass
class FakeContainer:
    """What prepare_in_container did: the commands it ran, and the exit codes they are to return."""

    runs: list[tuple[list[str], dict[str, str]]] = field(default_factory=list)
    codes: list[int] = field(default_factory=lambda: [0])


@pytest.fixture
def fake_container(monkeypatch: pytest.MonkeyPatch) -> FakeContainer:
    """prepare_in_container with a stand-in modal (volumes that record commits) and a recorded subprocess."""
    fake_modal = types.ModuleType("modal")
    fake_modal.Volume = FakeVolume
    monkeypatch.setitem(sys.modules, "modal", fake_modal)
    monkeypatch.setattr(FakeVolume, "commits", [])
    container = FakeContainer()

    def fake_supervise(command: list[str], env: dict[str, str], *_: object, **__: object) -> tuple[int, bool]:
        container.runs.append((command, dict(env)))
        return container.codes.pop(0), False

    monkeypatch.setattr(modal_prepare, "supervise", fake_supervise)
    return container


def test_prepare_in_container_runs_avatarl_prepare_then_commits(fake_container: FakeContainer):
    args = [*PREPARE_OWT, "--num-proc", "8"]
    assert modal_prepare.prepare_in_container(args, "corpora") == 0
    (command, env), = fake_container.runs
    assert command == ["avatarl", "prepare", *args]
    assert env["HF_HOME"] == "/data/hf" and env["DATA_CACHE_DIR"] == "/data/cache"
    assert FakeVolume.commits == ["corpora"]


@pytest.mark.parametrize("code,retried", [(2, False), (1, True), (-15, True)])
def test_prepare_in_container_retries_only_what_a_rerun_can_fix(fake_container: FakeContainer, code: int,
                                                                retried: bool):
    fake_container.codes = [code]
    if retried:
        with pytest.raises(RuntimeError, match=f"exited with {code}"):
            modal_prepare.prepare_in_container(PREPARE_OWT, "corpora")
    else:
        assert modal_prepare.prepare_in_container(PREPARE_OWT, "corpora") == code
    assert FakeVolume.commits == ["corpora"], "the volume is committed after a failure too (the downloads)"


def test_prepare_main_splits_its_options_from_avatarl_prepares(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]):
    dotenv = tmp_path / ".env"
    dotenv.write_text("MODAL_DATA_VOLUME=corpora\nN_LAYER=3\n")
    calls = []
    monkeypatch.setattr(modal_prepare, "run_modal_prepare", lambda *a: calls.append(a) or 0)
    assert modal_prepare.main(["--cpu", "4", "--env-file", str(dotenv), *PREPARE_OWT, "--streaming"]) == 0
    after_dashes = ["--timeout-hours=2", "--", "/data/c", "--output", "/data/o", "--cpu", "9"]
    assert modal_prepare.main(after_dashes) == 0
    (settings, args, cpu, memory, hours), second = calls
    assert settings["MODAL_DATA_VOLUME"] == "corpora" and (cpu, memory, hours) == (4.0, 32.0, None)
    assert args == [*PREPARE_OWT, "--streaming"]
    assert second[1:] == (["/data/c", "--output", "/data/o", "--cpu", "9"], 16.0, 32.0, 2.0)

    monkeypatch.undo()
    assert modal_prepare.main(["/tmp/corpus", "--output", "/data/o"]) == 2
    assert "error: /tmp/corpus: not in the data volume" in capsys.readouterr().err


def test_prepare_module_runs_as_a_script_and_without_modal():
    help_out = subprocess.run([sys.executable, "-m", "avatarl.launchers.modal_prepare", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert help_out.returncode == 0 and "avatarl prepare" in help_out.stdout
    code = ("import sys; sys.modules['modal'] = None\n"
            "from avatarl.launchers import modal_prepare\n"
            f"sys.exit(modal_prepare.main({PREPARE_OWT!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "pip install 'avatarl[modal]'" in out.stderr


def test_a_cluster_container_learns_its_node_from_modal_cluster(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path):
    modal = pytest.importorskip("modal")
    import modal._cluster as cluster_state  # what Modal sets at the start of a clustered container

    monkeypatch.setattr(cluster_state, "current_cluster_context", cluster_state.ClusterContext(
        rank=1, cluster_id="cu-test", container_ips=["fd00::5", "fd00::6"],
        container_ipv4_ips=["10.1.0.5", "10.1.0.6"], fabric_ids=[]))
    monkeypatch.setattr(modal.Volume, "from_name", FakeVolume.from_name)
    monkeypatch.setattr(FakeVolume, "commits", [])
    runs: list[tuple[list[str], dict[str, str]]] = []

    def fake_supervise(command: list[str], env: dict[str, str], *_: object, **__: object) -> tuple[int, bool]:
        runs.append((command, dict(env)))
        return 0, False

    monkeypatch.setattr(modal_app, "supervise", fake_supervise)
    settings = {"MODAL_NODES": "2", "N_GPUS": "8", "CHECKPOINT_DIR": str(tmp_path),
                "MODAL_CHECKPOINT_VOLUME": "checkpoints", "MODAL_DATA_VOLUME": "data"}
    assert modal_app.train_in_container(settings) == 0
    (command, env), = runs
    assert command == ["avatarl", "launch", "-m", "avatarl", "train"]
    assert (env["NNODES"], env["NODE_RANK"], env["RDZV_ENDPOINT"]) == ("2", "1", "10.1.0.5:29400")
    assert FakeVolume.commits == ["checkpoints", "data"]


# ------------------------------------------------------ the image: AVATARL_IMAGE or docker/Dockerfile


class FakeImage:
    """modal.Image's two constructors that the launchers use, recording what they were asked for."""

    made: list[tuple[str, tuple, dict]] = []

    @classmethod
    def from_registry(cls, *args: object, **kwargs: object) -> tuple[str, tuple, dict]:
        cls.made.append(("registry", args, kwargs))
        return cls.made[-1]

    @classmethod
    def from_dockerfile(cls, *args: object, **kwargs: object) -> tuple[str, tuple, dict]:
        cls.made.append(("dockerfile", args, kwargs))
        return cls.made[-1]


@pytest.fixture
def fake_image_modal(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    fake_modal = types.ModuleType("modal")
    fake_modal.Image = FakeImage
    fake_modal.Retries = lambda **kwargs: kwargs
    monkeypatch.setattr(FakeImage, "made", [])
    return fake_modal


@pytest.mark.parametrize("value,pulled", [
    ("ghcr.io/me/avatarl:0.1.0", True), ("me/avatarl:0.1.0", True),
    ("registry.example.com:5000/ml/avatarl", True),
    ("ghcr.io/me/avatarl@sha256:" + "a" * 64, True),
    ("", False), ("avatarl:latest", False), ("avatarl:dev", False),
])
def test_avatarl_image_with_a_registry_is_pulled_else_modal_builds_the_dockerfile(
        fake_image_modal: types.ModuleType, capsys: pytest.CaptureFixture[str], value: str, pulled: bool):
    settings = {"AVATARL_IMAGE": value} if value else {}
    train_plan = plan_modal_run(settings)
    prepare_plan = modal_prepare.plan_modal_prepare(settings, PREPARE_OWT)
    assert train_plan.image == prepare_plan.image == value
    assert "AVATARL_IMAGE" not in train_plan.remote_settings, "not a setting of the trainer"
    options = modal_app.function_options(fake_image_modal, 60, 1, "", {}, train_plan.image)
    (kind, args, kwargs), = FakeImage.made
    assert options["image"] == FakeImage.made[0] and options["include_source"] is False
    said = capsys.readouterr().err
    if pulled:
        assert (kind, args, kwargs) == ("registry", (value,), {})
        assert f"Modal image: {value} (AVATARL_IMAGE), pulled from its registry" in said
    else:
        assert kind == "dockerfile" and Path(args[0]) == REPO / "docker" / "Dockerfile"
        assert Path(kwargs["context_dir"]) == REPO and "built by Modal" in said
        # compose's own tag (what `make` exports by default) is no mistake; another local tag gets the hint
        assert ("cannot pull" in said) == (value == "avatarl:dev")


@pytest.mark.parametrize("value", ["ghcr.io/Me/avatarl:0.1", "avatarl latest", "ghcr.io/me/avatarl:",
                                   "'x/y'"])
def test_an_avatarl_image_that_is_no_image_reference_fails_the_plan(value: str):
    from avatarl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"AVATARL_IMAGE=.* is not an image reference"):
        plan_modal_run({"AVATARL_IMAGE": value})
    with pytest.raises(ConfigError, match=r"AVATARL_IMAGE=.* is not an image reference"):
        modal_prepare.plan_modal_prepare({"AVATARL_IMAGE": value}, PREPARE_OWT)


def test_the_real_modal_app_pulls_avatarl_image(recorded_modal: dict[str, list],
                                                monkeypatch: pytest.MonkeyPatch):
    import modal

    pulls = []
    real = modal.Image.from_registry
    monkeypatch.setattr(modal.Image, "from_registry",
                        staticmethod(lambda *a, **k: pulls.append((a, k)) or real(*a, **k)))
    plan = plan_modal_run({"GPU_TYPE": "H100", "AVATARL_IMAGE": "ghcr.io/me/avatarl:0.1"})
    _, function = modal_app.build_app(plan)
    assert isinstance(function, modal.Function)
    assert pulls == [(("ghcr.io/me/avatarl:0.1",), {})]
    assert "image" not in recorded_modal, "no Dockerfile build"
    (_, options), = recorded_modal["function"]
    assert isinstance(options["image"], modal.Image)


# Settings the plan rewrites for the container: the Modal mounts, the GPU count, the hand-over.
PLANNED = {"CHECKPOINT_DIR", "DATA_CACHE_DIR", "N_GPUS", "TRAINING_MODE", "DATA_PATH"}


def test_the_modal_plan_forwards_every_setting_with_its_value(tmp_path: Path):
    """Each setting travels to the container as set here (TOKENIZER was once dropped for holding "TOKEN"),
    except the ones the plan rewrites for the container."""
    numbers = {"N_GPUS": "2", "MAX_RESTARTS": "0", "MODAL_NODES": "1"}
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"{name}={numbers.get(name, 'value-of-' + name)}\n" for name in config_fields())
                      .replace("DATA_PATH=value-of-DATA_PATH", "DATA_PATH=/data/corpus.txt"))
    plan = plan_modal_run(collect_settings(dotenv, environ={}))
    remote = plan.remote_settings
    assert {name: remote.get(name) for name in config_fields() if name not in PLANNED} == \
        {name: numbers.get(name, f"value-of-{name}") for name in config_fields() if name not in PLANNED}
    assert remote["TOKENIZER"] == "value-of-TOKENIZER" and remote["N_GPUS"] == "2"
    assert (remote["CHECKPOINT_DIR"], remote["TRAINING_MODE"], remote["DATA_PATH"]) == \
        ("/checkpoints", "generic", "/data/corpus.txt")


def test_other_dotenv_variables_reach_the_container_and_their_secrets_travel_as_a_secret(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WANDB_ENTITY=my-team\nOMP_NUM_THREADS=4\nOPENAI_API_KEY=sk-1\nCUDA_VISIBLE_DEVICES=1\n"
                      "TIKTOKEN_CACHE_DIR=/home/me/tiktoken\nWANDB_MODE=\nTOKENIZER=gpt2\nMODAL_WANDB_SECRET=wb\n")
    plan = plan_modal_run(collect_settings(dotenv, environ={"WANDB_API_KEY": "wk-1", "PATH": "/usr/bin"}))
    remote = plan.remote_settings
    carried = (remote["WANDB_ENTITY"], remote["OMP_NUM_THREADS"], remote["TOKENIZER"])
    assert carried == ("my-team", "4", "gpt2")
    assert not {"CUDA_VISIBLE_DEVICES", "TIKTOKEN_CACHE_DIR", "WANDB_MODE", "PATH", "OPENAI_API_KEY",
                "WANDB_API_KEY", "MODAL_WANDB_SECRET"} & set(remote), "host paths, empty values, secrets"
    assert plan.local_secrets == {"OPENAI_API_KEY": "sk-1", "WANDB_API_KEY": "wk-1"}
    assert plan.named_secret == "wb" and "sk-1" not in repr(plan)
