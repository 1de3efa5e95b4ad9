"""Training, ONNX export, registry and the in-job model bundle."""

from __future__ import annotations

import json
import logging
import math
import pickle
import time

import numpy as np
import onnx
import pytest

from jobs.config import load_config
from models import registry
from models.generator import generate
from models.onnx_export import check_parity, export_onnx, onnx_outputs, sklearn_outputs
from models.training import TrainingParams, _choose_churn, build_rows, group_by_user, replay_user, train, train_and_publish
from udfs.features import FEATURE_NAMES, compute_features
from udfs.model_bundle import BundleError, ModelBundle, Scores, load_current
from udfs.profile_state import apply_event, profile_from_state, profile_to_state

START = 1_780_000_000_000
HALF_LIFE_MS = 72 * 3_600_000.0


@pytest.fixture(scope="module")
def data():
    return generate(2000, seed=7, start_ms=START)


@pytest.fixture(scope="module")
def trained(data):
    events, truths = data
    return train(events, TrainingParams(half_life_hours=72.0, seed=7), truths)


@pytest.fixture(scope="module")
def onnx_model(trained):
    return export_onnx(trained)


@pytest.fixture
def published(tmp_path, trained, onnx_model):
    model_bytes, _opset = onnx_model
    manifest = {
        "data_window": trained.data_window,
        "feature_names": list(FEATURE_NAMES),
        "segments": trained.segment.segments,
        "metrics": trained.metrics,
        "training": {"interest_half_life_hours": 72.0},
    }
    version = registry.publish(registry.BundleArtifacts(model_bytes, manifest), tmp_path)
    return tmp_path, version


def _stream_vectors(events):
    """What the Flink job does: per event, read the user's (pickled) state, fold the event in, answer, store."""
    state: dict[str, bytes] = {}
    vectors = {}
    for event in events:
        blob = state.get(event["user_id"])
        profile = profile_from_state(pickle.loads(blob) if blob else None)
        apply_event(profile, event, HALF_LIFE_MS)
        vectors[event["event_id"]] = compute_features(profile, event["event_time"], HALF_LIFE_MS)
        state[event["user_id"]] = pickle.dumps(profile_to_state(profile))
    return vectors


def test_training_vectors_equal_streaming_vectors(data):
    events, _ = data
    users = {t.user_id for t in data[1][:150]}
    subset = [e for e in events if e["user_id"] in users]  # interleaved, in arrival (time) order
    streamed = _stream_vectors(subset)
    by_user = group_by_user(subset)
    replayed = {e["event_id"]: v for user_events in by_user.values() for e, v in replay_user(user_events, HALF_LIFE_MS)}
    assert replayed.keys() == streamed.keys()
    assert all(replayed[k] == streamed[k] for k in streamed)

    # The rows training actually fits on are stream vectors too (segmentation: each user's last event;
    # churn: last event before each checkpoint), as float32.
    params = TrainingParams(half_life_hours=72.0)
    seg, churn = build_rows(by_user, params, events[-1]["event_time"])
    for user_id, row in zip(seg.user_ids, seg.X):
        expected = np.asarray(streamed[by_user[user_id][-1]["event_id"]], dtype=np.float32)
        assert np.array_equal(row, expected.astype(np.float64))
    for user_id, row, cp in zip(churn.user_ids, churn.X, churn.checkpoint_h):
        user_events = by_user[user_id]
        cutoff = user_events[0]["event_time"] + cp * 3_600_000
        last = [e for e in user_events if e["event_time"] <= cutoff][-1]
        assert np.array_equal(row, np.asarray(streamed[last["event_id"]], dtype=np.float32).astype(np.float64))


def test_churn_rows_do_not_see_the_future(data):
    events, _ = data
    by_user = group_by_user(events)
    params = TrainingParams(half_life_hours=72.0)
    _seg, churn = build_rows(by_user, params, events[-1]["event_time"])
    since = FEATURE_NAMES.index("log_hours_since_signup")
    assert np.all(np.expm1(churn.X[:, since]) <= max(params.churn_checkpoints_hours) + 1e-3)
    # censored users (horizon past the end of data) carry no label
    assert churn.censored_users > 0 and churn.users + churn.censored_users == len(by_user)


def test_churn_choice_prefers_the_cheaper_model_unless_clearly_better():
    results = {"logistic_regression": {"auc": 0.880}, "hist_gradient_boosting": {"auc": 0.884}}
    assert _choose_churn(results, 0.005) == "logistic_regression"
    results["hist_gradient_boosting"]["auc"] = 0.886
    assert _choose_churn(results, 0.005) == "hist_gradient_boosting"
    assert _choose_churn({"logistic_regression": {"auc": None}, "hist_gradient_boosting": {"auc": 0.6}}, 0.005) \
        == "hist_gradient_boosting"


