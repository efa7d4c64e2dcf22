"""Settings: precedence env > .env > CLI > default, and one actionable line per bad value (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatarl.config import Config, ConfigError
from avatarl.config_docs import describe, env_example
from avatarl.config_sources import export_launcher_variables, load_config, preset_names, preset_settings, preset_values
from tests.helpers import run_cli


def test_defaults_match_the_seed():
    cfg = Config()
    assert (cfg.model.context_len, cfg.grpo.horizon, cfg.optim.batch, cfg.optim.micro_batch, cfg.optim.total_iters) == (32, 8, 16384, 512, 2000)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_emb, cfg.grpo.k_samples) == (6, 8, 512, 4)
    assert cfg.optim.lr == 3e-4 and cfg.optim.min_lr == 3e-5 and cfg.grpo.old_policy_interval == 5 and cfg.grpo.temperature == 1.2


def test_kl_defaults_deviate_from_the_seed_on_purpose():
    """The seed's KL settings (BETA_KL 1e-3, KL_WARM 50000, bigram, KL_TARGET 0.02) collapse; see README."""
    cfg = Config()
    assert (cfg.grpo.beta_kl, cfg.grpo.kl_warm, cfg.grpo.ngram_order, cfg.grpo.kl_target) == (1.0, 0, 3, 0.1)


