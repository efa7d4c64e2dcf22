"""One typed configuration tree, read from the environment, a `.env` file and CLI flags.

Every field of `Config` is a setting whose environment variable is the field name in
UPPER_SNAKE case (`context_len` -> `CONTEXT_LEN`). Precedence, highest first:

    process environment  >  .env file  >  command-line flags  >  --preset NAME  >  defaults

(the seed's documented order: a deployment's environment always wins over a developer's flags). A
preset is a named .env file in avatarl/presets/ (cpu-small, bench-quick, tiny) that replaces defaults.
The one-line `doc` of each field is the CLI help, the `avatarl config` listing and the
generated `.env.example`, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class ConfigError(ValueError):
    """Bad configuration: one actionable line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def setting(default: Any, doc: str, group: str, *, choices: tuple[str, ...] = (), low: float | None = None,
            high: float | None = None, low_exclusive: bool = False) -> Any:
    """A config field with the metadata that drives parsing, validation, help and `.env.example`."""
    meta = {"doc": doc, "group": group, "choices": choices, "low": low, "high": high,
            "low_exclusive": low_exclusive}
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- data
    data_path: str = setting("", "UTF-8 text file, or a directory made by `avatarl prepare` (train.bin, val.bin, "
                             "meta.json; a nanoGPT one works too); empty = Tiny Shakespeare, shipped in the package.",
                             "data")
    tokenizer: str = setting("char", "char (the corpus's characters), gpt2 (tiktoken), a .tiktoken rank file, or a "
                             "Hugging Face tokenizer.json / directory; with prepared data, char = the data's own.",
                             "data")
    data_cache_dir: str = setting("~/.cache/avatarl", "Where the default corpus is downloaded when the packaged "
                                  "copy is missing.", "data")
    seed: int = setting(1337, "Random seed: same seed, same batches, same weights.", "data", low=0)

    # --- model
    context_len: int = setting(32, "Characters of context the policy conditions on.", "model", low=1)
    horizon: int = setting(8, "Characters the policy generates per rollout (GRPO).", "model", low=1)
    n_layer: int = setting(6, "Transformer blocks of the student.", "model", low=1)
    n_head: int = setting(8, "Attention heads per block; must divide N_EMB.", "model", low=1)
    n_emb: int = setting(512, "Width of the residual stream.", "model", low=2)
    use_flash_attn: bool = setting(True, "Use flash-attn when installed and on CUDA; otherwise PyTorch SDPA.",
                                   "model")
    use_torch_compile: bool = setting(False, "torch.compile the student model (CUDA recommended).", "model")
    use_cuda_graphs: bool = setting(False, "Replay the GRPO rollout's decode steps from one captured CUDA graph "
                                           "(CUDA only; ignored on a CPU).", "model")

    # --- algorithm
    algorithm: str = setting("grpo", "RL algorithm for the student.", "algorithm", choices=("grpo", "avatarl"))
    rollouts: str = setting("autoregressive", "GRPO rollouts: autoregressive (K continuations of HORIZON tokens "
                            "per context, the seed) or teacher_forced (K tokens drawn at every position of a "
                            "window from one forward pass; the group is the K draws at one position).",
                            "algorithm", choices=("autoregressive", "teacher_forced"))
    k_samples: int = setting(4, "Rollouts per context (the GRPO group size; teacher_forced: draws per position).",
                             "algorithm", low=2)
    temperature: float = setting(1.2, "Sampling temperature of the rollouts.", "algorithm", low=0.0,
                                 low_exclusive=True)
    clip_ratio: float = setting(0.2, "PPO clip range of the importance ratio.", "algorithm", low=0.0,
                                low_exclusive=True, high=1.0)
    entropy_coef: float = setting(0.01, "Weight of the entropy bonus (AvataRL: logit temperature 1+coef).",
                                  "algorithm", low=0.0)
    beta_kl: float = setting(1.0, "Initial weight of the KL penalty toward the n-gram reference (seed: 1e-3, "
                             "which collapses; see docs/grpo-defaults.md).", "algorithm", low=0.0)
    kl_warm: int = setting(0, "Characters over which the KL weight ramps up from 0 to BETA_KL (0 = no ramp).",
                           "algorithm", low=0)
    adaptive_kl: bool = setting(True, "Adapt the KL weight so the measured KL tracks KL_TARGET.", "algorithm")
    kl_target: float = setting(0.1, "Target KL (nats/char) for the adaptive controller.", "algorithm", low=0.0,
                               low_exclusive=True)
    kl_max_coef: float = setting(100.0, "Upper bound of the adaptive KL weight.", "algorithm", low=0.0,
                                 low_exclusive=True)
    min_variance: float = setting(0.1, "Floor of the group reward std when normalising advantages.", "algorithm",
                                  low=0.0, low_exclusive=True)
    old_policy_interval: int = setting(5, "Iterations between refreshes of the frozen sampling policy.",
                                       "algorithm", low=1)
    reference: str = setting("ngram", "Reference model for partial credit: n-gram counts or a HF causal LM.",
                             "algorithm", choices=("ngram", "gpt2"))
    ngram_order: int = setting(3, "Order of the n-gram reference (2 = bigram, 3 = trigram).", "algorithm", low=1,
                               high=4)
    reference_model: str = setting("gpt2", "Hugging Face model name or local path when REFERENCE=gpt2.",
                                   "algorithm")
    exact_match_reward: float = setting(1.0, "Reward for generating the true char (0 with PARTIAL_CREDIT=0 = "
                                        "reward off, the KL-only ablation).", "algorithm", low=0.0)
    partial_credit: float = setting(1.0, "Weight of the reference-probability partial credit in the reward.",
                                    "algorithm", low=0.0)
    entropy_warn: float = setting(0.3, "Warn when the policy entropy (nats/char) falls below this.", "algorithm",
                                  low=0.0)

    # --- avatarl referee
    referee_path: str = setting("", "Referee: an `avatarl train-referee` file, or a Hugging Face causal LM (hub name "
                                "or local directory) with the student's tokenizer; empty = CHECKPOINT_DIR/referee.pt.",
                                "referee")
    referee_revision: str = setting("", "Hub revision (branch, tag or commit) of a Hugging Face REFEREE_PATH; empty = "
                                    "the default branch.", "referee")
    referee_quantize: str = setting("none", "Load a Hugging Face referee in 8-bit or 4-bit NF4 through bitsandbytes "
                                    "(CUDA only); none = bf16 on CUDA, float32 on a CPU.", "referee",
                                    choices=("none", "int8", "nf4"))
    referee_n_layer: int = setting(0, "Referee blocks; 0 = same as N_LAYER.", "referee", low=0)
    referee_n_head: int = setting(0, "Referee heads; 0 = same as N_HEAD.", "referee", low=0)
    referee_n_emb: int = setting(0, "Referee width; 0 = same as N_EMB.", "referee", low=0)
    referee_iters: int = setting(300, "Optimizer steps of `avatarl train-referee`.", "referee", low=1)
    top_k: int = setting(16, "Candidates per position from student and from referee (AvataRL).", "referee", low=1)
    action_set: str = setting("topk", "AvataRL's actions per position: topk = student top-k, referee top-k and the "
                              "true token; full = every id of the vocabulary ([positions, vocab] memory).", "referee",
                              choices=("topk", "full"))
    label_smoothing: float = setting(0.1, "Reality mass spread over the non-true actions.", "referee", low=0.0,
                                     high=1.0)
    reality_weight: float = setting(0.7, "Exponent of the ground-truth distribution in the ideal.", "referee",
                                    low=0.0)
    mentor_weight: float = setting(0.3, "Exponent of the referee distribution in the ideal.", "referee", low=0.0)
    reward_scale: float = setting(100.0, "Reward = scale x ideal probability of above-mean actions.", "referee",
                                  low=0.0, low_exclusive=True)
    max_reward_clamp: float = setting(1.5, "Largest reward per position; larger rewards are scaled down.",
                                      "referee", low=0.0, low_exclusive=True)

    # --- optimisation
    batch: int = setting(16384, "Contexts per optimizer step, summed over ranks.", "optim", low=1)
    micro_batch: int = setting(512, "Contexts per forward pass on one rank (lower it on out-of-memory).",
                               "optim", low=1)
    total_iters: int = setting(2000, "Optimizer steps of the run.", "optim", low=1)
    lr: float = setting(3e-4, "Peak learning rate of AdamW.", "optim", low=0.0, low_exclusive=True)
    min_lr: float = setting(3e-5, "Learning rate at the end of the decay.", "optim", low=0.0)
    weight_decay: float = setting(0.0, "AdamW weight decay of matrices.", "optim", low=0.0)
    use_lr_decay: bool = setting(True, "Decay the learning rate after warmup.", "optim")
    lr_decay_type: str = setting("cosine", "Shape of the decay.", "optim", choices=("cosine", "linear", "exponential"))
    warmup_iters: int = setting(100, "Linear warmup steps.", "optim", low=0)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this (0 = off).", "optim", low=0.0)
    use_amp: bool = setting(True, "Autocast on CUDA with AMP_DTYPE.", "optim")
    amp_dtype: str = setting("bfloat16", "Autocast dtype on CUDA.", "optim", choices=("bfloat16", "float16"))

    # --- logging, evaluation, checkpoints
    log_interval: int = setting(5, "Iterations between metric logs.", "logging", low=1)
    eval_interval: int = setting(20, "Iterations between validation cross-entropy measurements.", "logging", low=1)
    eval_windows: int = setting(256, "Validation windows of CONTEXT_LEN chars per measurement.", "logging", low=1)
    sample_interval: int = setting(20, "Iterations between printed text samples (0 = only at the end).",
                                   "logging", low=0)
    degeneracy_warn: float = setting(0.2, "Warn when distinct-2 of the text samples (unique / all token pairs) "
                                     "falls below this: text that repeats itself (0 = never).", "logging",
                                     low=0.0, high=1.0)
    checkpoint_interval: int = setting(100, "Iterations between checkpoints.", "logging", low=1)
    save_intermediate_checkpoints: bool = setting(True, "Save every CHECKPOINT_INTERVAL iterations.", "logging")
    save_final_checkpoint: bool = setting(True, "Save when the run ends.", "logging")
    checkpoint_dir: str = setting("./checkpoints", "Checkpoints, metrics.jsonl and heartbeat go here.", "logging")
    keep_checkpoints: int = setting(3, "Newest checkpoints kept on disk.", "logging", low=1)
    resume: str = setting("auto", "auto (newest valid checkpoint), never, or a checkpoint path.", "logging")
    overwrite: bool = setting(False, "With RESUME=never, allow replacing an existing run.", "logging")
    max_bad_steps: int = setting(10, "Consecutive non-finite steps before the run stops (exit 3).", "logging",
                                 low=1)
    heartbeat_interval: float = setting(30.0, "Seconds between heartbeat.json updates.", "logging", low=0.0,
                                        low_exclusive=True)
    use_wandb: bool = setting(True, "Log to Weights & Biases when installed (WANDB_MODE=offline works).",
                              "logging")
    wandb_project: str = setting("avataRL", "Weights & Biases project.", "logging")
    wandb_name: str = setting("", "Weights & Biases run name (empty = generated).", "logging")
    log_level: str = setting("INFO", "Logging verbosity.", "logging", choices=("INFO", "DEBUG"))

    # --- runtime
    device: str = setting("auto", "auto = CUDA when available, else CPU.", "runtime", choices=("auto", "cpu", "cuda"))
    n_gpus: int = setting(1, "GPUs the launchers (compose, Modal, torchrun) start.", "runtime", low=1)
    gpu_type: str = setting("A100", "GPU type for Modal and for MFU peaks.", "runtime",
                            choices=("T4", "L4", "A10G", "L40S", "A100", "A100-80GB", "H100", "H200", "B200"))
    bucket_size_mb: int = setting(25, "DDP gradient bucket size.", "runtime", low=1)
    training_mode: str = setting("generic", "generic = this machine; modal = hand over to Modal.", "runtime",
                                 choices=("generic", "modal"))

    # --- several nodes (`avatarl launch` without --standalone; compose train-multinode, k8s, Modal)
    nnodes: str = setting("1", "Nodes of the job: N, or MIN:MAX for elastic membership (torchrun --nnodes); a "
                          "round with another node count resumes with re-seeded data order (not bit-identical) "
                          "and needs BATCH to split over its ranks.", "distributed")
    node_rank: int = setting(0, "This node's number; node 0 hosts the rendezvous at RDZV_ENDPOINT (the c10d "
                             "rendezvous orders the ranks itself).", "distributed", low=0)
    rdzv_endpoint: str = setting("", "host:port of the rendezvous on node 0, reachable from every node; required "
                                 "when NNODES is not 1.", "distributed")
    rdzv_id: str = setting("avatarl", "Job id: nodes with the same id and endpoint form one job.", "distributed")
    node_addr: str = setting("", "This node's address as the other nodes reach it (torchrun --local-addr); empty: "
                             "its host name. torchrun tells nodes apart by address and process id, so nodes that "
                             "share one host's network (containers on one machine) each need their own.",
                             "distributed")
    max_restarts: int = setting(0, "Times torchrun restarts the worker group after a worker or node fails; "
                                "restarted workers resume from the newest checkpoint (Modal: 0 when MODAL_NODES > 1, "
                                "its retries restart a cluster).", "distributed", low=0)
    dist_timeout_s: float = setting(600.0, "Seconds a rank waits for its peers in a collective before it stops "
                                    "with an error naming them.", "distributed", low=0.0, low_exclusive=True)

    def __post_init__(self) -> None:
        problems = [p for f in fields(self) if (p := _range_problem(f, getattr(self, f.name)))]
        if self.n_emb % self.n_head:
            problems.append(f"N_EMB={self.n_emb} is not divisible by N_HEAD={self.n_head}: "
                            "choose N_HEAD among the divisors of N_EMB.")
        if (self.n_emb // self.n_head) % 2:
            problems.append(f"N_EMB/N_HEAD={self.n_emb // self.n_head} is odd: rotary embeddings need an even "
                            "head size.")
        if self.batch % self.micro_batch:
            problems.append(f"BATCH={self.batch} is not a multiple of MICRO_BATCH={self.micro_batch}: "
                            "set BATCH to MICRO_BATCH x world size x accumulation steps.")
        if self.rollouts == "teacher_forced" and self.reference != "ngram":
            problems.append(f"ROLLOUTS=teacher_forced with REFERENCE={self.reference}: teacher-forced rollouts "
                            "score every position with the n-gram; set REFERENCE=ngram.")
        if self.min_lr > self.lr:
            problems.append(f"MIN_LR={self.min_lr} is above LR={self.lr}: it must be at most LR.")
        problems += node_problems(self)
        if problems:
            raise ConfigError(problems)

    def check_world_size(self, world_size: int) -> None:
        """BATCH must split evenly into micro-batches on every rank."""
        if self.batch % (self.micro_batch * world_size):
            raise ConfigError([f"BATCH={self.batch} is not a multiple of MICRO_BATCH x world size = "
                               f"{self.micro_batch} x {world_size}: set BATCH to a multiple of "
                               f"{self.micro_batch * world_size}."])

    @property
    def node_range(self) -> tuple[int, int]:
        """NNODES as (fewest, most) nodes; (1, 1) when NNODES is not valid (node_problems says why)."""
        return parse_nnodes(self.nnodes) or (1, 1)

    def grad_accum_steps(self, world_size: int) -> int:
        return self.batch // (self.micro_batch * world_size)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def seq_len(self) -> int:
        """Longest sequence the model sees: a context plus a full rollout."""
        return self.context_len + self.horizon


# Variables that are not trainer settings but belong in `.env`: launchers, containers, secrets.
LAUNCHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("AVATARL_IMAGE", "avatarl:latest", "Image name:tag that compose and Modal build and run."),
    ("CHECKPOINT_HOST_DIR", "./checkpoints", "Host directory mounted at /checkpoints in the containers."),
    ("DATA_HOST_DIR", "./data", "Host directory mounted at /data (corpora, DATA_PATH=/data/...)."),
    ("CACHE_HOST_DIR", "./.cache", "Host directory mounted at /cache (downloads, HF models)."),
    ("HOST_UID", "1000", "User id the containers run as, so host-mounted files stay yours."),
    ("MODAL_DATA_VOLUME", "avatarl-data", "Modal volume holding corpora and caches."),
    ("MODAL_CHECKPOINT_VOLUME", "avatarl-checkpoints", "Modal volume holding checkpoints."),
    ("MODAL_WANDB_SECRET", "", "Name of a Modal secret with WANDB_API_KEY (empty = pass the local one)."),
    ("MODAL_TIMEOUT_HOURS", "24", "Wall-clock limit of the Modal training function."),
    ("MODAL_NODES", "1", "Containers of one Modal cluster (modal.clustered), each with N_GPUS=8; 1 = one container."),
    ("NCCL_SOCKET_IFNAME", "", "Network interface NCCL uses between nodes (e.g. eth0); empty = NCCL's choice."),
    ("GLOO_SOCKET_IFNAME", "", "Network interface gloo (CPU runs) uses between nodes; empty = gloo's choice."),
    ("NCCL_IB_DISABLE", "", "1 turns InfiniBand off for NCCL (nodes joined by Ethernet only)."),
    ("NCCL_DEBUG", "", "INFO prints NCCL's choice of interfaces and transports (debugging several nodes)."),
    ("WANDB_API_KEY", "", "Weights & Biases key; never printed, logged or saved."),
    ("WANDB_MODE", "", "offline writes runs locally (sync later with `wandb sync`)."),
    ("HF_TOKEN", "", "Hugging Face token for gated REFERENCE_MODEL; never printed."),
    ("HF_HOME", "", "Hugging Face cache directory."),
)
LAUNCHER_NAMES = frozenset(name for name, _, _ in LAUNCHER_VARIABLES)


