"""What the tests share: the repository path, the tiny preset, running the real CLI and
torchrun as subprocesses (waiting for files, killing whole jobs), comparing checkpoints, and a tiny
Hugging Face model and tokenizer made offline. Fixtures built on these live in conftest.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avatarl.checkpoint import find_resume_checkpoint, load_checkpoint
from avatarl.config import LAUNCHER_NAMES, config_fields
from avatarl.config_sources import preset_settings
from avatarl.launchers.torchrun import child_pids
from avatarl.progress import PROCESS_METRICS
from avatarl.run_dir import METRICS
from avatarl.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]

# A model and budget small enough for 2 CPU cores (avatarl/presets/tiny.env); tests override what they need.
TINY = preset_settings("tiny")


def clean_env(**settings: str) -> dict[str, str]:
    """The process environment without any avatarl setting, plus `settings`."""
    names = set(config_fields()) | LAUNCHER_NAMES
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("AVATARL_TEST")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **settings: str) -> subprocess.CompletedProcess:
    """`python -m avatarl ARGS` in `cwd` with clean_env(**settings); output captured as text."""
    return subprocess.run([sys.executable, "-m", "avatarl", *args], cwd=cwd, env=clean_env(**settings),
                          capture_output=True, text=True, timeout=timeout)


TIMEOUT = 120.0  # seconds for one subprocess: generous, the 2 cores are shared with other work
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
TRAIN = [sys.executable, "-m", "avatarl", "train"]
# `avatarl train` with the faults of AVATARL_TEST_NAN_ITERS / AVATARL_TEST_SLOW_WRITE (tests/fault_entry.py):
# after python or torchrun, or as the training command of `avatarl launch`.
FAULTY = ["-m", "tests.fault_entry", "train"]
FAULTY_TRAIN = [sys.executable, *FAULTY]
# runs until it is stopped
LONG = dict(TOTAL_ITERS=100_000, CHECKPOINT_INTERVAL=100_000, LOG_INTERVAL=2, EVAL_INTERVAL=1000)
STOPPED = re.compile(r"stop requested: checkpoint saved at iteration (\d+)")


def settings(tmp_path: Path, corpus: Path, name: str = "run", **overrides: Any) -> dict[str, str]:
    """TINY settings for a run directory `tmp_path / name`, with overrides (values turned into text)."""
    return {**TINY, "DATA_PATH": str(corpus), "CHECKPOINT_DIR": str(tmp_path / name),
            **{key: str(value) for key, value in overrides.items()}}


@dataclass
class Job:
    """A started subprocess whose stdout/stderr go to files (no pipe can fill up and block it)."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_job(self)
            raise AssertionError(f"timed out after {timeout}s\n{self.stdout}\n{self.stderr}") from None


