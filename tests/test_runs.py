"""Runs by name (RUN_NAME: one directory under CHECKPOINT_DIR each, resumed by a restart, a finished one
says so), wandb without prompts (one wandb run per run directory, its id kept there), and the progress of
every log line (iter/total, tokens/s, ETA; MFU and peak GPU memory on CUDA)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avatarl import progress as P
from avatarl import tracking
from avatarl.config import Config, ConfigError
from avatarl.model import GPT, GPTConfig
from avatarl.objectives import Method
from avatarl.run_dir import HEARTBEAT, WANDB_ID, clear_run, referee_path, run_dir, run_directory
from tests.helpers import metric_records, run_cli


def test_run_name_is_a_directory_under_checkpoint_dir(tmp_path: Path):
    legacy = Config.of(checkpoint_dir=str(tmp_path))
    named = Config.of(checkpoint_dir=str(tmp_path), run_name="exp1")
    assert run_dir(legacy) == tmp_path and run_dir(legacy, "referee") == tmp_path / "referee"
    assert run_dir(named) == tmp_path / "exp1" and run_dir(named, "referee") == tmp_path / "exp1" / "referee"
    assert referee_path(named) == tmp_path / "exp1" / "referee.pt"  # the referee belongs to its run
    assert referee_path(named.replace(referee_path="/data/ref.pt")) == Path("/data/ref.pt")
    assert run_directory("~/ck", "b") == Path("~/ck").expanduser() / "b"


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "referee", "x" * 101, "with space"])
def test_run_name_must_be_one_plain_directory_name(name: str):
    with pytest.raises(ConfigError, match="RUN_NAME=.* is not allowed"):
        Config.of(run_name=name)


def test_run_name_accepts_ordinary_names():
    assert Config.of(run_name="exp-1.lr_3e-4").run.run_name == "exp-1.lr_3e-4"


def test_bad_run_name_is_one_line_and_exit_2(tmp_path: Path):
    result = run_cli(["config"], tmp_path, RUN_NAME="../elsewhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "RUN_NAME" in line]
    assert len(lines) == 1 and "'../elsewhere' is not allowed" in lines[0]


def test_wandb_name_defaults_to_run_name():
    assert tracking.wandb_run_name(Config.of(run_name="exp1"), "student") == "exp1"
    assert tracking.wandb_run_name(Config.of(run_name="exp1"), "referee") == "exp1-referee"
    assert tracking.wandb_run_name(Config.of(run_name="exp1", wandb_name="mine"), "student") == "mine"
    assert tracking.wandb_run_name(Config.of(), "student") == ""  # wandb generates one
    assert tracking.wandb_run_name(Config.of(), "referee") == ""


@pytest.fixture
def no_wandb_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment without any wandb credentials: no key, an empty netrc."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_wandb_needs_a_login_only_online(no_wandb_login: Path, monkeypatch: pytest.MonkeyPatch):
    assert "no wandb login" in tracking.wandb_blocker()
    for mode in ("offline", "disabled", "dryrun", "OFFLINE"):
        monkeypatch.setenv("WANDB_MODE", mode)
        assert tracking.wandb_blocker() is None, mode
    monkeypatch.setenv("WANDB_MODE", "online")
    assert "no wandb login" in tracking.wandb_blocker()
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert "WANDB_MODE='sometimes' is not a wandb mode" in tracking.wandb_blocker()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_blocker() is None


def test_wandb_login_from_netrc_of_the_configured_host(no_wandb_login: Path, monkeypatch: pytest.MonkeyPatch):
    no_wandb_login.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert tracking.wandb_blocker() is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a login for another host is none here
    assert "no wandb login" in tracking.wandb_blocker()
    no_wandb_login.write_text("machine wandb.example.org login user password " + "k" * 40 + "\n")
    assert tracking.wandb_blocker() is None


def test_start_wandb_without_login_never_calls_wandb(no_wandb_login: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, caplog: pytest.LogCaptureFixture):
    wandb = pytest.importorskip("wandb")

    def refuse(*args, **kwargs):
        raise AssertionError("wandb.init would ask for a login")

    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setenv("WANDB_MODE", "")  # an empty .env line: unset, not wandb's validation error
    with caplog.at_level(logging.WARNING, logger="avatarl"):
        assert tracking.start_wandb("p", "exp1", {}, tmp_path) is None
    [record] = [r for r in caplog.records if "wandb" in r.getMessage()]
    assert "no wandb login" in record.getMessage() and "metrics.jsonl only" in record.getMessage()
    assert not (tmp_path / WANDB_ID).exists()


def test_wandb_id_is_kept_in_the_run_directory_until_overwrite(tmp_path: Path):
    ids = iter(["first1", "second2"])
    assert tracking.wandb_run_id(tmp_path, lambda: next(ids)) == "first1"
    assert (tmp_path / WANDB_ID).read_text() == "first1"
    assert tracking.wandb_run_id(tmp_path, lambda: next(ids)) == "first1"  # a restart: the same wandb run
    clear_run(tmp_path)  # OVERWRITE=true starts a new run, and a new wandb run
    assert tracking.wandb_run_id(tmp_path, lambda: next(ids)) == "second2"


def test_offline_wandb_restarts_continue_one_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for iteration in (2, 4):  # two processes of one run: the second resumes the first's wandb run
        logger = tracking.make_logger(True, tmp_path, True, "avatarl-test", "exp1", {"lr": 1e-3},
                                      total_iters=4)
        assert logger.wandb_run is not None
        logger.log({"loss": 1.0 / iteration}, iteration)
        logger.finish()
    run_id = (tmp_path / WANDB_ID).read_text()
    offline = sorted(tmp_path.glob("wandb/offline-run-*"))
    # wandb names a run's folder offline-run-<time>-<id>, adding -1 when two starts share a second
    pattern = rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?"
    assert len(offline) == 2 and all(re.fullmatch(pattern, path.name) for path in offline), offline
    data = b"".join(path.read_bytes() for path in tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert b"exp1" in data  # the wandb name is the run's name


def test_format_metrics_leads_with_progress():
    line = tracking.format_metrics({"iter": 40, "tokens_per_s": 12345.6, "eta_s": 3725.0, "mfu": 0.3141,
                                    "peak_gpu_memory_mib": 12288.4, "loss": 0.52345}, total_iters=1000)
    assert line == ("iter 40/1000 | 12,346 tokens/s | ETA 1h02m | MFU 31.4% | GPU memory 12,288 MiB | "
                    "loss=0.5234")
    assert tracking.format_metrics({"iter": 0, "val_ce": 4.5}, 10) == "iter 0/10 | val_ce=4.5"
    assert tracking.format_metrics({"iter": 3, "x": 1}) == "iter 3 | x=1"


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59.0, "59s"), (61.0, "1m01s"), (7199.0, "1h59m"),
                                           (float("inf"), "unknown")])
def test_duration(seconds: float, text: str):
    assert tracking.duration(seconds) == text


def tiny_gpt() -> GPT:
    # F(T) = 6 N + 12 L C T = 6 * 832 + 96 T (tests/test_bench_throughput.py counts N = 832)
    return GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_emb=8, use_flash_attn=False))


def fake_run(method: Method, device: str = "cpu", referee: torch.nn.Module | None = None, iteration: int = 0,
             world_size: int = 1) -> SimpleNamespace:
    cfg = Config.of(n_layer=1, n_head=2, n_emb=8, context_len=3, horizon=2, k_samples=2, total_iters=100,
                    gpu_type="A100")
    window = 3 + 2 if method == Method.GRPO else 3 + 1
    objective = SimpleNamespace(method=method, window_len=window, **({"referee": referee} if referee else {}))
    return SimpleNamespace(cfg=cfg, objective=objective, raw_model=tiny_gpt(),
                           state=SimpleNamespace(iteration=iteration),
                           info=SimpleNamespace(device=torch.device(device), world_size=world_size))


def test_flops_per_token_of_each_method():
    # C=3, K=2, H=2: autoregressive GRPO covers C + K(H-1) = 5 tokens at S = 4 with 4/3 F(4),
    # F(4) = 4992 + 384,
    # over a window of C + H = 5 corpus tokens
    assert P.flops_per_token(fake_run(Method.GRPO)) == pytest.approx(4 / 3 * 5376 * 5 / 5)
    # every next-token method: F(3) per position, C = 3 positions per window of C + 1 = 4 tokens
    for method in (Method.GRPO_TEACHER_FORCED, Method.SUPERVISED):
        assert P.flops_per_token(fake_run(method)) == pytest.approx(5280 * 3 / 4)
    # AvataRL adds the referee's forward, F(3)/3 for an avatarl GPT, 2 N for another model (here N = 10)
    with_referee = fake_run(Method.AVATARL, referee=tiny_gpt())
    assert P.flops_per_token(with_referee) == pytest.approx((5280 + 1760) * 3 / 4)
    assert P.flops_per_token(fake_run(Method.AVATARL, referee=torch.nn.Linear(3, 2, bias=False))) == \
        pytest.approx((5280 + 12) * 3 / 4)


def test_progress_on_cpu_has_eta_but_no_gpu_metrics(monkeypatch: pytest.MonkeyPatch):
    now = [100.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: now[0])
    run = fake_run(Method.GRPO, iteration=20)
    pace = P.Progress(run, bar=False)
    pace.start(run)
    now[0] = 110.0  # 5 iterations in 10 s
    assert pace.measure(25, 1000.0) == {"eta_s": pytest.approx((100 - 25) / (5 / 10.0))}  # 0.5 it/s


def test_progress_on_cuda_reports_mfu_from_the_measured_rate(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    run = fake_run(Method.SUPERVISED, device="cuda", world_size=2)
    measured = P.Progress(run, bar=False).measure(10, 4.0e9)
    # 4e9 tokens/s x 3960 FLOPs/token over 2 GPUs of 989 TFLOP/s (H100 from the name, not GPU_TYPE=A100)
    assert measured["mfu"] == pytest.approx(4.0e9 * 3960 / (2 * 989e12))
    assert measured["peak_gpu_memory_mib"] == 3072.0 and measured["eta_s"] > 0


def train(tmp_path: Path, env: dict[str, str], **overrides: str):
    return run_cli(["train"], tmp_path, timeout=300, **{**env, **overrides})


def test_named_runs_live_apart_and_a_finished_one_says_so(tiny_env: dict[str, str], tmp_path: Path):
    root = Path(tiny_env["CHECKPOINT_DIR"])
    first = train(tmp_path, tiny_env, RUN_NAME="exp1")
    assert first.returncode == 0, first.stderr
    assert f"Run 'exp1' ({root / 'exp1'}) starts at iteration 0" in first.stdout
    assert (root / "exp1" / "ckpt_00000004.pt").is_file() and not list(root.glob("ckpt_*"))
    # without a TTY (a pipe here, as in compose, k8s or Modal logs) every training line is a progress line
    lines = [line for line in first.stderr.splitlines() if "reward_mean=" in line]
    assert len(lines) == 2 and all(" tokens/s | ETA " in line for line in lines)
    assert "iter 2/4 |" in lines[0] and "iter 4/4 |" in lines[1] and "MFU" not in lines[0]  # a CPU: no MFU
    logged = [r for r in metric_records(root / "exp1") if "reward_mean" in r]
    assert all(r["tokens_per_s"] > 0 and r["eta_s"] >= 0 for r in logged) and logged[-1]["eta_s"] == 0

    records = metric_records(root / "exp1")
    again = train(tmp_path, tiny_env, RUN_NAME="exp1")  # a retry of the same command
    assert again.returncode == 0, again.stderr
    [finished] = [line for line in again.stderr.splitlines() if "is finished" in line]
    assert " WARNING Run 'exp1' (" in finished and "iteration 4 (TOTAL_ITERS=4), nothing to do" in finished
    assert "set a new RUN_NAME" in finished
    assert metric_records(root / "exp1") == records, "a finished run trains and logs nothing"
    assert json.loads((root / "exp1" / HEARTBEAT).read_text())["finished"] is True

    other = train(tmp_path, tiny_env, RUN_NAME="exp2", TOTAL_ITERS="2")
    assert other.returncode == 0, other.stderr
    assert "resumed" not in other.stdout and (root / "exp2" / "ckpt_00000002.pt").is_file()
    health = run_cli(["health"], tmp_path, CHECKPOINT_DIR=str(root), RUN_NAME="exp2")
    assert health.returncode == 0 and "iteration 2/2" in health.stdout, health.stdout + health.stderr


def test_resume_with_changed_settings_warns(tiny_env: dict[str, str], tmp_path: Path):
    assert train(tmp_path, tiny_env, RUN_NAME="exp1").returncode == 0
    resumed = train(tmp_path, tiny_env, RUN_NAME="exp1", TOTAL_ITERS="6", LR="0.001", LOG_INTERVAL="3",
                    CHECKPOINT_DIR=tiny_env["CHECKPOINT_DIR"] + "/.")  # the same place spelled otherwise
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if " WARNING " in line]
    assert any("Setting changed since the checkpoint: TOTAL_ITERS: 4 -> 6" in line for line in warnings)
    assert any("Setting changed since the checkpoint: LR: 0.0003 -> 0.001" in line for line in warnings)
    assert any("continues from iteration 4 with 2 changed setting(s)" in line and "RUN_NAME" in line
               for line in warnings)
    info = [line for line in resumed.stderr.splitlines() if " INFO " in line]
    assert any("LOG_INTERVAL: 2 -> 3" in line for line in info)  # logging only: not a warning
    assert "CHECKPOINT_DIR" not in resumed.stderr  # where the run lives is not a setting it learns by
