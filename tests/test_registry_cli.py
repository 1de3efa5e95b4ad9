"""Model lifecycle: registry listing / promote / rollback, the quality gate, and the `onramp models` commands."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from jobs.cli import main
from jobs.config import load_config
from models import registry
from models.quality_gate import GateTolerance, QualityGateError, check_against, compare
from models.training import train_and_publish

UNKNOWN = "m-20990101-000000-deadbeef"


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_bundle(trained_model_dir: Path) -> tuple[bytes, dict[str, Any]]:
    """The ONNX bytes and manifest of the session's trained bundle: fake bundles reuse them, so they load."""
    path = registry.current_bundle_path(trained_model_dir)
    assert path is not None
    return (path / "model.onnx").read_bytes(), registry.read_manifest(path)


class _Clock:
    """Stands in for ``registry.datetime``: every publish is 5 minutes after the previous one, so versions are
    distinct and sort in publishing order without sleeping."""

    def __init__(self, start: datetime = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)) -> None:
        self.t = start

    def now(self, tz: Any = None) -> datetime:
        self.t += timedelta(minutes=5)
        return self.t


@pytest.fixture
def publish_fake(monkeypatch, tmp_path, real_bundle):
    """``publish_fake(auc=..., ...)`` publishes a loadable bundle with the given holdout metrics to tmp_path."""
    monkeypatch.setattr(registry, "datetime", _Clock())
    model_bytes, base = real_bundle

    def publish(*, auc: float = 0.85, log_loss: float = 0.40, silhouette: float = 0.45, make_current: bool = True,
                **changes: Any) -> str:
        manifest = copy.deepcopy(base)
        manifest["metrics"]["churn"].update(auc=auc, log_loss=log_loss)
        manifest["metrics"]["segmentation"].update(silhouette=silhouette)
        manifest.update(changes)
        return registry.publish(registry.BundleArtifacts(model_bytes, manifest), tmp_path, make_current=make_current)

    return publish


@pytest.fixture
def three_versions(publish_fake) -> list[str]:
    """a <- b <- c (c current), with improving churn AUC."""
    return [publish_fake(auc=auc) for auc in (0.85, 0.86, 0.87)]


def cli(tmp_path: Path, *argv: str) -> int:
    return main([*argv, "--model-dir", str(tmp_path)])


# --- registry ---------------------------------------------------------------------------------------------------


def test_describe_versions_oldest_first_with_current_and_lineage(tmp_path, three_versions, real_bundle):
    a, b, c = three_versions
    described = registry.describe_versions(tmp_path)
    assert [d.version for d in described] == [a, b, c]
    assert [d.is_current for d in described] == [False, False, True]
    assert [d.parent_version for d in described] == [None, a, b]
    assert [d.churn_auc for d in described] == [0.85, 0.86, 0.87]
    segmentation = real_bundle[1]["metrics"]["segmentation"]
    assert {(d.k, d.silhouette, d.churn_log_loss, d.ari_vs_personas) for d in described} == {
        (segmentation["k"], 0.45, 0.40, segmentation.get("ari_vs_personas"))}
    assert described[0].data_window == real_bundle[1]["data_window"]
    assert described[0].created_at.endswith("+00:00") and described[0].problem is None
    assert json.loads(json.dumps(described[0].to_dict()))["version"] == a


def test_describe_versions_survives_a_damaged_manifest(tmp_path, three_versions):
    (tmp_path / three_versions[0] / "manifest.json").write_text("{not json")
    described = registry.describe_versions(tmp_path)
    assert len(described) == 3 and "cannot read manifest.json" in described[0].problem
    assert described[2].problem is None
    assert registry.describe_versions(tmp_path / "missing") == []


