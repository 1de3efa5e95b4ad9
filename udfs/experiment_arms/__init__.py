"""Experiments: which strategy a user gets, decided deterministically and remembered.

Named ``experiment_arms``, not ``experiments``: ``flink run -pyfs`` puts each shipped directory itself on the
workers' PYTHONPATH, so ``udfs/experiments`` would shadow the top-level ``experiments`` package (outcomes,
analysis) in a TaskManager's interpreter, which keeps its modules across jobs.

Format and semantics: :mod:`.config` (loading and validation, schema ``experiments.schema.json``; the shipped
example is ``rules/experiments.yaml``) and :mod:`.assignment` (hashing, layers, stickiness). The job calls::

    assignments = experiments.assign(pseudo_user_id, context, now_ms, sticky)   # keep in keyed state, record
    changes = experiments.changes_for(assignments, now_ms)                      # what the arms change

Only the standard library, PyYAML and jsonschema are used, because this package ships to the Flink cluster.
Analysis (scipy, statsmodels) lives in the top-level ``experiments`` package.
"""

from udfs.experiment_arms.assignment import assign, bucket, changes_for, is_eligible, measure_assign_us
from udfs.experiment_arms.config import (
    BUCKETS, CHANGE_KEYS, ELIGIBILITY_FIELDS, EMPTY_SET, NO_CHANGES, Arm, ArmChanges, Experiment,
    ExperimentConfigError, ExperimentSet, Layer, load_experiments, parse_experiments,
)

__all__ = [
    "BUCKETS", "CHANGE_KEYS", "ELIGIBILITY_FIELDS", "EMPTY_SET", "NO_CHANGES", "Arm", "ArmChanges", "Experiment",
    "ExperimentConfigError", "ExperimentSet", "Layer", "assign", "bucket", "changes_for", "is_eligible",
    "load_experiments", "measure_assign_us", "parse_experiments",
]