def test_training_takes_the_churn_margin_from_the_config(tmp_path):
    """``churn_auc_margin`` (config, env ONRAMP_CHURN_AUC_MARGIN) reaches the selection: 1.0 publishes the
    logistic regression whatever boosting scores."""
    cfg = load_config({"model_dir": str(tmp_path / "models"), "state_dir": str(tmp_path), "churn_auc_margin": "1.0"},
                      environ={})
    manifest = train_and_publish(cfg, n_users=300, seed=3)
    assert manifest["metrics"]["churn"]["model"] == "logistic_regression"
    assert manifest["training"]["params"]["churn_auc_margin"] == 1.0


def test_logistic_churn_folds_into_three_nodes(data):
    """A calibrated logistic regression (forced here by a margin no tree model can clear) is exported as one
    MatMul + Add + Sigmoid, next to the 6-node segment branch, and reproduces scikit-learn."""
    events, truths = data
    linear = train(events, TrainingParams(half_life_hours=72.0, seed=7, churn_auc_margin=1.0), truths)
    assert linear.churn.kind == "logistic_regression"
    model_bytes, _opset = export_onnx(linear)
    ops = [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]
    assert sorted(ops) == sorted(["Gather", "Sub", "Div", "ReduceSumSquare", "ArgMin", "Sqrt",
                                  "MatMul", "Add", "Sigmoid"]), ops
    parity = check_parity(model_bytes, linear)
    assert parity["ok"], parity


def test_tree_churn_model_exports_with_parity(data):
    """A margin below zero makes boosting win: the skl2onnx tree ensemble + Platt head must reproduce sklearn."""
    events, truths = data
    trees = train(events, TrainingParams(half_life_hours=72.0, seed=7, churn_auc_margin=-1.0), truths)
    assert trees.churn.kind == "hist_gradient_boosting"
    model_bytes, opset = export_onnx(trees)
    assert "TreeEnsembleClassifier" in [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]
    assert opset["ai.onnx.ml"] >= 1
    parity = check_parity(model_bytes, trees)
    assert parity["ok"], parity


def test_quality_on_generator_data(trained):
    seg = trained.metrics["segmentation"]
    churn = trained.metrics["churn"]
    assert seg["k"] == 4
    assert seg["ari_vs_personas"] >= 0.8, seg
    assert churn["auc"] >= 0.80, churn
    assert churn["log_loss"] < 0.45
    assert {s["id"] for s in trained.segment.segments} == set(range(seg["k"]))
    assert len({s["name"] for s in trained.segment.segments}) == seg["k"]
    table = churn["calibration"]
    assert sum(row["count"] for row in table) == churn["holdout_rows"]
    for row in table:  # calibrated: observed rate within 3 binomial standard errors of the predicted mean
        if row["count"] >= 40:  # (a fixed 0.15 was ~2 SE for a 40-row bin: one bin in ten would miss by chance)
            p = row["mean_predicted"]
            assert abs(row["observed_rate"] - p) < 3 * math.sqrt(p * (1 - p) / row["count"]) + 0.02, row


def test_onnx_graph_shape_and_parity(trained, onnx_model):
    model_bytes, opset = onnx_model
    model = onnx.load_from_string(model_bytes)
    assert [i.name for i in model.graph.input] == ["features"]
    assert [o.name for o in model.graph.output] == ["segment", "distances", "churn"]
    types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert types == {"segment": onnx.TensorProto.INT64, "distances": onnx.TensorProto.FLOAT, "churn": onnx.TensorProto.FLOAT}
    assert opset["ai.onnx"] >= 17

    parity = check_parity(model_bytes, trained)
    assert parity["ok"], parity
    assert parity["rows"] >= 2000
    X = trained.churn.holdout_X.astype(np.float32)
    got, ref = onnx_outputs(model_bytes, X), sklearn_outputs(trained, X)
    assert got["segment"].dtype == np.int64 and got["segment"].shape == (len(X),)
    assert got["distances"].shape == (len(X), trained.segment.metrics["k"])
    assert got["churn"].shape == (len(X),)
    assert np.array_equal(got["segment"], ref["segment"])
    assert np.max(np.abs(got["distances"] - ref["distances"])) <= 1e-5
    assert np.max(np.abs(got["churn"] - ref["churn"])) <= 1e-5


def test_point_on_a_centroid_has_distance_zero_not_nan(trained, onnx_model):
    scaler, kmeans = trained.segment.pipeline[0], trained.segment.pipeline[-1]
    rows = np.zeros((kmeans.n_clusters, len(FEATURE_NAMES)), dtype=np.float32)
    rows[:, trained.segment.feature_index] = scaler.inverse_transform(kmeans.cluster_centers_)
    got = onnx_outputs(onnx_model[0], rows)
    assert not np.isnan(got["distances"]).any()
    assert np.array_equal(got["segment"], np.arange(kmeans.n_clusters))
    assert np.all(got["distances"][np.arange(kmeans.n_clusters), got["segment"]] < 1e-3)


