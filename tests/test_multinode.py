"""Several nodes on one machine: `avatarl launch` processes as nodes of one c10d rendezvous on 127.0.0.1
(gloo, one worker each), elastic restarts after a SIGKILLed worker, a node lost for good, and the
refusal of a CHECKPOINT_DIR the nodes do not share; plus the torchrun options built from the settings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from avatarl import distributed as D
from avatarl.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from avatarl.config import Config, ConfigError
from avatarl.distributed import (
    SNAPSHOT_SHARED_ENV,
    DistInfo,
    check_shared_directory,
    decided_by_rank0,
    require_on_every_rank,
)
from avatarl.launchers.torchrun import given, rendezvous_args
from tests.helpers import (
    FAULTY,
    LAUNCH,
    LONG,
    REPO,
    TIMEOUT,
    Job,
    clean_env,
    compare_runs,
    free_port,
    kill_job,
    kill_tree,
    process_tree,
    run_cli,
    settings,
    start,
    training,
    wait_for,
)

TRAIN_ARGS = ["-m", "avatarl", "train"]
ONE_NODE = [*LAUNCH, "--standalone", "--nproc-per-node=2", *TRAIN_ARGS]
NODE = [*LAUNCH, *TRAIN_ARGS]  # the rendezvous comes from NNODES, RDZV_ENDPOINT, ...
DISTRIBUTED = ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "node_addr", "max_restarts",
               "dist_timeout_s")
# Cut inside a log and an old-policy interval with an unsaturated KL controller, as tests/helpers.py
# check_equivalence does: a resume must restore every rank's partial sums to stay bit-identical.
EIGHT = dict(TOTAL_ITERS=8, CHECKPOINT_INTERVAL=4, LOG_INTERVAL=3, EVAL_INTERVAL=4, OLD_POLICY_INTERVAL=3,
             KL_WARM=0, BETA_KL=0.01, KL_TARGET=5.0)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, corpus_path):
    """The reference run, EIGHT iterations of one node with two processes: started once, while the first
    test that needs it runs its own nodes."""
    directory = tmp_path_factory.mktemp("one_node")
    env = settings(directory, corpus_path, "run", **EIGHT)
    job = start(ONE_NODE, env, directory, "one")
    yield job, env
    if job.proc.poll() is None:
        kill_job(job)


def reference_state(one_node: tuple[Job, dict[str, str]]) -> dict[str, Any]:
    job, env = one_node
    assert job.wait() == 0, output([job])
    return final_state(env)


def start_nodes(env: dict[str, str], cwd: Path, tag: str, nodes: int = 2, prefix: tuple[str, ...] = (),
                node: tuple[str, ...] = tuple(NODE), **per_node: Any) -> list[Job]:
    """`nodes` launchers (`node`) forming one job at a fresh local endpoint, each run under `prefix`;
    `per_node` values are lists by node."""
    common = {**env, "NNODES": str(nodes), "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    return [start([*prefix, *node], {**common, "NODE_RANK": str(rank),
                                     **{k: str(v[rank]) for k, v in per_node.items()}}, cwd, f"{tag}{rank}")
            for rank in range(nodes)]


def output(jobs: list[Job]) -> str:
    return "\n".join(job.stdout + job.stderr for job in jobs)


def final_state(env: dict[str, str]) -> dict[str, Any]:
    state = load_checkpoint(Path(env["CHECKPOINT_DIR"]) / f"ckpt_{int(env['TOTAL_ITERS']):08d}.pt")
    for name in DISTRIBUTED:  # how the job was launched, not what it computed
        state["config"].pop(name)
    return state


@pytest.mark.slow
def test_two_nodes_train_one_world_bit_identical_to_one_node(tmp_path, corpus_path, one_node):
    two_env = settings(tmp_path, corpus_path, "two_nodes", **EIGHT)
    nodes = start_nodes(two_env, tmp_path, "node")
    codes = [job.wait() for job in nodes]
    assert codes == [0, 0], output(nodes)
    text = output(nodes)
    assert "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:" in text
    assert text.count("world size 2") == 1, "rank 0 alone reports the one world of both nodes"
    compare_runs(reference_state(one_node), final_state(two_env))


@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_resumes_and_matches(tmp_path, corpus_path, one_node):
    elastic_env = settings(tmp_path, corpus_path, "elastic", **EIGHT, MAX_RESTARTS=2,
                           AVATARL_TEST_SLOW_WRITE=0.5)
    nodes = start_nodes(elastic_env, tmp_path, "elastic", node=(*LAUNCH, *FAULTY))
    run_dir = Path(elastic_env["CHECKPOINT_DIR"])
    wait_for(lambda: (run_dir / "ckpt_00000004.pt").is_file(), nodes[0], what="checkpoint 4")
    worker = process_tree(nodes[1].proc.pid)[-1]  # node 1's one worker, while rank 0 writes `latest` slowly
    signal_sent = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    assert [job.wait() for job in nodes] == [0, 0], output(nodes)
    print(f"\n[multinode] elastic: worker {worker} SIGKILLed, both nodes exit 0 "
          f"{time.monotonic() - signal_sent:.1f}s later")
    text = output(nodes)
    assert re.search(r"\[avatarl\] node \d \(.*\): torchrun restart 1 of 2", text), text
    assert "ckpt_00000004.pt at iteration 4" in text, "the restarted group resumed from the checkpoint"
    compare_runs(reference_state(one_node), final_state(elastic_env))


@pytest.mark.slow
def test_a_lost_node_stops_the_other_with_its_name_and_a_rerun_resumes(tmp_path, corpus_path):
    timeout_s = 20
    env = settings(tmp_path, corpus_path, "lost", **{**LONG, "CHECKPOINT_INTERVAL": 4},
                   DIST_TIMEOUT_S=timeout_s)
    run_dir = Path(env["CHECKPOINT_DIR"])
    nodes = start_nodes(env, tmp_path, "lost")
    wait_for(lambda: find_resume_checkpoint(run_dir) and training(run_dir, past=5)(), nodes[0],
             what="a checkpoint and training past it")
    killed = kill_tree(nodes[1])  # node 1: node 0 hosts the rendezvous, which dies with it (README)
    lost_at = time.monotonic()
    code = nodes[0].wait(timeout=timeout_s + 30)
    detected_s = time.monotonic() - lost_at
    survivor = nodes[0].stderr
    assert code != 0, survivor
    assert detected_s < timeout_s + 15
    message = re.search(r"error: rank \d lost its peers: rank \d = node \d \(.*?pid (\d+)\) "
                        r"did not answer.*", survivor)
    assert message and int(message.group(1)) == killed[-1], survivor
    print(f"\n[multinode] lost node 1: node 0 exits {code} after {detected_s:.1f}s: {message.group(0)}")

    saved = load_checkpoint(find_resume_checkpoint(run_dir))["iteration"]
    rerun = start_nodes({**env, "TOTAL_ITERS": str(saved + 2)}, tmp_path, "rerun")
    assert [job.wait() for job in rerun] == [0, 0], output(rerun)
    assert f"ckpt_{saved:08d}.pt at iteration {saved}" in output(rerun)
    assert load_checkpoint(find_resume_checkpoint(run_dir))["iteration"] == saved + 2


@pytest.mark.slow
def test_a_checkpoint_dir_the_nodes_do_not_share_is_refused(tmp_path, corpus_path):
    env = settings(tmp_path, corpus_path, "node0")
    nodes = start_nodes(env, tmp_path, "apart", CHECKPOINT_DIR=[tmp_path / "node0", tmp_path / "node1"])
    assert all(job.wait() != 0 for job in nodes)
    text = output(nodes)
    assert re.search(r"error: CHECKPOINT_DIR=\S+ is not one directory shared by all nodes: node \d .* cannot "
                     r"read what rank 0 wrote there", text), text
    assert not list(tmp_path.glob("node*/ckpt_*.pt")), "refused before training"


@pytest.fixture
def own_pid_namespace() -> tuple[str, ...]:
    """A command prefix that runs a process in a PID namespace of its own, as a container does."""
    prefix = ("unshare", "--pid", "--fork", "--mount-proc")
    try:
        allowed = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        allowed = False
    if not allowed:
        pytest.skip("unshare --pid is not allowed here (it needs root or user namespaces)")
    return prefix


@pytest.mark.slow
def test_nodes_with_one_host_name_and_one_pid_form_a_world_only_with_node_addr(tmp_path, corpus_path,
                                                                               own_pid_namespace):
    """Two containers with host networking on one machine, as the docker smoke test runs them: the same host
    name and, each in its own PID namespace, the same torchrun pid, which is all torchrun knows a node by."""
    same = start_nodes(settings(tmp_path, corpus_path, "same", DIST_TIMEOUT_S=5), tmp_path, "same",
                       prefix=own_pid_namespace)
    assert [job.wait() for job in same] != [0, 0]
    assert "RendezvousTimeoutError" in output(same), "taken for one node, the pair waited for a second one"
    apart = start_nodes(settings(tmp_path, corpus_path, "apart"), tmp_path, "apart", prefix=own_pid_namespace,
                        NODE_ADDR=["127.0.0.1", "127.0.0.2"])
    assert [job.wait() for job in apart] == [0, 0], output(apart)
    assert "--local-addr=127.0.0.2" in output(apart) and "world size 2" in output(apart)


def test_the_shared_directory_check_trusts_a_launcher_that_mounts_one_snapshot_everywhere(tmp_path,
                                                                                          monkeypatch):
    two_nodes = DistInfo(0, 0, 2, torch.device("cpu"), ("node 0 (a, pid 1)", "node 1 (b, pid 2)"),
                         nodes=2)
    # Modal: a volume committed by rank 0, read at the next start
    monkeypatch.setenv(SNAPSHOT_SHARED_ENV, "1")
    check_shared_directory(tmp_path, two_nodes)  # without a process group: it would fail if it checked
    assert not list(tmp_path.iterdir())
    monkeypatch.delenv(SNAPSHOT_SHARED_ENV)
    with pytest.raises(ValueError):  # now it checks, and there is no process group to check with
        check_shared_directory(tmp_path, two_nodes)


def two_nodes(rank: int) -> DistInfo:
    return DistInfo(rank, 0, 2, torch.device("cpu"), ("node 0 (a, pid 1)", "node 1 (b, pid 2)"), nodes=2)


class PlayedBroadcast:
    """broadcast_object_list for ranks called one after another in this process, rank 0 first: the
    others receive what rank 0 sent (no process group needed)."""

    def __init__(self) -> None:
        self.sent: list[object] | None = None

    def __call__(self, objects: list[object], src: int = 0) -> None:
        if self.sent is None:
            self.sent = list(objects)
        else:
            objects[:] = self.sent


def test_rank_0_decides_for_every_rank_and_its_failure_stops_them_all(monkeypatch):
    monkeypatch.setattr(dist, "broadcast_object_list", PlayedBroadcast())
    views = {0: Path("ckpt_00000008.pt"), 1: Path("ckpt_00000004.pt")}  # rank 1's view lags behind
    assert [decided_by_rank0(lambda r=r: views[r], two_nodes(r), "x") for r in (0, 1)] == [views[0]] * 2

    def broken() -> Path:
        raise OSError("Input/output error")

    monkeypatch.setattr(dist, "broadcast_object_list", PlayedBroadcast())
    with pytest.raises(OSError, match="Input/output error"):  # rank 0: its own error, with its traceback
        decided_by_rank0(broken, two_nodes(0), "the checkpoint to resume from")
    with pytest.raises(ConfigError) as caught:  # rank 1: told at once, not after DIST_TIMEOUT_S
        decided_by_rank0(broken, two_nodes(1), "the checkpoint to resume from")
    assert caught.value.problems == ["rank 0 failed while choosing the checkpoint to resume from (OSError: "
                                     "Input/output error); see rank 0's error."]


def test_a_token_rank_0_cannot_write_stops_every_rank_with_the_same_line(tmp_path, monkeypatch):
    monkeypatch.delenv(SNAPSHOT_SHARED_ENV, raising=False)
    monkeypatch.setattr(dist, "broadcast_object_list", PlayedBroadcast())
    unmounted = tmp_path / "not-mounted"  # writing the token there raises FileNotFoundError on rank 0
    seen = []
    for rank in (0, 1):
        with pytest.raises(ConfigError) as caught:
            check_shared_directory(unmounted, two_nodes(rank))
        seen.append(caught.value.problems)
    assert seen[0] == seen[1] == [f"CHECKPOINT_DIR={unmounted}: rank 0 cannot write .shared-by-all-nodes "
                                  "there (No such file or directory); make the shared directory writable by "
                                  "the trainer's user on node 0."]


def test_a_rank_that_cannot_read_the_chosen_checkpoint_is_named_on_every_rank(monkeypatch):
    monkeypatch.setattr(D, "gather_to_all", lambda problem: [None, "No such file or directory"])
    for rank in (0, 1):
        with pytest.raises(ConfigError) as caught:
            problem = None if rank == 0 else "No such file or directory"
            require_on_every_rank(problem, two_nodes(rank), "RESUME")
        assert caught.value.problems == ["RESUME: rank 1 = node 1 (b, pid 2): No such file or directory"]
    monkeypatch.setattr(D, "gather_to_all", lambda problem: [None, None])
    require_on_every_rank(None, two_nodes(0), "RESUME")


# One rank of a gloo group of two; each rank sees CHECKPOINT_DIR as the directory given for it (rank 1's a
# stale snapshot without the newest checkpoint), as nodes with lagging views of a shared volume would.
AGREE_ON_RESUME = textwrap.dedent("""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from avatarl import distributed as D
    from avatarl.config import Config, ConfigError
    from avatarl.resume import restore_run
    from avatarl.trainer import agreed_resume_path

    info = D.init_distributed("cpu", 30.0)
    view = Path(sys.argv[1 + info.rank])
    chosen = agreed_resume_path(Config(), view, info)
    print("chosen", chosen, flush=True)
    try:
        restore_run(SimpleNamespace(info=info), view / chosen.name)  # this rank's view of rank 0's choice
    except ConfigError as err:
        print("refused", err, flush=True)
    D.cleanup()
