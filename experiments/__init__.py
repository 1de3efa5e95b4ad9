"""Experiment analysis: outcomes, statistics, reports, planning and simulation over per-user outcomes.

The job-side half (definitions, assignment) is :mod:`udfs.experiment_arms`. Modules: :mod:`.records` (the UserOutcome
row), :mod:`.outcomes` (per-user outcomes folded from events and decisions), :mod:`.outcome_history` (the batch
path over Avro files and topics), :mod:`.stats` (tests and intervals), :mod:`.analysis` (one experiment's report
object), :mod:`.report` (terminal, HTML, PNG), :mod:`.plan` (sample sizes), :mod:`.simulate` (simulated outcomes).
The streaming outcomes job (jobs/experiment_outcomes.py) ships the pure modules to the cluster; the statistics
(scipy, statsmodels, matplotlib) never run there.
"""
