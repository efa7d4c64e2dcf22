"""Reinforcement-learning objectives for the student: GRPO and the AvataRL referee method."""
