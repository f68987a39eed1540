"""Renamed to tests/cases.py (the shared cases, calls and tolerance table of every backend test).

Only tests/test_cpu_math_accuracy.py still imports this name; once it imports `cases`, delete this file.
"""
from cases import run_under_cpu_capability  # noqa: F401