def start(command: list[str], env: dict[str, Any], cwd: Path, tag: str = "job") -> Job:
    """Start `command` in its own session with clean_env + `env`; output in unique files under `cwd`.
    Faults (AVATARL_TEST_*) need a FAULTY command: avatarl ignores them, and the test would pass unfaulted."""
    environ = clean_env(**{k: str(v) for k, v in env.items()})
    if "tests.fault_entry" in command:
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    else:
        faults = sorted(k for k in environ if k.startswith("AVATARL_TEST"))
        assert not faults, f"{faults} are read by tests/fault_entry.py only: run {command} as FAULTY"
    fd, name = tempfile.mkstemp(dir=cwd, prefix=f"{tag}-", suffix=".out")
    out, err = Path(name), Path(name).with_suffix(".err")
    with os.fdopen(fd, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(command, cwd=cwd, env=environ, stdout=stdout, stderr=stderr,
                                start_new_session=True)
    return Job(proc, out, err)


def run(command: list[str], env: dict[str, Any], cwd: Path, tag: str = "job") -> Job:
    job = start(command, env, cwd, tag)
    job.wait()
    return job


def wait_for(condition: Callable[[], Any], job: Job, timeout: float = TIMEOUT, what: str = "") -> Any:
    """Poll `condition` every 10 ms until it is truthy; fail if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if job.proc.poll() is not None:
            value = condition()
            if value:
                return value
            raise AssertionError(f"the job exited ({job.proc.returncode}) before {what}\n"
                                 f"{job.stdout}\n{job.stderr}")
        time.sleep(0.01)
    kill_job(job)
    raise AssertionError(f"timed out waiting for {what}\n{job.stdout}\n{job.stderr}")


def kill_job(job: Job, signum: int = signal.SIGKILL) -> None:
    """Signal a job and, for torchrun, its workers (they run in sessions of their own): a lost machine."""
    workers = child_pids(job.proc.pid)
    for pid in [job.proc.pid, *workers]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    job.proc.wait(timeout=TIMEOUT)
    for pid in workers:  # reap-free wait: the workers were reparented, poll until they are gone
        deadline = time.monotonic() + TIMEOUT
        while (Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)
               and time.monotonic() < deadline):
            time.sleep(0.01)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "zombie"


def metric_records(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir / METRICS)


def newest_state(run_dir: Path) -> dict[str, Any]:
    path = find_resume_checkpoint(run_dir)
    assert path is not None, f"no valid checkpoint in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    return load_checkpoint(path)


def assert_identical(a: Any, b: Any, where: str = "checkpoint") -> int:
    """Assert two loaded checkpoints (or parts) are equal, tensors bit for bit. Returns tensor bytes
    compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), (f"{where} differs "
                                   f"(max abs diff {(a.double() - b.double()).abs().max():.3g})")
        return a.numel() * a.element_size()
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        return sum(assert_identical(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        return sum(assert_identical(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


def compare_runs(straight: dict[str, Any], resumed: dict[str, Any]) -> int:
    """Every saved tensor (model, optimizer, old policy, scaler, RNG and sampler of each rank, metric sums)
    and every counter must match; only the run directory in the saved config may differ."""
    assert straight["config"].pop("checkpoint_dir") != resumed["config"].pop("checkpoint_dir")
    return assert_identical(straight, resumed)


def kill_right_after_checkpoint(command: list[str], env: dict[str, str], cwd: Path, iteration: int) -> Job:
    """Start a run whose writes are slowed down, SIGKILL it (all processes) while it writes the `latest`
    pointer that follows checkpoint `iteration`: the run cannot have stepped past it."""
    run_dir = Path(env["CHECKPOINT_DIR"])
    job = start(command, {**env, "AVATARL_TEST_SLOW_WRITE": "1.5"}, cwd, "killed")
    wait_for(lambda: (run_dir / f"ckpt_{iteration:08d}.pt").is_file(), job, what=f"checkpoint {iteration}")
    kill_job(job)
    assert job.proc.returncode == -signal.SIGKILL
    return job


def check_equivalence(command: list[str], tmp_path: Path, corpus: Path, **extra: Any) -> int:
    """N iterations straight vs N/2 -> SIGKILL -> resume to N: every saved tensor and the second half's
    logged metrics must match. Returns the tensor bytes compared."""
    n = 8
    # Cut inside a log interval, an old-policy interval and a KL-controller interval (KL_UPDATE_INTERVAL=5),
    # with an unsaturated controller (measured KL ~5.4 nats/char): its update at step 5 then depends on every
    # rank's partial KL sums, which the checkpoint holds as the objective's rank state.
    common = dict(TOTAL_ITERS=n, CHECKPOINT_INTERVAL=n // 2, LOG_INTERVAL=3, EVAL_INTERVAL=4,
                  OLD_POLICY_INTERVAL=3, KL_WARM=0, BETA_KL=0.01, KL_TARGET=5.0, **extra)
    straight_env = settings(tmp_path, corpus, "straight", **common)
    resumed_env = settings(tmp_path, corpus, "resumed", **common)
    straight = start(command, straight_env, tmp_path, "straight")  # runs while the other leg is killed
    kill_right_after_checkpoint(command, resumed_env, tmp_path, n // 2)
    resumed_dir = Path(resumed_env["CHECKPOINT_DIR"])
    assert not (resumed_dir / f"ckpt_{n:08d}.pt").exists()
    half = load_checkpoint(resumed_dir / f"ckpt_{n // 2:08d}.pt")
    resume = run(command, resumed_env, tmp_path, "resume")
    assert resume.proc.returncode == 0, resume.stdout + resume.stderr
    assert f"ckpt_{n // 2:08d}.pt at iteration {n // 2}" in resume.stdout
    assert straight.wait() == 0, straight.stdout + straight.stderr
    a = load_checkpoint(Path(straight_env["CHECKPOINT_DIR"]) / f"ckpt_{n:08d}.pt")
    b = load_checkpoint(resumed_dir / f"ckpt_{n:08d}.pt")
    assert a["iteration"] == b["iteration"] == n
    changed = [k for k in half["model"] if not torch.equal(half["model"][k], b["model"][k])]
    assert changed, "the second half trains"
    compared = compare_runs(a, b)
    logged_a = [r for r in metric_records(Path(straight_env["CHECKPOINT_DIR"])) if r["iter"] > n // 2]
    logged_b = [r for r in metric_records(resumed_dir) if r["iter"] > n // 2]
    for ra, rb in zip(logged_a, logged_b, strict=True):  # the metrics of the second half agree too
        for timing in PROCESS_METRICS:  # measurements of the process, not of the run
            ra.pop(timing, None), rb.pop(timing, None)
        assert ra == rb
    return compared


def training(run_dir: Path, past: int = 4) -> Callable[[], bool]:
    """A condition: the run has logged training metrics at iteration `past` or later."""
    return lambda: any(r["iter"] >= past for r in metric_records(run_dir) if "reward_mean" in r)


def stopped_at(stdout: str, run_dir: Path) -> int:
    """The iteration of the stop message, checked against the newest checkpoint on disk."""
    found = STOPPED.findall(stdout)
    assert len(found) == 1, stdout
    iteration = int(found[0])
    saved = newest_state(run_dir)
    assert saved["iteration"] == iteration and len(saved["rank_states"]) == 2
    return iteration


def worker_with_rank(launcher_pid: int, rank: int) -> int:
    for pid in child_pids(launcher_pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


LAUNCH = [sys.executable, "-m", "avatarl", "launch"]  # the avatarl launcher around torchrun


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous endpoint)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (an `avatarl launch`: launcher, torchrun, workers)."""
    return [pid, *(p for child in child_pids(pid) for p in process_tree(child))]


def kill_tree(job: Job) -> list[int]:
    """SIGKILL a job and every descendant at once, as a machine that loses power. Returns their pids."""
    pids = process_tree(job.proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.proc.wait(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid) for pid in pids[1:]):
        assert time.monotonic() < deadline, f"processes {pids} outlived SIGKILL"
        time.sleep(0.01)
    return pids


# The text the tiny Hugging Face tokenizer is trained on (and the HF reference tests score).
HF_LINES = ["First Citizen:\nBefore we proceed any further, hear me speak.",
            "All:\nSpeak, speak.", "You are all resolved rather to die than to famish?",
            "We know't, we know't.", "Let us kill him, and we'll have corn at our own price."]


def make_tiny_hf_model(directory: Path) -> Path:
    """A byte-level BPE (400 tokens, trained here) and a 1-layer GPT-2 with random weights, saved with
    save_pretrained into `directory`: loadable by name like a hub model, without any network."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(HF_LINES * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=128, vocab_size=len(fast),
                        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


# Single bytes and a few merges: a tiktoken rank table small enough to write by hand, loaded like GPT-2's.
TINY_RANKS = [bytes([i]) for i in range(256)] + [
    b"th", b"he", b"the", b" t", b" the", b"in", b"er", b"an", b" a"]


def write_rank_file(path: Path) -> Path:
    """A .tiktoken rank file (base64 token, rank per line) holding TINY_RANKS."""
    import base64

    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(TINY_RANKS))
    path.write_text("".join(lines))
    return path
