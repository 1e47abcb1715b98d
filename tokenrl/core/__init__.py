"""The ground floor: pure tensor formulas (distributions on action sets, TD backups, chi^2), the target network,
the top-p rule, the teacher protocol, option checks, padding, process ranks, the divergence guard. Imports
nothing else of the project.

Shape letters (the one table; every ``_XY`` suffix in ``tokenrl``, ``envs`` and ``algorithms`` uses it):

====  =====================================================================================================
B     batch rows (trajectories, or parallel envs)
T     response slots: the actions ``a_0 .. a_{T-1}`` of a padded batch
S     states, ``S = T + 1``: ``s_0 .. s_T`` (a response of ``length`` tokens visits ``s_0 .. s_length``)
K     candidate slots: the members of a state's action set (the teacher's top-p set), padded
V     vocabulary (a dense action set is the case K = V)
L     model-input columns: ``[left-padded prompt | right-padded response]``, ``L = P + T``, or, in the
      token envs, the prompt-plus-response columns of a right-padded state
P     prompt columns
D     hidden size
N     flattened tokens (``B * T`` or a chunk of them)
====  =====================================================================================================
"""
