"""Evaluation: every metric of a student against its teacher (sampled and teacher-forced, on-policy KL)."""
