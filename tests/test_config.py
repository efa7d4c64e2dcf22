"""Settings: precedence env > flags > .env > preset > default, warnings for what a flag or preset loses,
secrets by name, .env variables that are not settings, and one actionable line per bad value (exit 2)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from avatarl.config import Config, ConfigError, config_fields, is_secret
from avatarl.config_docs import describe, env_example
from avatarl.config_schema import AmpDtype, DeviceKind, LogLevel
from avatarl.config_sources import (
    export_environment,
    layer_sources,
    load_config,
    near_miss,
    preset_names,
    preset_settings,
    preset_values,
)
from tests.helpers import REPO, clean_env, run_cli


def test_defaults_match_the_seed():
    cfg = Config()
    assert (cfg.model.context_len, cfg.grpo.horizon, cfg.optim.batch, cfg.optim.micro_batch,
            cfg.optim.total_iters) == (32, 8, 16384, 512, 2000)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_emb, cfg.grpo.k_samples) == (6, 8, 512, 4)
    assert cfg.optim.lr == 3e-4 and cfg.optim.min_lr == 3e-5
    assert cfg.grpo.old_policy_interval == 5 and cfg.grpo.temperature == 1.2


def test_kl_defaults_deviate_from_the_seed_on_purpose():
    """The seed's KL settings (BETA_KL 1e-3, KL_WARM 50000, bigram, KL_TARGET 0.02) collapse; see README."""
    cfg = Config()
    assert (cfg.grpo.beta_kl, cfg.grpo.kl_warm, cfg.grpo.ngram_order, cfg.grpo.kl_target) == (1.0, 0, 3, 0.1)


def test_precedence_env_over_cli_over_dotenv_over_default(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LR=0.002\nHORIZON=6\nN_LAYER=4\n")
    cfg, sources = load_config({"LR": "0.003", "N_LAYER": "3"}, dotenv, environ={"LR": "0.001"})
    assert cfg.optim.lr == 0.001 and sources["LR"] == "env"
    assert cfg.model.n_layer == 3 and sources["N_LAYER"] == "cli"  # a flag beats .env
    assert cfg.grpo.horizon == 6 and sources["HORIZON"] == ".env"
    assert cfg.model.n_emb == 512 and sources["N_EMB"] == "default"


def test_an_empty_value_is_unset_in_every_source(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LR=\nHORIZON=6\nN_LAYER=\nWANDB_MODE=\n")
    cfg, sources = load_config({"N_EMB": "", "N_HEAD": "4"}, dotenv, environ={"HORIZON": "", "LR": "  "},
                               preset="cpu-small")
    assert (cfg.optim.lr, sources["LR"]) == (1e-3, "preset")  # empty in env and .env: the preset's
    assert (cfg.grpo.horizon, sources["HORIZON"]) == (6, ".env")  # empty in env: .env's
    assert (cfg.model.n_layer, sources["N_LAYER"]) == (2, "preset")
    assert (cfg.model.n_emb, sources["N_EMB"]) == (128, "preset")  # an empty flag too
    environ = {"WANDB_MODE": "", "HF_HOME": "", "PATH": "/bin", "TERM": ""}
    layered = layer_sources(env_file=dotenv, environ=environ)
    assert "WANDB_MODE" not in layered.values
    export_environment(layered, environ)
    assert environ == {"PATH": "/bin", "TERM": ""}, "empty variables of ours are unset, others left alone"


def test_choices_are_case_insensitive_and_stored_as_the_member(tmp_path: Path):
    (tmp_path / ".env").write_text("AMP_DTYPE=BFloat16\n")
    cfg, sources = load_config(environ={"LOG_LEVEL": "info", "DEVICE": "CUDA", "ROLLOUTS": "Teacher_Forced"},
                               env_file=tmp_path / ".env")
    assert cfg.run.log_level is LogLevel.INFO and cfg.run.device is DeviceKind.CUDA
    assert cfg.to_dict()["log_level"] == "INFO" and cfg.to_dict()["rollouts"] == "teacher_forced"
    assert cfg.optim.amp_dtype is AmpDtype.BFLOAT16 and sources["DEVICE"] == "env"


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
    ({"LR_DECAY_TYPE": "step"},
     "LR_DECAY_TYPE='step' (env) is not allowed: choose one of cosine, linear, exponential"),
    ({"USE_AMP": "maybe"}, "expected a boolean"),
])
def test_each_bad_value_is_one_clear_line(environ: dict, fragment: str, tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ, env_file=None)
    assert any(fragment in line for line in caught.value.problems), caught.value.problems


