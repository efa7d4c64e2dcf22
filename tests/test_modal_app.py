"""The Modal launcher, offline: the plan from settings, the app it defines, and the in-container supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from avatarl.launchers import modal as modal_app
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
                           "CHECKPOINT_HOST_DIR": "/srv/ckpt", "TRAINING_MODE": "modal", "WANDB_MODE": "offline",
                           "PATH": "/usr/bin"})
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


def test_collect_settings_precedence_env_over_dotenv_over_cli(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("N_LAYER=3\nGPU_TYPE=L4\nMODAL_DATA_VOLUME=corpora\n")
    got = collect_settings(dotenv, cli={"N_LAYER": "2", "LR": "0.01"}, environ={"GPU_TYPE": "H100", "HOME": "/x"})
    assert got == {"N_LAYER": "3", "GPU_TYPE": "H100", "MODAL_DATA_VOLUME": "corpora", "LR": "0.01"}


def test_in_modal_container():
    assert in_modal_container({"MODAL_TASK_ID": "ta-123"})
    assert in_modal_container({"MODAL_IS_REMOTE": "1"})
    assert not in_modal_container({"MODAL_IS_REMOTE": "0", "HOME": "/root"})


def test_trainer_command():
    assert trainer_command(1) == ["avatarl", "train"]
    assert trainer_command(4) == ["avatarl", "launch", "--standalone", "--nproc-per-node=4", "-m", "avatarl", "train"]


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
    code, signalled = supervise([sys.executable, "-c", CHILD, str(ready)], os.environ, lambda: polls.append(1),
                                interval=0.01)
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

        monkeypatch.setattr(owner, name, staticmethod(wrapper) if static and isinstance(owner, type) else wrapper)

    record(modal.Image, "from_dockerfile", "image")
    record(modal.Volume, "from_name", "volume")
    record(modal.Secret, "from_name", "secret_name")
    record(modal.Secret, "from_dict", "secret_dict")
    record(modal.App, "function", "function", static=False)
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