def test_set_current_refuses_unknown_versions_and_names_the_known_ones(tmp_path, three_versions):
    for bad in (UNKNOWN, "../elsewhere", "latest"):
        with pytest.raises(registry.UnknownVersionError, match=f"known versions: {three_versions[0]}"):
            registry.set_current(tmp_path, bad)
    with pytest.raises(FileNotFoundError):  # what callers of set_current caught before
        registry.set_current(tmp_path, UNKNOWN)
    assert registry.current_version(tmp_path) == three_versions[2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(registry.RegistryError, match="nothing is published there yet"):
        registry.manifest_of(tmp_path / "empty")
    with pytest.raises(registry.RegistryError, match="is not a directory: check --model-dir"):  # a typo, not empty
        registry.manifest_of(tmp_path / "typo")


def test_rollback_walks_the_parents_then_says_there_is_none(tmp_path, three_versions):
    a, b, c = three_versions
    assert registry.rollback(tmp_path) == b and registry.current_version(tmp_path) == b
    assert registry.rollback(tmp_path) == a
    with pytest.raises(registry.RegistryError, match=f"current bundle {a} has no parent_version.*--to VERSION"):
        registry.rollback(tmp_path)
    assert registry.current_version(tmp_path) == a
    assert registry.rollback(tmp_path, to=c) == c
    with pytest.raises(registry.UnknownVersionError):
        registry.rollback(tmp_path, to=UNKNOWN)


def test_rollback_when_the_parent_was_deleted_or_nothing_is_current(tmp_path, three_versions):
    shutil.rmtree(tmp_path / three_versions[1])
    with pytest.raises(registry.RegistryError, match=f"parent {three_versions[1]} is no longer in"):
        registry.rollback(tmp_path)
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback(tmp_path / "empty")


# --- quality gate -----------------------------------------------------------------------------------------------


def metrics(auc: Any = 0.90, log_loss: Any = 0.40, silhouette: Any = 0.45) -> dict[str, Any]:
    return {"churn": {"auc": auc, "log_loss": log_loss}, "segmentation": {"silhouette": silhouette}}


def test_gate_passes_equal_and_better_models():
    assert compare(metrics(), metrics()).passed
    result = compare(metrics(auc=0.95, log_loss=0.30, silhouette=0.60), metrics())
    assert result.passed and not result.failures
    assert [c.metric for c in result.checks] == ["churn.auc", "churn.log_loss", "segmentation.silhouette"]
    assert not any(c.skipped for c in result.checks)


@pytest.mark.parametrize(
    "candidate, failing",
    [
        (metrics(auc=0.87), "churn.auc"),
        (metrics(log_loss=0.43), "churn.log_loss"),
        (metrics(silhouette=0.39), "segmentation.silhouette"),
    ],
)
def test_gate_fails_per_metric(candidate, failing):
    result = compare(candidate, metrics(), GateTolerance(), compared_with="m-old")
    assert not result.passed
    assert [c.metric for c in result.failures] == [failing]
    check = result.failures[0]
    assert (check.current, check.passed, check.skipped) == (_get(metrics(), failing), False, False)
    record = json.loads(json.dumps(result.to_dict()))
    assert record["passed"] is False and record["compared_with"] == "m-old"
    assert record["tolerance"] == {"churn_auc_drop": 0.02, "churn_log_loss_rise": 0.02, "silhouette_drop": 0.05}


def _get(d: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        d = d[key]
    return d


@pytest.mark.parametrize(
    "at_limit, beyond",
    [
        (metrics(auc=0.88), metrics(auc=0.8799)),
        (metrics(log_loss=0.42), metrics(log_loss=0.4201)),
        (metrics(silhouette=0.40), metrics(silhouette=0.3999)),
    ],
)
def test_gate_tolerance_boundaries_are_inclusive(at_limit, beyond):
    assert compare(at_limit, metrics()).passed  # exactly the tolerance (despite 0.9 - 0.88 != 0.02 in floats)
    assert not compare(beyond, metrics()).passed
    strict = GateTolerance(churn_auc_drop=0.0, churn_log_loss_rise=0.0, silhouette_drop=0.0)
    assert not compare(at_limit, metrics(), strict).passed
    assert compare(metrics(), metrics(), strict).passed


def test_gate_allowed_bound_and_direction():
    auc, log_loss, silhouette = compare(metrics(), metrics()).checks
    assert (auc.allowed, log_loss.allowed, silhouette.allowed) == (0.88, 0.42, 0.40)
    assert auc.higher_is_better and not log_loss.higher_is_better


@pytest.mark.parametrize(
    "candidate, current, skipped",
    [
        (metrics(), {"churn": {"auc": 0.9}}, {"churn.log_loss", "segmentation.silhouette"}),  # an older bundle
        (metrics(auc=None), metrics(), {"churn.auc"}),  # one-class holdout: no AUC
        (metrics(log_loss="n/a", silhouette=math.nan), metrics(), {"churn.log_loss", "segmentation.silhouette"}),
        (metrics(auc=True), metrics(), {"churn.auc"}),
        ({}, {}, {"churn.auc", "churn.log_loss", "segmentation.silhouette"}),
        ({"churn": None}, {"segmentation": 3}, {"churn.auc", "churn.log_loss", "segmentation.silhouette"}),
    ],
)
def test_gate_skips_missing_metrics_with_a_note(candidate, current, skipped):
    result = compare(candidate, current)
    assert result.passed
    assert {c.metric for c in result.checks if c.skipped} == skipped
    for check in result.checks:
        if check.skipped:
            assert check.allowed is None and "no numeric" in check.note and "skipped" in check.describe()


def test_gate_against_no_current_bundle_passes_without_checks():
    result = check_against(metrics(), None)
    assert result.passed and result.checks == () and result.to_dict()["compared_with"] is None
    result = check_against(metrics(auc=0.5), {"version": "m-x", "metrics": metrics()})
    assert not result.passed and result.compared_with == "m-x"


def test_gate_error_says_what_and_how_to_override():
    error = QualityGateError(compare(metrics(auc=0.80, log_loss=0.50), metrics(), compared_with="m-old"))
    text = str(error)
    assert "current bundle m-old" in text
    assert "churn AUC 0.8000 vs current 0.9000: more than 0.02 lower (allowed >= 0.8800)" in text
    assert "churn log-loss 0.5000 vs current 0.4000: more than 0.02 higher (allowed <= 0.4200)" in text
    assert "silhouette" not in text  # only the failures
    assert "Nothing was published" in text and "--force" in text
    assert len(error.result.failures) == 2


def test_gate_tolerance_must_not_be_negative():
    with pytest.raises(ValueError, match="churn_auc_drop"):
        GateTolerance(churn_auc_drop=-0.1)


# --- train_and_publish with the gate ----------------------------------------------------------------------------


def test_train_and_publish_refuses_a_worse_model_unless_allowed(tmp_path, trained_model_dir, monkeypatch):
    # Retraining the same data gives the same ONNX bytes: without a clock that moves, the second publish within
    # one second would be the first one's version (publish is idempotent per second and sha).
    monkeypatch.setattr(registry, "datetime", _Clock(datetime.now(timezone.utc) + timedelta(days=1)))
    model_dir = tmp_path / "models"
    shutil.copytree(trained_model_dir, model_dir)  # the session fixture stays untouched
    good = registry.current_version(model_dir)
    manifest_path = model_dir / good / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["metrics"]["churn"].update(auc=0.99, log_loss=0.05)  # a current bundle no retrain can match
    manifest_path.write_text(json.dumps(manifest))
    cfg = load_config({"model_dir": str(model_dir)}, environ={})

    refused = f"worse than current bundle {good}: churn AUC .* vs current 0.9900.*--force"
    with pytest.raises(QualityGateError, match=refused):
        train_and_publish(cfg, n_users=300, seed=3)
    assert registry.list_versions(model_dir) == [good] and registry.current_version(model_dir) == good
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".staging")]

    published = train_and_publish(cfg, n_users=300, seed=3, allow_worse=True)
    assert registry.current_version(model_dir) == published["version"] != good
    assert published["parent_version"] == good
    gate = published["quality_gate"]
    assert gate["passed"] is False and gate["allowed_worse"] is True and gate["compared_with"] == good
    assert {c["metric"] for c in gate["checks"] if not c["passed"]} == {"churn.auc", "churn.log_loss"}

    # The same data again (force: retrain anyway): same metrics as the current bundle, so the gate passes.
    again = train_and_publish(cfg, n_users=300, seed=3, force=True)
    assert again["quality_gate"]["passed"] is True and again["quality_gate"]["allowed_worse"] is False
    assert again["quality_gate"]["compared_with"] == published["version"]


