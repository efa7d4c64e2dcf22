"""What one micro-step optimises, as the trainer calls it: one objective class per method.

The maths lives in avatarl/algorithms/ as pure functions; an objective is the stateful wrapper around it
for one run. It turns a batch of corpus windows into (loss, on-device metrics), owns what the method
carries between steps (old policy, KL schedule, frozen referee) with its `state_dict` (alike on every
rank) and `rank_state_dict` (each rank's own), and says how many corpus tokens one context reads
(`window_len`). Modules: base.py (the protocol, `Method`, `ObjectiveBase`), registry.py (the settings to
a method to a class, and how to add one), grpo_base.py (what both GRPO objectives share, the KL
schedule), grpo.py (autoregressive GRPO), teacher_forced.py, avatarl.py, supervised.py.
"""

from avatarl.objectives.avatarl import AvataRLObjective
from avatarl.objectives.base import Method, Objective, ObjectiveBase
from avatarl.objectives.grpo import AutoregressiveGRPO
from avatarl.objectives.grpo_base import KL_UPDATE_INTERVAL, KLSchedule, grpo_needs_reference
from avatarl.objectives.registry import OBJECTIVES, build_objective, method_of, window_len
from avatarl.objectives.supervised import SupervisedObjective
from avatarl.objectives.teacher_forced import TeacherForcedGRPO

__all__ = ["KL_UPDATE_INTERVAL", "OBJECTIVES", "AutoregressiveGRPO", "AvataRLObjective", "KLSchedule",
           "Method", "Objective", "ObjectiveBase", "SupervisedObjective", "TeacherForcedGRPO",
           "build_objective", "grpo_needs_reference", "method_of", "window_len"]
