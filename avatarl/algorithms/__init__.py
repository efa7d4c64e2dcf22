"""The maths of learning: pure functions (rewards, advantages, losses) plus one micro-step per algorithm.

grpo.py and avatarl.py are the two RL methods; reference.py is GRPO's n-gram / Hugging Face reference;
entropy.py what both report. Nothing here keeps state between steps: the stateful wrappers that the
trainer calls (old policy, KL controller, frozen referee) are in avatarl/objectives.py.
"""