""")


def test_two_ranks_resume_the_checkpoint_rank_0_chose_or_stop_together(tmp_path):
    views = [tmp_path / "rank0", tmp_path / "rank1"]
    for view in views:
        view.mkdir()
    for iteration in (4, 8):
        save_checkpoint(views[0], iteration, {"iteration": iteration}, keep=5)
    save_checkpoint(views[1], 4, {"iteration": 4}, keep=5)  # rank 1 alone would resume from iteration 4
    script = tmp_path / "agree.py"
    script.write_text(AGREE_ON_RESUME)
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                    PYTHONPATH=str(REPO))
    ranks = [subprocess.Popen([sys.executable, str(script), *map(str, views)], cwd=tmp_path, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in (0, 1)]
    outputs = [rank.communicate(timeout=TIMEOUT)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    newest = views[0] / "ckpt_00000008.pt"
    for view, text in zip(views, outputs, strict=True):
        assert f"chosen {newest}\n" in text, text  # not rank 1's own newest, ckpt_00000004.pt
        refusal = re.search(r"refused (.*)", text)
        assert refusal, text
        assert refusal.group(1).startswith(f"RESUME: cannot read the checkpoint {view / newest.name} "
                                           "that rank 0 chose (every rank must see CHECKPOINT_DIR as rank 0 "
                                           "does): rank 1 = ")
        assert "rank 0 =" not in refusal.group(1) and "No such file" in refusal.group(1)


def test_rendezvous_options_come_from_the_settings():
    cfg = Config.of(nnodes="2:4", node_rank=1, rdzv_endpoint="10.0.0.1:29400", rdzv_id="job7", max_restarts=3,
                 dist_timeout_s=90.5, n_gpus=8)
    assert rendezvous_args(cfg, TRAIN_ARGS) == [
        "--nproc-per-node=8", "--max-restarts=3", "--nnodes=2:4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=job7", "--rdzv-conf=is_host=0,join_timeout=91"]
    node_zero = Config.of(**{**cfg.to_dict(), "node_rank": 0})
    assert "--rdzv-conf=is_host=1,join_timeout=91" in rendezvous_args(node_zero, TRAIN_ARGS)
    # What the command line sets wins; --standalone or a rendezvous of one's own keeps torchrun's.
    standalone = ["--standalone", "--nproc_per_node", "2", *TRAIN_ARGS]
    assert rendezvous_args(cfg, standalone) == ["--max-restarts=3"]
    assert rendezvous_args(Config(), TRAIN_ARGS) == ["--nproc-per-node=1", "--max-restarts=0"]
    # Two nodes in one host's network can share a host name and (one PID namespace each) a process id,
    # torchrun's whole node identity: NODE_ADDR tells them apart.
    with_addr = Config.of(**{**cfg.to_dict(), "node_addr": "10.0.0.2"})
    node_addr = rendezvous_args(with_addr, TRAIN_ARGS)
    assert node_addr[:-1] == rendezvous_args(cfg, TRAIN_ARGS) and node_addr[-1] == "--local-addr=10.0.0.2"
    own_addr = ["--local_addr", "10.0.0.9", *TRAIN_ARGS]
    assert "--local-addr=10.0.0.2" not in rendezvous_args(with_addr, own_addr)
    for address in ("10.0.0.2", "fd00::2", "node-2.cluster.local"):
        assert Config.of(node_addr=address).distributed.node_addr == address
    assert given(["--max_restarts=1", *TRAIN_ARGS], "--max-restarts")
    assert not given([*TRAIN_ARGS, "--nnodes=2"], "--nnodes"), "the trainer's own flags are not torchrun's"


@pytest.mark.parametrize(("settings_", "problem"), [
    (dict(nnodes="two"), "NNODES='two' is not allowed"),
    (dict(nnodes="3:2", rdzv_endpoint="h:1"), "NNODES='3:2' is not allowed"),
    (dict(nnodes="2"), "RDZV_ENDPOINT is empty but NNODES=2"),
    (dict(nnodes="2", rdzv_endpoint="10.0.0.1"), "RDZV_ENDPOINT='10.0.0.1' is not host:port"),
    (dict(nnodes="2", rdzv_endpoint="h:1", node_rank=2), "NODE_RANK=2 is out of range"),
    (dict(rdzv_id="my job"), "RDZV_ID='my job' is not allowed"),
    (dict(node_addr="10.0.0.2 10.0.0.3"), "NODE_ADDR='10.0.0.2 10.0.0.3' is not an address"),
    (dict(node_addr="10.0.0.2:29400"), "NODE_ADDR='10.0.0.2:29400' is not an address"),
    (dict(node_addr="[fd00::2]"), "NODE_ADDR='[fd00::2]' is not an address"),
])
def test_bad_node_settings_are_one_line_each(settings_, problem):
    with pytest.raises(ConfigError) as caught:
        Config.of(**settings_)
    assert len(caught.value.problems) == 1 and caught.value.problems[0].startswith(problem)


def test_launch_refuses_bad_settings_before_starting_torchrun(tmp_path):
    done = run_cli(["launch", *TRAIN_ARGS], tmp_path, timeout=60, NNODES="2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: RDZV_ENDPOINT is empty but NNODES=2: several nodes "
                                                "need node 0's host:port, the same on every node."]
