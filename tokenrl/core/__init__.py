"""The ground floor: pure tensor formulas (soft values, TD backups, chi^2), the top-p rule, the teacher protocol, padding, process ranks, the divergence guard. Imports nothing else of the project."""
