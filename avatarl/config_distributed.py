"""The settings of where a run starts and over how many processes and nodes: the distributed section
(DDP buckets, torchrun's rendezvous: NNODES, NODE_RANK, RDZV_ENDPOINT, NODE_ADDR, restarts, the peer
timeout) and the launch section (this machine or Modal, its GPUs), each checking its own fields."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from avatarl.config_schema import GpuType, Section, TrainingMode, setting


@dataclass
class DistributedSettings(Section):
    """Several processes and nodes (distributed.py, launchers/torchrun.py)."""

    bucket_size_mb: int = setting(25, "DDP gradient bucket size.", low=1)
    nnodes: str = setting(
        "1",
        "Nodes of the job: N, or MIN:MAX for elastic membership (torchrun --nnodes); a round with another "
        "node count resumes with re-seeded data order (not bit-identical) and needs BATCH to split over its "
        "ranks.",
    )
    node_rank: int = setting(
        0,
        "This node's number; node 0 hosts the rendezvous at RDZV_ENDPOINT (the c10d rendezvous orders the "
        "ranks itself).", low=0)
    rdzv_endpoint: str = setting(
        "",
        "host:port of the rendezvous on node 0, reachable from every node; required when NNODES is not 1.",
    )
    rdzv_id: str = setting("avatarl", "Job id: nodes with the same id and endpoint form one job.")
    node_addr: str = setting(
        "",
        "This node's address as the other nodes reach it (torchrun --local-addr); empty: its host name. "
        "torchrun tells nodes apart by address and process id, so nodes that share one host's network "
        "(containers on one machine) each need their own.",
    )
    max_restarts: int = setting(
        0,
        "Times torchrun restarts the worker group after a worker or node fails; restarted workers resume "
        "from the newest checkpoint (Modal: 0 when MODAL_NODES > 1, its retries restart a cluster).", low=0)
    dist_timeout_s: float = setting(
        600.0,
        "Seconds a rank waits for its peers in a collective before it stops with an error naming them.",
        low=0.0, low_exclusive=True)

    def problems(self) -> list[str]:
        return node_problems(self)

    @property
    def node_range(self) -> tuple[int, int]:
        """NNODES as (fewest, most) nodes; (1, 1) when NNODES is not valid (node_problems says why)."""
        return parse_nnodes(self.nnodes) or (1, 1)


@dataclass
class LaunchSettings(Section):
    """Where the run starts: this machine or Modal, and its GPUs (launchers/)."""

    training_mode: TrainingMode = setting(
        TrainingMode.GENERIC,
        "generic = this machine; modal = hand over to Modal.", choices=TrainingMode)
    n_gpus: int = setting(1, "GPUs the launchers (compose, Modal, torchrun) start.", low=1)
    gpu_type: GpuType = setting(GpuType.A100, "GPU type for Modal and for MFU peaks.", choices=GpuType)



def parse_nnodes(text: str) -> tuple[int, int] | None:
    """"4" -> (4, 4), "2:4" -> (2, 4); None when the text is neither form or the range is empty."""
    low, _, high = text.strip().partition(":")
    if not (low.isdigit() and (high or low).isdigit()):
        return None
    fewest, most = int(low), int(high or low)
    return (fewest, most) if 1 <= fewest <= most else None


def is_plain_address(text: str) -> bool:
    """A host name, an IPv4 address or an unbracketed IPv6 address, as torchrun's --local-addr takes it
    (it becomes the workers' MASTER_ADDR on the node of rank 0)."""
    if ":" in text:
        try:
            return ipaddress.ip_address(text).version == 6
        except ValueError:
            return False
    return re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", text) is not None


def node_problems(cfg: DistributedSettings) -> list[str]:
    """What is wrong with the settings of several nodes, one line each."""
    nodes = parse_nnodes(cfg.nnodes)
    if nodes is None:
        return [f"NNODES={cfg.nnodes!r} is not allowed: give a number of nodes (2) or a MIN:MAX range (2:4), "
                "at least 1."]
    problems = []
    if cfg.node_rank >= nodes[1]:
        problems.append(f"NODE_RANK={cfg.node_rank} is out of range: with NNODES={cfg.nnodes} it must be "
                        f"below {nodes[1]}.")
    host, _, port = cfg.rdzv_endpoint.rpartition(":")
    if cfg.rdzv_endpoint and not (host and port.isdigit() and 0 < int(port) < 65536):
        problems.append(f"RDZV_ENDPOINT={cfg.rdzv_endpoint!r} is not host:port: give node 0's address "
                        "and a free port, e.g. 10.0.0.1:29400.")
    if nodes != (1, 1) and not cfg.rdzv_endpoint:
        problems.append(f"RDZV_ENDPOINT is empty but NNODES={cfg.nnodes}: several nodes need node 0's "
                        "host:port, the same on every node.")
    if not cfg.rdzv_id or not all(c.isalnum() or c in "-_." for c in cfg.rdzv_id):
        problems.append(f"RDZV_ID={cfg.rdzv_id!r} is not allowed: use letters, digits, '-', '_' or '.'.")
    if cfg.node_addr and not is_plain_address(cfg.node_addr):
        problems.append(f"NODE_ADDR={cfg.node_addr!r} is not an address: give this node's host name or IP "
                        "address alone, e.g. 10.0.0.2 or fd00::2 (no port, no brackets).")
    return problems
