"""The maths of learning: pure functions (rewards, advantages, losses) plus one micro-step per method.

grpo.py (autoregressive rollouts, and the rewards, advantages and loss both GRPO variants share),
teacher_forced.py and avatarl.py are the RL methods; reference.py is GRPO's n-gram / Hugging Face
reference; entropy.py the entropy and KL every method computes, written once. Nothing here keeps state
between steps: the stateful wrappers that the trainer calls (old policy, KL schedule, frozen referee) are
in avatarl/objectives/, one class per method.
"""
