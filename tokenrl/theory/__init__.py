"""Exact tabular theory: soft Bellman operators on top-p sets, value iteration, toy MDPs and toy languages, and the
exact optimum of each distillation objective, for students that can represent the teacher (the BD diagnosis) and
for aliased ones that cannot (docs/aliased_students.md)."""