def env_name(field_name: str) -> str:
    return field_name.upper()


def is_secret(name: str) -> bool:
    return any(marker in name.upper() for marker in SECRET_MARKERS)


def _range_problem(f: Any, value: Any) -> str | None:
    meta, name = f.metadata, env_name(f.name)
    if meta["choices"] and value not in meta["choices"]:
        return f"{name}={value!r} is not allowed: choose one of {', '.join(meta['choices'])}."
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}={value} is not a finite number."
    low, high = meta["low"], meta["high"]
    if low is not None and (value <= low if meta["low_exclusive"] else value < low):
        bound = f"greater than {low:g}" if meta["low_exclusive"] else f"at least {low:g}"
        return f"{name}={value} is out of range: it must be {bound}."
    if high is not None and value > high:
        return f"{name}={value} is out of range: it must be at most {high:g}."
    return None


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


def node_problems(cfg: Config) -> list[str]:
    """What is wrong with the settings of several nodes, one line each."""
    nodes = parse_nnodes(cfg.nnodes)
    if nodes is None:
        return [f"NNODES={cfg.nnodes!r} is not allowed: give a number of nodes (2) or a MIN:MAX range (2:4), "
                "at least 1."]
    problems = []
    if cfg.node_rank >= nodes[1]:
        problems.append(f"NODE_RANK={cfg.node_rank} is out of range: with NNODES={cfg.nnodes} it must be below "
                        f"{nodes[1]}.")
    host, _, port = cfg.rdzv_endpoint.rpartition(":")
    if cfg.rdzv_endpoint and not (host and port.isdigit() and 0 < int(port) < 65536):
        problems.append(f"RDZV_ENDPOINT={cfg.rdzv_endpoint!r} is not host:port: give node 0's address and a free "
                        "port, e.g. 10.0.0.1:29400.")
    if nodes != (1, 1) and not cfg.rdzv_endpoint:
        problems.append(f"RDZV_ENDPOINT is empty but NNODES={cfg.nnodes}: several nodes need node 0's host:port, "
                        "the same on every node.")
    if not cfg.rdzv_id or not all(c.isalnum() or c in "-_." for c in cfg.rdzv_id):
        problems.append(f"RDZV_ID={cfg.rdzv_id!r} is not allowed: use letters, digits, '-', '_' or '.'.")
    if cfg.node_addr and not is_plain_address(cfg.node_addr):
        problems.append(f"NODE_ADDR={cfg.node_addr!r} is not an address: give this node's host name or IP "
                        "address alone, e.g. 10.0.0.2 or fd00::2 (no port, no brackets).")
    return problems


def config_fields() -> dict[str, Any]:
    return {env_name(f.name): f for f in fields(Config)}
