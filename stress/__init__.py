"""
Long and random tests (kill loops, fuzzing), opt-in: `.ci/run` runs them
after README's test command with a bounded budget.  Run them with
``python -m twisted.trial stress``; ``P2PMTA_STRESS_SCALE`` (default 1.0)
scales their iteration counts.
"""