def test_first_publish_records_a_gate_without_checks(trained_model_dir):
    gate = registry.current_manifest(trained_model_dir)["quality_gate"]
    assert gate["passed"] is True and gate["checks"] == [] and gate["compared_with"] is None


# --- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_models_list(tmp_path, three_versions, capsys):
    a, b, c = three_versions
    assert cli(tmp_path, "models", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "CREATED"] and "CHURN AUC" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == [a, b, "*"]
    assert lines[3].split()[1] == c and lines[3].split()[4] == b  # current, created date+time, parent
    assert "0.8700" in lines[3] and "0.4000" in lines[3]

    assert cli(tmp_path, "models", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    lineage = [(v["version"], v["is_current"], v["parent_version"]) for v in listed]
    assert lineage == [(a, False, None), (b, False, a), (c, True, b)]
    assert listed[2]["churn_auc"] == 0.87


def test_cli_models_list_empty_registry(tmp_path, capsys):
    assert cli(tmp_path, "models", "list") == 0
    assert capsys.readouterr().out == ""
    assert cli(tmp_path, "models", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_models_show(tmp_path, three_versions, capsys, caplog):
    a, b, c = three_versions
    assert cli(tmp_path, "models", "show") == 0
    out = capsys.readouterr().out
    assert f"version        {c}  (current)" in out and f"parent         {b}" in out
    assert "AUC=0.8700" in out and "segments" in out

    assert cli(tmp_path, "models", "show", a, "--json") == 0
    assert json.loads(capsys.readouterr().out) == registry.read_manifest(tmp_path / a)

    caplog.set_level(logging.INFO)
    assert cli(tmp_path, "models", "show", UNKNOWN) == 1
    assert f"no published bundle '{UNKNOWN}'" in caplog.text and a in caplog.text


def test_cli_models_promote(tmp_path, three_versions, capsys, caplog):
    a, b, c = three_versions
    caplog.set_level(logging.INFO)
    assert cli(tmp_path, "models", "promote", a) == 0
    assert capsys.readouterr().out.strip() == a and registry.current_version(tmp_path) == a
    assert f"{c} -> {a}" in caplog.text

    caplog.clear()
    assert cli(tmp_path, "models", "promote", UNKNOWN) == 1
    assert capsys.readouterr().out == "" and registry.current_version(tmp_path) == a
    assert f"known versions: {a}, {b}, {c}" in caplog.text
    assert "Traceback" not in caplog.text


def test_cli_models_promote_refuses_a_bundle_the_job_could_not_load(tmp_path, three_versions, publish_fake, real_bundle,
                                                                    caplog):
    features = real_bundle[1]["feature_names"]
    odd = publish_fake(make_current=False, feature_names=[features[1], features[0], *features[2:]])
    caplog.set_level(logging.INFO)
    assert cli(tmp_path, "models", "promote", odd) == 1
    assert "different order" in caplog.text and registry.current_version(tmp_path) == three_versions[2]


def test_cli_models_rollback(tmp_path, three_versions, capsys, caplog):
    a, b, c = three_versions
    assert cli(tmp_path, "models", "rollback") == 0
    assert capsys.readouterr().out.strip() == b and registry.current_version(tmp_path) == b
    assert cli(tmp_path, "models", "rollback", "--to", c, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"current": c, "previous": b}

    registry.set_current(tmp_path, a)
    caplog.set_level(logging.INFO)
    assert cli(tmp_path, "models", "rollback") == 1
    assert "has no parent_version" in caplog.text and registry.current_version(tmp_path) == a


@pytest.mark.parametrize("flags, expected", [([], False), (["--force"], True)])
def test_cli_train_force_also_overrides_the_gate(tmp_path, monkeypatch, capsys, flags, expected):
    seen: dict[str, Any] = {}

    def fake_train_and_publish(cfg, **kwargs):
        seen.update(kwargs)
        return {"version": "m-x", "metrics": {}, "quality_gate": {"passed": True}, "segments": []}

    monkeypatch.setattr("models.training.train_and_publish", fake_train_and_publish)
    assert cli(tmp_path, "train", "--users", "10", *flags) == 0
    assert seen["force"] is expected and seen["allow_worse"] is expected
    assert json.loads(capsys.readouterr().out) == {"version": "m-x", "metrics": {}, "quality_gate": {"passed": True}}


def test_cli_train_refused_by_the_gate_is_one_clear_error(tmp_path, monkeypatch, capsys, caplog):
    def refuse(cfg, **kwargs):
        raise QualityGateError(compare(metrics(auc=0.7), metrics(), compared_with="m-old"))

    monkeypatch.setattr("models.training.train_and_publish", refuse)
    caplog.set_level(logging.INFO)
    assert cli(tmp_path, "train") == 1
    assert capsys.readouterr().out == ""
    assert "churn AUC 0.7000 vs current 0.9000" in caplog.text and "--force" in caplog.text


def test_cli_models_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    out = capsys.readouterr().out
    for action in ("list", "show [VERSION]", "promote VERSION", "rollback [--to V]"):
        assert f"onramp models {action}" in out