def test_publish_writes_manifest_and_current(published, onnx_model):
    model_dir, version = published
    assert registry.VERSION_RE.match(version)
    assert registry.list_versions(model_dir) == [version]
    assert registry.current_bundle_path(model_dir) == model_dir / version
    manifest = registry.read_manifest(model_dir / version)
    assert manifest["version"] == version and manifest["parent_version"] is None
    assert manifest["feature_names"] == list(FEATURE_NAMES)
    assert manifest["sha256"] == registry.hashlib.sha256((model_dir / version / "model.onnx").read_bytes()).hexdigest()
    assert manifest["onnx_opset"] == onnx_model[1]
    assert set(manifest["data_window"]) == {"from_ms", "to_ms"}
    assert manifest["created_at"].endswith("+00:00")
    assert all({"id", "name", "description"} <= set(s) for s in manifest["segments"])
    assert manifest["metrics"]["churn"]["auc"] >= 0.8

    time.sleep(1.01)  # versions have second resolution
    other = registry.publish(registry.BundleArtifacts(onnx_model[0] + b"", {**manifest, "note": "second"}), model_dir)
    assert other != version and registry.list_versions(model_dir) == [version, other]
    assert registry.read_manifest(model_dir / other)["parent_version"] == version
    assert (model_dir / "CURRENT").read_text().strip() == other
    registry.set_current(model_dir, version)  # roll back
    assert load_current(model_dir).version == version


def test_bundle_scores_match_onnx(published, trained, onnx_model):
    model_dir, version = published
    bundle = load_current(model_dir)
    assert bundle.version == version
    X = trained.churn.holdout_X[:200].astype(np.float32)
    expected = onnx_outputs(onnx_model[0], X)
    rows = X.astype(np.float64).tolist()
    single = [bundle.score(r) for r in rows]
    batch = bundle.score_batch(rows)
    names = [s["name"] for s in sorted(trained.segment.segments, key=lambda s: s["id"])]
    for i, (s, b) in enumerate(zip(single, batch)):
        assert isinstance(s, Scores)
        assert s.segment_id == b.segment_id == int(expected["segment"][i])
        assert s.segment_name == names[s.segment_id]
        assert abs(s.churn_risk - float(expected["churn"][i])) <= 1e-6 and abs(b.churn_risk - s.churn_risk) <= 1e-6
        assert 0.0 <= s.churn_risk <= 1.0
    with pytest.raises(ValueError, match="expected 22 features|expected .* features"):
        bundle.score(rows[0][:-1])

    # Per-call cost (generous bound: the machine may be busy; the real figure is in the report).
    row = rows[0]
    for _ in range(300):
        bundle.score(row)
    t0 = time.perf_counter()
    for _ in range(2000):
        bundle.score(row)
    per_call_us = (time.perf_counter() - t0) / 2000 * 1e6
    assert per_call_us < 1000, per_call_us


def test_bundle_refuses_sha256_mismatch(published):
    model_dir, version = published
    path = model_dir / version / "model.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256"):
        ModelBundle.load(model_dir / version)


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda names: names[:-1], "computed by this code but unknown to the bundle: \\['interest_share_reporting'\\]"),
        (lambda names: names + ["log_invites"], "expected by the bundle but not computed by this code: \\['log_invites'\\]"),
        (lambda names: [names[1], names[0], *names[2:]], "different order .*position 0"),
    ],
)
def test_bundle_refuses_feature_list_mismatch(published, edit, says):
    model_dir, version = published
    manifest_path = model_dir / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["feature_names"] = edit(list(manifest["feature_names"]))
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=says):
        load_current(model_dir)


def test_bundle_errors_are_actionable(tmp_path, published):
    with pytest.raises(BundleError, match="no current model bundle"):
        load_current(tmp_path / "empty")
    with pytest.raises(BundleError, match="does not exist"):
        ModelBundle.load(tmp_path / "nope")
    model_dir, version = published
    (model_dir / version / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing model.onnx"):
        load_current(model_dir)
    (model_dir / "CURRENT").write_text("m-20990101-000000-deadbeef\n")
    with pytest.raises(BundleError, match="names version"):
        load_current(model_dir)
    assert registry.current_bundle_path(model_dir) is None


def test_bundle_refuses_other_half_life(published):
    model_dir, _ = published
    assert load_current(model_dir, half_life_hours=72.0)
    with pytest.raises(BundleError, match="interest_half_life_hours"):
        load_current(model_dir, half_life_hours=24.0)


def test_train_and_publish(tmp_path, caplog):
    cfg = load_config({"model_dir": str(tmp_path / "models")}, environ={})
    caplog.set_level(logging.INFO, logger="models.training")
    manifest = train_and_publish(cfg, n_users=800, seed=5)
    assert manifest["version"] == registry.current_version(cfg.model_dir)
    assert manifest["metrics"]["parity"]["ok"]
    assert "ari_vs_personas" in manifest["metrics"]["segmentation"]
    assert manifest["training"]["source"]["seed"] == 5
    bundle = load_current(cfg.model_dir, half_life_hours=cfg.interest_half_life_hours)
    assert bundle.score([0.0] * len(FEATURE_NAMES)).segment_name in bundle.segment_names

    caplog.clear()
    again = train_and_publish(cfg, n_users=800, seed=5)  # same data and settings: reused, not retrained
    assert again["version"] == manifest["version"]
    assert "not retraining" in caplog.text
    caplog.clear()
    train_and_publish(cfg, n_users=800, seed=5, force=True)
    assert "replayed" in caplog.text