def test_precedence_env_over_dotenv_over_cli_over_default(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LR=0.002\nHORIZON=6\n")
    cfg, sources = load_config({"LR": "0.003", "HORIZON": "5", "N_LAYER": "3"}, dotenv, environ={"LR": "0.001"})
    assert cfg.optim.lr == 0.001 and sources["LR"] == "env"
    assert cfg.grpo.horizon == 6 and sources["HORIZON"] == ".env"
    assert cfg.model.n_layer == 3 and sources["N_LAYER"] == "cli"
    assert cfg.model.n_emb == 512 and sources["N_EMB"] == "default"


@pytest.mark.parametrize("text,expected", [("yes", True), ("0", False), ("TRUE", True), ("off", False)])
def test_booleans(text: str, expected: bool):
    cfg, _ = load_config(environ={"USE_AMP": text}, env_file=None)
    assert cfg.optim.use_amp is expected


@pytest.mark.parametrize("environ,fragment", [
    ({"LR": "abc"}, "LR='abc' (env) is invalid: expected a number"),
    ({"HORIZON": "0"}, "HORIZON=0 is out of range: it must be at least 1"),
    ({"TEMPERATURE": "-1"}, "TEMPERATURE=-1.0 is out of range: it must be greater than 0"),
    ({"BATCH": "100", "MICRO_BATCH": "64"}, "BATCH=100 is not a multiple of MICRO_BATCH=64"),
    ({"N_EMB": "100", "N_HEAD": "8"}, "N_EMB=100 is not divisible by N_HEAD=8"),
    ({"LR_DECAY_TYPE": "step"}, "LR_DECAY_TYPE='step' is not allowed: choose one of cosine, linear, exponential"),
    ({"USE_AMP": "maybe"}, "expected a boolean"),
])
def test_each_bad_value_is_one_clear_line(environ: dict, fragment: str, tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ, env_file=None)
    assert any(fragment in line for line in caught.value.problems), caught.value.problems


def test_unknown_dotenv_key_suggests_the_setting(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LEARNING_RATE=1\nCONTEXT_LENGTH=12\nWANDB_API_KEY=abc\n")
    with pytest.raises(ConfigError) as caught:
        load_config(env_file=dotenv, environ={})
    problems = caught.value.problems
    assert len(problems) == 2
    assert "CONTEXT_LENGTH is not a setting. Did you mean CONTEXT_LEN?" in problems[1]


def test_env_example_lists_every_setting_and_parses_back(tmp_path: Path):
    text = env_example()
    dotenv = tmp_path / ".env"
    dotenv.write_text(text)
    cfg, sources = load_config(env_file=dotenv, environ={})
    assert cfg == Config()
    assert set(sources.values()) == {".env"}


def test_describe_masks_nothing_it_should_not_and_names_sources():
    cfg, sources = load_config({"N_LAYER": "2"}, environ={})
    text = describe(cfg, sources)
    assert "N_LAYER=2" in text and "(cli)" in text and "(default)" in text


CLI_ERRORS = [
    ({"LR": "abc"}, "LR='abc' (env) is invalid"),
    ({"HORIZON": "0"}, "HORIZON=0 is out of range"),
    ({"DEVICE": "tpu"}, "DEVICE='tpu' is not allowed"),
    ({"BATCH": "20", "MICRO_BATCH": "8"}, "BATCH=20 is not a multiple of MICRO_BATCH=8"),
]


@pytest.mark.parametrize("settings,fragment", CLI_ERRORS)
def test_cli_reports_config_errors_with_exit_2_and_no_traceback(settings, fragment, tiny_env, tmp_path):
    result = run_cli(["train"], tmp_path, **{**tiny_env, **settings})
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_cli_flags_are_overridden_by_env(tmp_path: Path):
    result = run_cli(["config", "--n-layer", "3", "--n-head", "4"], tmp_path, N_LAYER="5")
    assert result.returncode == 0
    assert "N_LAYER=5" in result.stdout and "N_HEAD=4" in result.stdout


@pytest.mark.parametrize("content,fragment", [
    (None, "no such file"),
    (b"", "is empty"),
    (b"\xff\xfe\x00bad", "is not UTF-8"),
    (b"too short", "too few for CONTEXT_LEN + HORIZON"),
])
def test_bad_data_path_is_reported_before_training(content, fragment, tiny_env, tmp_path: Path):
    data = tmp_path / "corpus.txt"
    if content is not None:
        data.write_bytes(content)
    result = run_cli(["train"], tmp_path, **{**tiny_env, "DATA_PATH": str(data)})
    assert result.returncode == 2 and fragment in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_unwritable_checkpoint_dir(tiny_env, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli(["train"], tmp_path, **{**tiny_env, "CHECKPOINT_DIR": str(blocker / "sub")})
    assert result.returncode == 2 and "CHECKPOINT_DIR=" in result.stdout + result.stderr


def test_the_writability_probe_leaves_another_process_s_probe_of_the_same_pid_alone(tmp_path: Path):
    """Ranks in two containers sharing CHECKPOINT_DIR can have one pid: a probe named after the pid was
    overwritten and deleted by the other, which then failed with 'not writable'."""
    import os

    from avatarl.run_dir import prepare_run_dir

    theirs = tmp_path / f".write-test-{os.getpid()}"
    theirs.write_text("another container's")
    assert prepare_run_dir(Config.of(checkpoint_dir=str(tmp_path)), "student") == tmp_path
    assert theirs.read_text() == "another container's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs.name], "its own probe is gone"


def test_device_cuda_without_gpu(tiny_env, tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli(["train"], tmp_path, **{**tiny_env, "DEVICE": "cuda"})
    assert result.returncode == 2 and "DEVICE=cuda but no CUDA GPU" in result.stdout + result.stderr


def test_dotenv_typo_via_cli(tiny_env, tmp_path: Path):
    (tmp_path / ".env").write_text("TOTAL_ITER=5\n")
    result = run_cli(["train"], tmp_path, **tiny_env)
    assert result.returncode == 2 and "Did you mean TOTAL_ITERS?" in result.stderr


def test_secrets_are_masked_in_printed_config(tmp_path: Path):
    secret = "sk-live-very-secret-value"
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={secret}\nWANDB_MODE=offline\n")
    result = run_cli(["config"], tmp_path, HF_TOKEN=secret)
    assert result.returncode == 0 and secret not in result.stdout + result.stderr
    lines = {line.split("=")[0]: line for line in result.stdout.splitlines()}
    # The keys are listed (set, and where), their values masked; a variable that is no secret is shown.
    assert lines["WANDB_API_KEY"].split()[0] == "WANDB_API_KEY=****" and "(.env)" in lines["WANDB_API_KEY"]
    assert lines["HF_TOKEN"].split()[0] == "HF_TOKEN=****" and "(env)" in lines["HF_TOKEN"]
    assert lines["WANDB_MODE"].split()[0] == "WANDB_MODE=offline"


def test_every_preset_is_valid_and_sits_below_flags_dotenv_and_env(tmp_path: Path):
    assert preset_names() == ["bench-quick", "cpu-small", "gpt2-small", "grpo-teacher-forced", "tiny"]
    for name in preset_names():
        cfg, sources = load_config({}, None, environ={}, preset=name)
        assert {k for k, v in sources.items() if v == "preset"} == set(preset_settings(name)), name
        assert preset_values(name) == {k.lower(): cfg.to_dict()[k.lower()] for k in preset_settings(name)}
    dotenv = tmp_path / "run.env"
    dotenv.write_text("N_EMB=256\n")
    cfg, sources = load_config({"N_LAYER": "3", "N_EMB": "64"}, dotenv, environ={"LR": "0.5"}, preset="cpu-small")
    assert (cfg.model.n_layer, sources["N_LAYER"]) == (3, "cli")          # flag over preset
    assert (cfg.model.n_emb, sources["N_EMB"]) == (256, ".env")           # .env over flag and preset
    assert (cfg.optim.lr, sources["LR"]) == (0.5, "env")                  # env over everything
    assert (cfg.optim.batch, sources["BATCH"]) == (64, "preset")          # the preset over the default


def test_preset_flag_reaches_the_cli_and_an_unknown_one_is_refused(tmp_path: Path):
    shown = run_cli(["config", "--preset", "cpu-small"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert any(line.startswith("N_EMB=128") and line.endswith("(preset)") for line in shown.stdout.splitlines())
    refused = run_cli(["config", "--preset", "huge"], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "invalid choice: 'huge'" in refused.stderr and "cpu-small" in refused.stderr


def test_dotenv_library_variables_reach_the_process_environment_unless_set(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WANDB_MODE=offline\nHF_HOME=/cache/hf\nWANDB_API_KEY=\nLR=0.01\n")
    environ = {"HF_HOME": "/mine"}
    export_launcher_variables(dotenv, environ)
    assert environ == {"HF_HOME": "/mine", "WANDB_MODE": "offline"}
