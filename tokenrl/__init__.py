"""tokenrl: an RL-algorithm zoo for discrete token MDPs (LM distillation as imitation learning)."""

__version__ = "0.1.0"
