"""Experiments: which strategy a user gets, decided deterministically and remembered.

Named ``experiment_arms``, not ``experiments``, so that no ``udfs`` module can be mistaken for the top-level
``experiments`` package (outcomes, analysis) should ``udfs/`` itself ever be on a worker's path again (it was,
when ``udfs/`` was shipped with ``-pyfs`` as a directory: see :func:`jobs.flink_jobs.stage_code`).

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
