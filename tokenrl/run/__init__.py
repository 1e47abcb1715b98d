"""The training run: the typed config and its checks, the trainer's stages, checkpoints and resume, selection, rollouts, data-parallel training."""
