"""Experiment analysis: outcomes, statistics and reports (offline; not shipped to the cluster)."""
