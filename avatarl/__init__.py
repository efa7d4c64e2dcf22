"""avatarl: pretrain a small GPT from scratch with pure reinforcement learning."""

__version__ = "0.1.0"
