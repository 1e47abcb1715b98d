"""Exact tabular theory: soft Bellman operators on top-p sets, value iteration, toy MDPs and toy languages, and the exact optimum of each distillation objective."""