def test_a_near_miss_of_a_setting_in_dotenv_is_refused_with_the_setting_meant(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LEARNING_RATE=1\nCONTEXT_LENGTH=12\nWANDB_API_KEY=abc\nN_LAYERS=2\nlr=0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(env_file=dotenv, environ={})
    typos = [("LEARNING_RATE", "LR"), ("CONTEXT_LENGTH", "CONTEXT_LEN"), ("N_LAYERS", "N_LAYER"),
             ("lr", "LR")]
    assert caught.value.problems == [f"{dotenv}: {typo} is not a setting. Did you mean {meant}?"
                                     for typo, meant in typos]


# Variables of other programs that a .env holds: none is taken for a misspelt setting.
ORDINARY = ("WANDB_ENTITY", "WANDB_DIR", "WANDB_TAGS", "WANDB_NOTES", "WANDB_RUN_GROUP", "WANDB_BASE_URL",
            "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TIKTOKEN_CACHE_DIR",
            "HF_HUB_OFFLINE", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE",
            "TOKENIZERS_PARALLELISM", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_LOGS", "TORCHINDUCTOR_CACHE_DIR",
            "NCCL_P2P_DISABLE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "TOP_P",
            "DEVICE_ID", "EVAL_ITERS", "CACHE_DIR", "TP_SOCKET_IFNAME", "PYTHONUNBUFFERED", "HTTPS_PROXY",
            "NO_PROXY", "TZ", "LANG")


def test_variables_that_are_no_settings_are_allowed_in_dotenv_and_reach_the_process(tmp_path: Path):
    assert [name for name in ORDINARY if near_miss(name)] == []
    dotenv = tmp_path / ".env"
    lines = "".join(f"{name}=from-dotenv\n" for name in ORDINARY)
    dotenv.write_text(lines + "N_LAYER=3\nWANDB_MODE=offline\n")
    environ = {"CUDA_VISIBLE_DEVICES": "1", "PATH": "/bin"}
    cfg, _ = load_config(env_file=dotenv, environ=environ)
    assert cfg.model.n_layer == 3
    export_environment(layer_sources(env_file=dotenv, environ=environ), environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == "1", "the process environment still wins"
    assert environ["WANDB_ENTITY"] == environ["TIKTOKEN_CACHE_DIR"] == "from-dotenv"
    assert environ["WANDB_MODE"] == "offline" and "N_LAYER" not in environ  # settings are read, not exported
    assert set(environ) == {*ORDINARY, "WANDB_MODE", "PATH"}


def test_omp_num_threads_of_dotenv_reaches_torch_loaded_before_it(tmp_path: Path):
    """The CLI imports torch before it reads .env; torch's thread pool must follow the .env anyway."""
    (tmp_path / ".env").write_text("OMP_NUM_THREADS=1\n")
    code = ("import torch, avatarl.cli\nfrom avatarl.config_sources import resolve_settings\n"
            "before = torch.get_num_threads()\nresolve_settings()\nprint(before, torch.get_num_threads())")
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "1", done.stdout


def commented_settings(text: str) -> str:
    """`.env.example` with every `# NAME=value` line uncommented."""
    return re.sub(r"^# ([A-Z][A-Z0-9_]*=)", r"\1", text, flags=re.MULTILINE)


def test_env_example_sets_nothing_and_each_line_parses_back_to_its_default(tmp_path: Path):
    text = env_example()
    dotenv = tmp_path / ".env"
    dotenv.write_text(text)
    layered = layer_sources(env_file=dotenv, environ={})
    assert layered.values == {} and set(layered.sources.values()) == {"default"}, "copying it changes nothing"
    dotenv.write_text(commented_settings(text))
    cfg, sources = load_config(env_file=dotenv, environ={})
    assert cfg == Config()
    documented = {name for name, value in layer_sources(env_file=dotenv, environ={}).values.items()}
    uncommented = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", commented_settings(text), flags=re.MULTILINE))
    assert set(config_fields()) <= uncommented and documented <= uncommented
    assert {sources[name] for name in config_fields() if name in documented} == {".env"}


def test_a_copied_env_example_shadows_no_preset_or_flag(tmp_path: Path):
    (tmp_path / ".env").write_text(env_example())
    shown = run_cli(["config", "--preset", "cpu-small", "--lr", "0.01"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = {line.split("=")[0]: line.split() for line in shown.stdout.splitlines() if "=" in line}
    assert lines["N_LAYER"] == ["N_LAYER=2", "(preset)"] and lines["LR"] == ["LR=0.01", "(cli)"]
    assert lines["N_EMB"] == ["N_EMB=128", "(preset)"]
    assert not {"HOST_UID", "AVATARL_IMAGE", "WANDB_MODE"} & set(lines), "no launcher variable is set either"
    assert shown.stderr == "", "nothing is overridden: no warning"


def test_describe_masks_nothing_it_should_not_and_names_sources():
    cfg, sources = load_config({"N_LAYER": "2"}, environ={})
    text = describe(cfg, sources)
    assert "N_LAYER=2" in text and "(cli)" in text and "(default)" in text


CLI_ERRORS = [
    ({"LR": "abc"}, "LR='abc' (env) is invalid"),
    ({"HORIZON": "0"}, "HORIZON=0 is out of range"),
    ({"DEVICE": "tpu"}, "DEVICE='tpu' (env) is not allowed: choose one of auto, cpu, cuda"),
    ({"BATCH": "20", "MICRO_BATCH": "8"}, "BATCH=20 is not a multiple of MICRO_BATCH=8"),
]


@pytest.mark.parametrize("settings,fragment", CLI_ERRORS)
def test_cli_reports_config_errors_with_exit_2_and_no_traceback(settings, fragment, tiny_env, tmp_path):
    result = run_cli(["train"], tmp_path, **{**tiny_env, **settings})
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_cli_flags_beat_dotenv_and_lose_to_env_with_one_warning(tmp_path: Path):
    (tmp_path / ".env").write_text("N_HEAD=2\nN_EMB=64\n")
    result = run_cli(["config", "--n-layer", "3", "--n-head", "4", "--lr", "1e-2"], tmp_path, N_LAYER="5",
                     LR="0.01")
    assert result.returncode == 0, result.stderr
    assert "N_LAYER=5" in result.stdout and "N_HEAD=4" in result.stdout and "N_EMB=64" in result.stdout
    assert result.stderr.splitlines() == [
        "N_LAYER=5 from the process environment overrides --n-layer 3 (the environment wins over flags; "
        "unset N_LAYER to use the flag)."], "LR=0.01 and --lr 1e-2 agree: no warning"


def test_a_preset_value_that_env_or_dotenv_overrides_is_named_in_a_warning(tmp_path: Path, caplog):
    dotenv = tmp_path / "run.env"
    dotenv.write_text("N_LAYER=4\nBATCH=64\n")
    with caplog.at_level(logging.WARNING, logger="avatarl.config_sources"):
        cfg, _ = load_config({"N_EMB": "64"}, dotenv, environ={"LR": "0.5"}, preset="cpu-small")
    assert (cfg.model.n_layer, cfg.model.n_emb, cfg.optim.lr) == (4, 64, 0.5)
    assert [record.getMessage() for record in caplog.records] == [
        f"N_LAYER=4 from {dotenv} overrides N_LAYER=2 of preset cpu-small (a .env wins over a preset; remove "
        "the line to use the preset's).",
        "LR=0.5 from the process environment overrides LR=1e-3 of preset cpu-small (unset LR to use the "
        "preset's)."], "BATCH=64 is the preset's value, and a flag replacing a preset value is no surprise"


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
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={secret}\nWANDB_MODE=offline\nOPENAI_API_KEY={secret}\n"
                                   "TOKENIZER=gpt2\nWANDB_ENTITY=my-team\n")
    result = run_cli(["config"], tmp_path, HF_TOKEN=secret)
    assert result.returncode == 0 and secret not in result.stdout + result.stderr
    lines = {line.split("=")[0]: line for line in result.stdout.splitlines()}
    # The keys are listed (set, and where), their values masked; a variable that is no secret is shown.
    assert lines["WANDB_API_KEY"].split()[0] == "WANDB_API_KEY=****" and "(.env)" in lines["WANDB_API_KEY"]
    assert lines["OPENAI_API_KEY"].split() == ["OPENAI_API_KEY=****", "(.env)"]
    assert lines["HF_TOKEN"].split()[0] == "HF_TOKEN=****" and "(env)" in lines["HF_TOKEN"]
    assert lines["WANDB_MODE"].split()[0] == "WANDB_MODE=offline"
    assert lines["TOKENIZER"].split() == ["TOKENIZER=gpt2", "(.env)"]
    assert lines["WANDB_ENTITY"].split() == ["WANDB_ENTITY=my-team", "(.env)"]


def test_secrets_are_named_or_end_in_a_secret_suffix_and_no_setting_is_one():
    assert [name for name in config_fields() if is_secret(name)] == []
    secret = ("WANDB_API_KEY", "HF_TOKEN", "MODAL_TOKEN_ID", "OPENAI_API_KEY", "GITHUB_TOKEN", "DB_PASSWORD",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "hf_token", "TOKEN")
    plain = ("TOKENIZER", "MODAL_WANDB_SECRET", "MAX_NEW_TOKENS", "KEYBOARD", "SECRETS_DIR",
             "TOKENIZERS_PARALLELISM")
    assert [name for name in secret if not is_secret(name)] == []
    assert [name for name in plain if is_secret(name)] == []


def test_every_preset_is_valid_and_sits_below_dotenv_flags_and_env(tmp_path: Path):
    assert preset_names() == ["bench-quick", "cpu-small", "gpt2-small", "grpo-autoregressive",
                              "grpo-log-reward", "grpo-teacher-forced", "tiny"]
    for name in preset_names():
        cfg, sources = load_config({}, None, environ={}, preset=name)
        assert {k for k, v in sources.items() if v == "preset"} == set(preset_settings(name)), name
        assert preset_values(name) == {k.lower(): cfg.to_dict()[k.lower()] for k in preset_settings(name)}
    dotenv = tmp_path / "run.env"
    dotenv.write_text("N_EMB=256\nN_HEAD=2\n")
    cfg, sources = load_config({"N_LAYER": "3", "N_EMB": "64"}, dotenv, environ={"LR": "0.5"},
                               preset="cpu-small")
    assert (cfg.model.n_layer, sources["N_LAYER"]) == (3, "cli")          # flag over preset
    assert (cfg.model.n_emb, sources["N_EMB"]) == (64, "cli")             # flag over .env and preset
    assert (cfg.model.n_head, sources["N_HEAD"]) == (2, ".env")           # .env over preset
    assert (cfg.optim.lr, sources["LR"]) == (0.5, "env")                  # env over everything
    assert (cfg.optim.batch, sources["BATCH"]) == (64, "preset")          # the preset over the default


def test_preset_flag_reaches_the_cli_and_an_unknown_one_is_refused(tmp_path: Path):
    shown = run_cli(["config", "--preset", "cpu-small"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert any(line.startswith("N_EMB=128") and line.endswith("(preset)")
               for line in shown.stdout.splitlines())
    refused = run_cli(["config", "--preset", "huge"], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "invalid choice: 'huge'" in refused.stderr and "cpu-small" in refused.stderr


def test_dotenv_library_variables_reach_the_process_environment_unless_set(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WANDB_MODE=offline\nHF_HOME=/cache/hf\nWANDB_API_KEY=\nLR=0.01\n")
    environ = {"HF_HOME": "/mine"}
    export_environment(layer_sources(env_file=dotenv, environ=environ), environ)
    assert environ == {"HF_HOME": "/mine", "WANDB_MODE": "offline"}


def test_bench_quick_is_the_bench_quick_preset_under_the_usual_precedence(tmp_path: Path, monkeypatch):
    from avatarl.cli import build_parser, resolve

    monkeypatch.chdir(tmp_path)
    for name in config_fields():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("K_SAMPLES", "3")
    (tmp_path / ".env").write_text("N_EMB=32\n")
    for which in ("learning", "throughput"):
        cfg, layered = resolve(build_parser().parse_args(["bench", which, "--quick", "--n-layer", "3"]))
        assert (cfg.model.n_layer, layered.sources["N_LAYER"]) == (3, "cli"), "a flag beats --quick"
        assert (cfg.model.n_emb, layered.sources["N_EMB"]) == (32, ".env")
        assert (cfg.grpo.k_samples, layered.sources["K_SAMPLES"]) == (3, "env")
        assert (cfg.optim.total_iters, cfg.optim.lr, layered.sources["LR"]) == (600, 3e-3, "preset")
    with pytest.raises(ConfigError, match="give either --quick or --preset tiny"):
        resolve(build_parser().parse_args(["bench", "learning", "--quick", "--preset", "tiny"]))
