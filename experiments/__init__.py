"""Experiment analysis: statistics, reports, planning and simulation over per-user outcomes.

The job-side half (definitions, assignment) is :mod:`udfs.experiments`; this package needs scipy, statsmodels and
matplotlib and never runs on the Flink cluster. Modules: :mod:`.records` (the UserOutcome row), :mod:`.stats`
(tests and intervals), :mod:`.analysis` (one experiment's report object), :mod:`.report` (terminal, HTML, PNG),
:mod:`.plan` (sample sizes), :mod:`.simulate` (simulated outcomes for tests and the demo).
"""
