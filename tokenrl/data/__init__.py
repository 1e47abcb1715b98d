"""Offline data: the ragged replay buffer and the sparse top-p cache of the teacher."""
