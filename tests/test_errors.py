"""User errors and their exit codes (errors.py), the one entry wrapper, where a run's end saves
(periodic.Checkpoints), and the test-only fault entry (tests/fault_entry.py) the reliability tests use."""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avatarl import checkpoint, exit_codes, periodic, trainer
from avatarl.checkpoint import CheckpointError, RunDirectoryBusy
from avatarl.cli import main as avatarl_main
from avatarl.config import ConfigError
from avatarl.errors import (
    Aborted,
    AvatarlError,
    InputError,
    NonFiniteSteps,
    PeerLost,
    print_error,
    run_entry,
)
from tests import fault_entry


@pytest.mark.parametrize("error,code", [
    (ConfigError(["LR=-1: must be above 0."]), exit_codes.CONFIG),
    (InputError(["source nowhere.txt: no such file."]), exit_codes.CONFIG),
    (CheckpointError("ckpt_00000004.pt is corrupted or truncated."), exit_codes.CONFIG),
    (RunDirectoryBusy("CHECKPOINT_DIR=/x is in use by a running trainer."), exit_codes.BUSY),
    (NonFiniteSteps("3 consecutive non-finite steps."), exit_codes.BAD_STEPS),
    (PeerLost("rank 0 lost its peers."), exit_codes.FAILED),
    (Aborted("aborted by a second interrupt."), exit_codes.ABORTED),
])
def test_each_error_ends_the_command_with_its_code_and_its_lines(error, code, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def command() -> int:
        raise error

    assert run_entry(command) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "".join(f"error: {line}\n" for line in error.problems)


def test_problems_are_lines_from_a_list_or_a_text_and_survive_pickling():
    assert ConfigError(["a", "", "b"]).problems == ["a", "b"]
    assert CheckpointError("first\nsecond").problems == ["first", "second"]
    assert str(ConfigError(["a", "b"])) == "a\nb"
    copy = pickle.loads(pickle.dumps(InputError(["one", "two"])))  # from a worker of `avatarl prepare`
    assert type(copy) is InputError and copy.problems == ["one", "two"]
    # what callers catch: a setting's error is a ValueError, a checkpoint's a RuntimeError, both AvatarlErrors
    assert isinstance(InputError("x"), ConfigError) and isinstance(InputError("x"), ValueError)
    assert isinstance(CheckpointError("x"), RuntimeError)
    assert issubclass(RunDirectoryBusy, CheckpointError) and issubclass(ConfigError, AvatarlError)


def test_other_ranks_stay_quiet_unless_the_error_differs_by_rank(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    print_error(ConfigError(["the same on every rank"]))
    assert capsys.readouterr().err == ""
    print_error(PeerLost("rank 1 lost its peers: rank 0 did not answer"))
    assert capsys.readouterr().err == "error: rank 1 lost its peers: rank 0 did not answer\n"
    monkeypatch.setenv("RANK", "0")
    print_error(ConfigError(["the same on every rank"]))
    assert capsys.readouterr().err == "error: the same on every rank\n"


def test_a_return_value_is_the_code_and_an_interrupt_is_130(capsys):
    assert run_entry(lambda: None) == exit_codes.OK
    assert run_entry(lambda: exit_codes.FAILED) == exit_codes.FAILED

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_entry(interrupted) == exit_codes.ABORTED
    assert capsys.readouterr().err == "error: interrupted.\n"


def test_other_exceptions_are_bugs_and_keep_their_traceback():
    def broken() -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_entry(broken)


def test_the_cli_reports_bad_settings_in_lines_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    assert avatarl_main(["config", "--lr", "-1", "--n-layer", "0"]) == exit_codes.CONFIG
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("error: ") for line in lines), err
    assert "LR" in err and "N_LAYER" in err and "Traceback" not in err


def fake_run(iteration: int, save_final: bool = False) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(iteration=iteration),
                           cfg=SimpleNamespace(run=SimpleNamespace(save_final_checkpoint=save_final,
                                                                   save_intermediate_checkpoints=True,
                                                                   checkpoint_interval=100)))


@pytest.mark.parametrize("outcome,save_final,saves", [
    (periodic.STOPPED, False, True),      # a stop always saves: the run continues from it
    (periodic.BAD_STEPS, False, True),    # the last good weights
    (periodic.COMPLETED, False, False),
    (periodic.COMPLETED, True, True),
])
def test_every_save_at_the_end_is_the_checkpoint_duty(outcome, save_final, saves, monkeypatch, capsys):
    saved = []
    monkeypatch.setattr(periodic, "save_run", lambda run: saved.append(run.state.iteration))
    periodic.Checkpoints().at_end(fake_run(7, save_final), outcome)
    assert saved == ([7] if saves else [])
    stopped = "stop requested: checkpoint saved at iteration 7, exiting." in capsys.readouterr().out
    assert stopped == (outcome == periodic.STOPPED)


def test_fault_entry_spec_of_iterations():
    assert fault_entry.iterations("") == frozenset()
    assert fault_entry.iterations("3, 5-7") == frozenset({3, 5, 6, 7})


class CountingObjective:
    def micro_step(self, model, window):
        return torch.tensor(2.0), {"seen": torch.tensor(1.0)}


def test_fault_entry_poisons_only_the_chosen_iterations(monkeypatch):
    monkeypatch.setattr(trainer, "train_step", trainer.train_step)  # restored after the test
    losses = []

    def step(run) -> bool:
        loss, _ = run.objective.micro_step(None, None)
        losses.append(float(loss))
        run.state.iteration += 1
        return True

    monkeypatch.setattr(trainer, "train_step", step)
    fault_entry.poison_iterations(frozenset({1, 3}))
    run = SimpleNamespace(state=SimpleNamespace(iteration=0), objective=CountingObjective())
    for _ in range(5):
        trainer.train_step(run)
    assert [loss != loss for loss in losses] == [False, True, False, True, False]  # NaN != NaN
    assert "micro_step" not in vars(run.objective), "the objective is left as it was"


def test_fault_entry_slow_writes_take_their_time_and_write_the_same_bytes(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(checkpoint, "atomic_write", checkpoint.atomic_write)  # restored after the test
    fault_entry.slow_checkpoint_writes(0.3)
    state = {"weights": torch.arange(100_000, dtype=torch.float32)}  # 400 KB: several 64 KiB pieces
    started = time.perf_counter()
    checkpoint.save_checkpoint(tmp_path, 1, state, keep=2)
    assert time.perf_counter() - started >= 0.5, "the file and its pointer, 0.3 s each"
    assert torch.equal(checkpoint.load_checkpoint(tmp_path / "ckpt_00000001.pt")["weights"], state["weights"])
    assert (tmp_path / checkpoint.LATEST).read_text() == "ckpt_00000001.pt\n"
