"""The settings of each component, one dataclass per section: data, model, optim, grpo, avatarl,
referee, run (the distributed and launch sections are in config_distributed.py). Each checks its own
ranges and the relations between its fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from avatarl.config_schema import (
    ActionSet,
    Advantage,
    Algorithm,
    AmpDtype,
    ConfigError,
    Credit,
    DeviceKind,
    LogLevel,
    LrDecay,
    Quantize,
    Reference,
    RewardNorm,
    Rollouts,
    SampledAdvantage,
    Sampling,
    Section,
    setting,
)


@dataclass
class DataSettings(Section):
    """The corpus and its tokens (data/: corpus, tokenizers, samplers)."""

    data_path: str = setting(
        "",
        "UTF-8 text file, or a directory made by `avatarl prepare` (train.bin, val.bin, meta.json; a nanoGPT"
        " one works too); empty = Tiny Shakespeare, shipped in the package.",
    )
    tokenizer: str = setting(
        "char",
        "char (the corpus's characters), gpt2 (tiktoken), a .tiktoken rank file, or a Hugging Face "
        "tokenizer.json / directory; with prepared data, char = the data's own.",
    )
    data_cache_dir: str = setting(
        "~/.cache/avatarl",
        "Where the default corpus is downloaded when the packaged copy is missing.",
    )


@dataclass
class ModelSettings(Section):
    """The student GPT (model.py)."""

    context_len: int = setting(32, "Tokens of context the policy conditions on.", low=1)
    n_layer: int = setting(6, "Transformer blocks of the student.", low=1)
    n_head: int = setting(8, "Attention heads per block; must divide N_EMB.", low=1)
    n_emb: int = setting(512, "Width of the residual stream.", low=2)
    use_flash_attn: bool = setting(True, "Use flash-attn when installed and on CUDA; otherwise PyTorch SDPA.")
    use_torch_compile: bool = setting(False, "torch.compile the student model (CUDA recommended).")
    use_cuda_graphs: bool = setting(
        False,
        "Replay the GRPO rollout's decode steps from one captured CUDA graph (CUDA only; ignored on a CPU).",
    )

    def problems(self) -> list[str]:
        if self.n_emb % self.n_head:
            return [f"N_EMB={self.n_emb} is not divisible by N_HEAD={self.n_head}: "
                    "choose N_HEAD among the divisors of N_EMB."]
        if (self.n_emb // self.n_head) % 2:
            return [f"N_EMB/N_HEAD={self.n_emb // self.n_head} is odd: rotary embeddings need an even "
                    "head size."]
        return []


@dataclass
class OptimSettings(Section):
    """AdamW, its schedule and the batch (trainer.py, schedule.py)."""

    batch: int = setting(16384, "Contexts per optimizer step, summed over ranks.", low=1)
    micro_batch: int = setting(
        512,
        "Contexts per forward pass on one rank (lower it on out-of-memory).", low=1)
    total_iters: int = setting(2000, "Optimizer steps of the run.", low=1)
    lr: float = setting(3e-4, "Peak learning rate of AdamW.", low=0.0, low_exclusive=True)
    min_lr: float = setting(3e-5, "Learning rate at the end of the decay.", low=0.0)
    weight_decay: float = setting(0.0, "AdamW weight decay of matrices.", low=0.0)
    use_lr_decay: bool = setting(True, "Decay the learning rate after warmup.")
    lr_decay_type: LrDecay = setting(LrDecay.COSINE, "Shape of the decay.", choices=LrDecay)
    warmup_iters: int = setting(100, "Linear warmup steps.", low=0)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this (0 = off).", low=0.0)
    use_amp: bool = setting(True, "Autocast on CUDA with AMP_DTYPE.")
    amp_dtype: AmpDtype = setting(AmpDtype.BFLOAT16, "Autocast dtype on CUDA.", choices=AmpDtype)

    def problems(self) -> list[str]:
        problems = []
        if self.batch % self.micro_batch:
            problems.append(f"BATCH={self.batch} is not a multiple of MICRO_BATCH={self.micro_batch}: "
                            "set BATCH to MICRO_BATCH x world size x accumulation steps.")
        if self.min_lr > self.lr:
            problems.append(f"MIN_LR={self.min_lr} is above LR={self.lr}: it must be at most LR.")
        return problems

    def check_world_size(self, world_size: int) -> None:
        """BATCH must split evenly into micro-batches on every rank."""
        if self.batch % (self.micro_batch * world_size):
            raise ConfigError([f"BATCH={self.batch} is not a multiple of MICRO_BATCH x world size = "
                               f"{self.micro_batch} x {world_size}: set BATCH to a multiple of "
                               f"{self.micro_batch * world_size}."])

    def grad_accum_steps(self, world_size: int) -> int:
        return self.batch // (self.micro_batch * world_size)


@dataclass
class GRPOSettings(Section):
    """GRPO: rollouts, rewards, the PPO-clip loss and its KL penalty (algorithms/)."""

    rollouts: Rollouts = setting(
        Rollouts.AUTOREGRESSIVE,
        "GRPO rollouts: autoregressive (K continuations of HORIZON tokens per context, the seed) or "
        "teacher_forced (K tokens drawn at every position of a window from one forward pass; the group is "
        "the K draws at one position).", choices=Rollouts)
    horizon: int = setting(8, "Tokens the policy generates per rollout (autoregressive GRPO).", low=1)
    credit: Credit = setting(
        Credit.ALL,
        "Autoregressive GRPO: which generated tokens earn reward: all (each scored against the true token "
        "at its position, the seed) or prefix (only while the tokens sampled before it are the true ones; "
        "its group is the samples sharing that prefix; docs/grpo-defaults.md).", choices=Credit)
    k_samples: int = setting(
        4,
        "Rollouts per context (the GRPO group size; teacher_forced: draws per position).", low=2)
    k_fraction: float = setting(
        0.0,
        "Teacher-forced draws per position as a share of the vocabulary, K = ceil(K_FRACTION x V), so K "
        "scales with the tokenizer (0 = K_SAMPLES).", low=0.0, high=1.0)
    sampling: Sampling = setting(
        Sampling.WITH_REPLACEMENT,
        "Teacher-forced draws: with_replacement (K independent draws) or without_replacement (K distinct "
        "ids, Gumbel top-K), which hits the true token more often for the same K.", choices=Sampling)
    advantage: Advantage = setting(
        Advantage.GROUP_STD,
        "GRPO advantages: group_std ((r - group mean) / max(std, MIN_VARIANCE), GRPO's), log_reward "
        "(the gradient of log E[r]: for exact match, the likelihood gradient where a draw hit the truth) "
        "or importance (teacher-forced: r / the draw's inclusion probability, an unbiased estimate of "
        "the gradient of the sum over every id of r(a) log pi_T(a), pi_T the policy at TEMPERATURE; "
        "avatarl/algorithms/log_reward.py).",
        choices=Advantage)
    temperature: float = setting(1.2, "Sampling temperature of the rollouts.", low=0.0, low_exclusive=True)
    clip_ratio: float = setting(
        0.2,
        "PPO clip range of the importance ratio.", low=0.0, low_exclusive=True, high=1.0)
    entropy_coef: float = setting(
        0.01,
        "Weight of the entropy bonus (AvataRL: logit temperature 1+coef).", low=0.0)
    beta_kl: float = setting(
        1.0,
        "Initial weight of the KL penalty toward the n-gram reference (seed: 1e-3, which collapses; see "
        "docs/grpo-defaults.md).", low=0.0)
    kl_warm: int = setting(
        0,
        "Tokens over which the KL weight ramps up from 0 to BETA_KL (0 = no ramp).", low=0)
    adaptive_kl: bool = setting(True, "Adapt the KL weight so the measured KL tracks KL_TARGET.")
    kl_target: float = setting(
        0.1,
        "Target KL (nats/token) for the adaptive controller.", low=0.0, low_exclusive=True)
    kl_max_coef: float = setting(100.0, "Upper bound of the adaptive KL weight.", low=0.0, low_exclusive=True)
    min_variance: float = setting(
        0.1,
        "Floor of the group reward std when normalising advantages.", low=0.0, low_exclusive=True)
    old_policy_interval: int = setting(
        5,
        "Iterations between refreshes of the frozen sampling policy.", low=1)
    reference: Reference = setting(
        Reference.NGRAM,
        "Reference model for partial credit: n-gram counts, or a HF causal LM (gpt2: TOKENIZER=char only; "
        "the KL anchor stays the n-gram).", choices=Reference)
    ngram_order: int = setting(
        3,
        "Order of GRPO's n-gram reference (1 = unigram ... 4): sparse counts of the contexts seen in "
        "training, so every order runs at every vocabulary.", low=1, high=4)
    reference_model: str = setting("gpt2", "Hugging Face model name or local path when REFERENCE=gpt2.")
    exact_match_reward: float = setting(
        1.0,
        "Reward for generating the true token (0 with PARTIAL_CREDIT=0 = reward off, the KL-only ablation).",
        low=0.0)
    partial_credit: float = setting(
        1.0,
        "Weight of the reference-probability partial credit in the reward.", low=0.0)

    def problems(self) -> list[str]:
        problems = []
        if self.rollouts == Rollouts.TEACHER_FORCED and self.reference != Reference.NGRAM:
            problems.append(f"ROLLOUTS=teacher_forced with REFERENCE={self.reference}: teacher-forced "
                            "rollouts score every position with the n-gram; set REFERENCE=ngram.")
        if self.rollouts == Rollouts.TEACHER_FORCED and self.credit != Credit.ALL:
            problems.append(f"CREDIT={self.credit} applies to autoregressive rollouts (teacher-forced "
                            "draws always follow the true prefix): set ROLLOUTS=autoregressive, or leave "
                            "CREDIT at all.")
        if self.rollouts == Rollouts.AUTOREGRESSIVE:
            for name, value, default in (("SAMPLING", self.sampling, Sampling.WITH_REPLACEMENT),
                                         ("K_FRACTION", self.k_fraction, 0.0)):
                if value != default:
                    problems.append(f"{name}={value} applies to teacher-forced draws: "
                                    "set ROLLOUTS=teacher_forced (or --preset grpo-log-reward), "
                                    f"or leave {name} at {default}.")
            if self.advantage == Advantage.IMPORTANCE:
                problems.append("ADVANTAGE=importance applies to teacher-forced draws: set "
                                "ROLLOUTS=teacher_forced, or ADVANTAGE=group_std or log_reward.")
        return problems


@dataclass
class AvatarlSettings(Section):
    """AvataRL: its actions, ideal distribution and rewards (algorithms/avatarl.py)."""

    top_k: int = setting(16, "Candidates per position from student and from referee (AvataRL).", low=1)
    action_set: ActionSet = setting(
        ActionSet.TOPK,
        "AvataRL's actions per position: topk = student top-k, referee top-k and the true token; full = "
        "every id of the vocabulary ([positions, vocab] memory); sampled = SAMPLE_FRACTION x vocabulary "
        "draws from the student, each paid its ideal probability when above the mean (on-policy).",
        choices=ActionSet)
    label_smoothing: float = setting(0.1, "Reality mass spread over the non-true actions.", low=0.0, high=1.0)
    reality_weight: float = setting(0.7, "Exponent of the ground-truth distribution in the ideal.", low=0.0)
    mentor_weight: float = setting(0.3, "Exponent of the referee distribution in the ideal.", low=0.0)
    reward_scale: float = setting(
        100.0,
        "Reward = scale x ideal probability of above-mean actions.", low=0.0, low_exclusive=True)
    max_reward_clamp: float = setting(
        1.5,
        "Largest reward per position; larger rewards are scaled down.", low=0.0, low_exclusive=True)
    reward_norm: RewardNorm = setting(
        RewardNorm.REWARDS,
        "Per-position divisor of the topk/full loss: rewards = the position's summed reward (every position "
        "weighs 1; REWARD_SCALE and MAX_REWARD_CLAMP then cancel), actions = its action count (upstream's).",
        choices=RewardNorm)
    sample_fraction: float = setting(
        0.5,
        "With ACTION_SET=sampled, the distinct draws per position, ceil(SAMPLE_FRACTION x vocabulary).",
        low=0.0, low_exclusive=True, high=1.0)
    sampled_advantage: SampledAdvantage = setting(
        SampledAdvantage.IMPORTANCE,
        "With ACTION_SET=sampled, importance (r / inclusion probability: an unbiased estimate of the "
        "exhaustive gradient), log_reward (of log E[r]) or mean (r - the group's mean reward).",
        choices=SampledAdvantage)

    def problems(self) -> list[str]:
        if self.action_set == ActionSet.SAMPLED:
            return []
        defaults = {f.name: f.default for f in fields(self)}
        return [f"{name.upper()}={getattr(self, name)} applies to sampled actions: set ACTION_SET=sampled, "
                f"or leave {name.upper()} at {defaults[name]}."
                for name in ("sample_fraction", "sampled_advantage") if getattr(self, name) != defaults[name]]


@dataclass
class RefereeSettings(Section):
    """The AvataRL referee: where it comes from, how it loads, its shape (referee/)."""

    referee_path: str = setting(
        "",
        "Referee: an `avatarl train-referee` file, or a Hugging Face causal LM (hub name or local directory)"
        " with the student's tokenizer; empty = CHECKPOINT_DIR/referee.pt.",
    )
    referee_revision: str = setting(
        "",
        "Hub revision (branch, tag or commit) of a Hugging Face REFEREE_PATH; empty = the default branch.",
    )
    referee_quantize: Quantize = setting(
        Quantize.NONE,
        "Load a Hugging Face referee in 8-bit or 4-bit NF4 through bitsandbytes (CUDA only); none = bf16 "
        "under bf16 autocast (CUDA), else float32.", choices=Quantize)
    referee_n_layer: int = setting(0, "Referee blocks; 0 = same as N_LAYER.", low=0)
    referee_n_head: int = setting(0, "Referee heads; 0 = same as N_HEAD.", low=0)
    referee_n_emb: int = setting(0, "Referee width; 0 = same as N_EMB.", low=0)
    referee_iters: int = setting(300, "Optimizer steps of `avatarl train-referee`.", low=1)


@dataclass
class RunSettings(Section):
    """What a run trains, where it writes, and its duties (trainer.py, periodic.py)."""

    algorithm: Algorithm = setting(Algorithm.GRPO, "RL algorithm for the student.", choices=Algorithm)
    seed: int = setting(1337, "Random seed: same seed, same batches, same weights.", low=0)
    device: DeviceKind = setting(DeviceKind.AUTO, "auto = CUDA when available, else CPU.", choices=DeviceKind)
    log_interval: int = setting(5, "Iterations between metric logs.", low=1)
    eval_interval: int = setting(20, "Iterations between validation cross-entropy measurements.", low=1)
    eval_windows: int = setting(256, "Validation windows of CONTEXT_LEN tokens per measurement.", low=1)
    sample_interval: int = setting(
        20,
        "Iterations between printed text samples (0 = only at the end).", low=0)
    entropy_warn: float = setting(0.3, "Warn when the policy entropy (nats/token) falls below this.", low=0.0)
    degeneracy_warn: float = setting(
        0.2,
        "Warn when distinct-2 of the text samples (unique / all token pairs) falls below this: text that "
        "repeats itself (0 = never).", low=0.0, high=1.0)
    checkpoint_interval: int = setting(100, "Iterations between checkpoints.", low=1)
    save_intermediate_checkpoints: bool = setting(True, "Save every CHECKPOINT_INTERVAL iterations.")
    save_final_checkpoint: bool = setting(True, "Save when the run ends.")
    checkpoint_dir: str = setting(
        "./checkpoints",
        "Where runs live: each RUN_NAME a directory of checkpoints, metrics.jsonl and heartbeat.")
    run_name: str = setting(
        "",
        "This run's directory under CHECKPOINT_DIR and its wandb name (letters, digits, . _ -); empty = the "
        "run lives in CHECKPOINT_DIR itself. A restart with the same name resumes it (RESUME=auto).")
    keep_checkpoints: int = setting(3, "Newest checkpoints kept on disk.", low=1)
    resume: str = setting("auto", "auto (newest valid checkpoint), never, or a checkpoint path.")
    overwrite: bool = setting(False, "With RESUME=never, allow replacing an existing run.")
    max_bad_steps: int = setting(10, "Consecutive non-finite steps before the run stops (exit 3).", low=1)
    heartbeat_interval: float = setting(
        30.0,
        "Seconds between heartbeat.json updates.", low=0.0, low_exclusive=True)
    use_wandb: bool = setting(True, "Log to Weights & Biases when installed (WANDB_MODE=offline works).")
    wandb_project: str = setting("avataRL", "Weights & Biases project.")
    wandb_name: str = setting("", "Weights & Biases run name (empty = RUN_NAME, or generated without one).")
    log_level: LogLevel = setting(LogLevel.INFO, "Logging verbosity.", choices=LogLevel)

    def problems(self) -> list[str]:
        return run_name_problems(self.run_name)


def run_name_problems(name: str) -> list[str]:
    """RUN_NAME must be one plain directory name, and not the referee's run directory."""
    if name and (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) is None or name == "referee"):
        return [f"RUN_NAME={name!r} is not allowed: use up to 100 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit (one directory under CHECKPOINT_DIR), other than 'referee'."]
    return []
