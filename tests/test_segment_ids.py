"""Stable segment ids across retrains: alignment to the parent, training with a parent, ONNX and the runtime."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest

from models import registry
from models.generator import generate
from models.onnx_export import check_parity, export_onnx, onnx_outputs
from models.segment_ids import AlignmentError, align_to_parent, distance_matrix
from models.training import TrainingParams, build_rows, group_by_user, train, train_segments
from udfs.features import FEATURE_NAMES
from udfs.model_bundle import load_current

FEATURES = ("a", "b", "c")
PARAMS = TrainingParams(half_life_hours=72.0, seed=7)


def _parent(ids: list[int], centroids: np.ndarray) -> list[dict]:
    return [
        {"id": i, "name": f"seg_{i}", "centroid": dict(zip(FEATURES, map(float, c)))}
        for i, c in zip(ids, centroids)
    ]


PARENT_IDS = [0, 2, 5, 9]  # gaps: an earlier retrain retired ids 1, 3, 4, 6, 7, 8
PARENT_CENTROIDS = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])


# ---------------------------------------------------------------------------------------------------------------
# align_to_parent on hand-made centroids


def test_permuted_centroids_map_back_to_the_parent_ids():
    perm = [2, 0, 3, 1]
    noise = np.random.default_rng(1).normal(0, 0.05, PARENT_CENTROIDS.shape)
    alignment = align_to_parent(PARENT_CENTROIDS[perm] + noise, _parent(PARENT_IDS, PARENT_CENTROIDS), features=FEATURES)
    assert alignment.ids == [PARENT_IDS[p] for p in perm]
    assert alignment.inherited_names == {i: f"seg_{PARENT_IDS[p]}" for i, p in enumerate(perm)}
    assert alignment.new_ids == [] and alignment.disappeared == [] and alignment.drifted == []
    assert all(m.distance < 0.2 for m in alignment.matches)


def test_parent_centroids_are_read_by_feature_name_not_position():
    parent = _parent(PARENT_IDS, PARENT_CENTROIDS)
    for seg in parent:  # same centroids, keys in another order
        seg["centroid"] = dict(reversed(list(seg["centroid"].items())))
    assert align_to_parent(PARENT_CENTROIDS, parent, features=FEATURES).ids == PARENT_IDS


def test_k_grows_new_clusters_get_fresh_ids_after_the_parents_max():
    new = np.vstack([PARENT_CENTROIDS[:2], [[5.0, 5.0, 5.0]], PARENT_CENTROIDS[2:], [[-4.0, 0.0, 0.0]]])
    alignment = align_to_parent(new, _parent(PARENT_IDS, PARENT_CENTROIDS), features=FEATURES)
    assert alignment.ids == [0, 2, 10, 5, 9, 11]
    assert alignment.new_ids == [10, 11]
    assert alignment.disappeared == []
    assert set(alignment.inherited_names) == {0, 1, 3, 4}  # the new clusters inherit no name


def test_k_shrinks_disappeared_ids_are_reported():
    new = PARENT_CENTROIDS[[3, 0, 1]] + 0.01
    alignment = align_to_parent(new, _parent(PARENT_IDS, PARENT_CENTROIDS), features=FEATURES)
    assert alignment.ids == [9, 0, 2]
    assert alignment.disappeared == [5]
    assert alignment.new_ids == []
    assert alignment.as_metrics()["disappeared_ids"] == [5]


def test_a_far_match_is_kept_but_flagged_as_drifted():
    new = PARENT_CENTROIDS.copy()
    new[1] += [0.0, 0.0, 0.9]  # moved, but still nearest to its parent
    alignment = align_to_parent(new, _parent(PARENT_IDS, PARENT_CENTROIDS), features=FEATURES, drift_threshold=0.5)
    assert alignment.ids == PARENT_IDS
    assert alignment.drifted == [2]
    metrics = alignment.as_metrics()
    assert metrics["drifted_ids"] == [2] and metrics["matched"]["2"] == pytest.approx(0.9)


def test_distances_are_measured_in_the_given_scale():
    parent = _parent([0, 1], np.array([[0.0, 0.0, 0.0], [1.0, 10.0, 0.0]]))
    new = np.array([[0.0, 9.0, 0.0], [1.0, 1.0, 0.0]])
    # In raw units the second feature dominates; scaled by (0.1, 10, 1) the first one does.
    assert align_to_parent(new, parent, features=FEATURES).ids == [1, 0]
    assert align_to_parent(new, parent, features=FEATURES, scale=np.array([0.1, 10.0, 1.0])).ids == [0, 1]
    d = distance_matrix(new, np.array([[0.0, 0.0, 0.0]]), np.array([1.0, 3.0, 1.0]))
    assert d[:, 0] == pytest.approx([3.0, np.sqrt(1 + 1 / 9)])


def test_unusable_parents_fail_clearly():
    parent = _parent(PARENT_IDS, PARENT_CENTROIDS)
    without = [{k: v for k, v in s.items() if k != "centroid"} for s in parent]
    with pytest.raises(AlignmentError, match="no 'centroid'.*train without parent_segments"):
        align_to_parent(PARENT_CENTROIDS, without, features=FEATURES)
    with pytest.raises(AlignmentError, match="not comparable"):
        align_to_parent(PARENT_CENTROIDS[:, :2], parent, features=FEATURES[:2])
    with pytest.raises(AlignmentError, match="not distinct"):
        align_to_parent(PARENT_CENTROIDS, [{**s, "id": 1} for s in parent], features=FEATURES)
    with pytest.raises(AlignmentError, match="no segments"):
        align_to_parent(PARENT_CENTROIDS, [], features=FEATURES)


# ---------------------------------------------------------------------------------------------------------------
# Retraining on generated data


def _majority_persona(table: dict[str, dict[str, int]]) -> dict[int, str]:
    """Segment id -> the persona most of its members have, from a ``persona_by_segment`` metrics table."""
    ids = {int(i) for counts in table.values() for i in counts}
    return {i: max(table, key=lambda p: table[p].get(str(i), 0)) for i in ids}


@pytest.fixture(scope="module")
def first():
    events, truths = generate(600, seed=1)
    return train(events, PARAMS, truths)


@pytest.fixture(scope="module")
def second_data():
    return generate(600, seed=3)


@pytest.fixture(scope="module")
def second(first, second_data):
    events, truths = second_data
    return train(events, PARAMS, truths, parent_segments=first.segment.segments)


@pytest.fixture(scope="module")
def second_rows(second_data):
    events, _ = second_data
    seg_rows, _churn_rows = build_rows(group_by_user(events), PARAMS, max(e["event_time"] for e in events))
    return seg_rows


def _personas(second_data) -> dict[str, str]:
    return {t.user_id: t.persona for t in second_data[1]}


def test_segments_carry_their_centroids(first):
    for seg in first.segment.segments:
        assert list(seg["centroid"]) == list(PARAMS.segment_features)
    centroids = np.array([list(s["centroid"].values()) for s in first.segment.segments])
    scaler, kmeans = first.segment.pipeline[0], first.segment.pipeline[-1]
    assert np.allclose(scaler.transform(centroids), kmeans.cluster_centers_)


def test_retrain_keeps_persona_names_on_the_same_ids(first, second, second_data, second_rows):
    k = first.metrics["segmentation"]["k"]
    assert second.metrics["segmentation"]["k"] == k == 4
    # Without a parent, seed 3 numbers its clusters differently: the alignment has work to do.
    raw = train_segments(second_rows, PARAMS, _personas(second_data))
    before = _majority_persona(first.metrics["segmentation"]["persona_by_segment"])
    assert _majority_persona(raw.metrics["persona_by_segment"]) != before

    after = _majority_persona(second.metrics["segmentation"]["persona_by_segment"])
    assert after == before and len(set(after.values())) == k
    assert [(s["id"], s["name"]) for s in second.segment.segments] == [(s["id"], s["name"]) for s in first.segment.segments]
    alignment = second.metrics["segmentation"]["alignment"]
    assert sorted(alignment["matched"]) == [str(i) for i in range(k)]
    assert alignment["new_ids"] == [] and alignment["disappeared_ids"] == [] and alignment["drifted_ids"] == []
    assert second.metrics["segmentation"]["ari_vs_personas"] >= 0.8


def _on_centroids(trained) -> np.ndarray:
    """Feature rows sitting exactly on each cluster centre (other features 0), in cluster order."""
    scaler, kmeans = trained.segment.pipeline[0], trained.segment.pipeline[-1]
    rows = np.zeros((kmeans.n_clusters, len(FEATURE_NAMES)), dtype=np.float32)
    rows[:, trained.segment.feature_index] = scaler.inverse_transform(kmeans.cluster_centers_)
    return rows


def _check_onnx(trained) -> onnx.ModelProto:
    model_bytes, _ = export_onnx(trained)
    parity = check_parity(model_bytes, trained)
    assert parity["ok"], parity
    ids = [s["id"] for s in trained.segment.segments]
    got = onnx_outputs(model_bytes, _on_centroids(trained))
    assert got["segment"].tolist() == ids  # the graph outputs the manifest's ids
    assert got["distances"].shape[1] == len(ids)
    return onnx.load_from_string(model_bytes)


def test_onnx_parity_with_aligned_ids(second):
    model = _check_onnx(second)
    # ids 0..k-1 in some order: absorbed by reordering the clusters, no lookup node
    assert "seg_id_lookup" not in {n.name for n in model.graph.node}


@pytest.fixture(scope="module")
def sparse_parent(first):
    """The first model's segments as if earlier retrains had retired some ids."""
    return [{**s, "id": new} for s, new in zip(first.segment.segments, PARENT_IDS)]


def test_sparse_ids_through_onnx_registry_and_runtime(tmp_path, second_data, sparse_parent):
    events, truths = second_data
    trained = train(events, PARAMS, truths, parent_segments=sparse_parent)
    assert [s["id"] for s in trained.segment.segments] == PARENT_IDS
    assert [s["name"] for s in trained.segment.segments] == [s["name"] for s in sparse_parent]
    assert {str(i) for counts in trained.metrics["segmentation"]["persona_by_segment"].values() for i in counts} <= set(map(str, PARENT_IDS))
    assert all(s["churn_rate"] is not None for s in trained.segment.segments)
    model = _check_onnx(trained)
    assert "seg_id_lookup" in {n.name for n in model.graph.node}

    manifest = {
        "data_window": trained.data_window,
        "feature_names": list(FEATURE_NAMES),
        "segments": trained.segment.segments,
        "metrics": trained.metrics,
        "training": {"interest_half_life_hours": 72.0},
    }
    registry.publish(registry.BundleArtifacts(model.SerializeToString(), manifest), tmp_path)
    bundle = load_current(tmp_path)
    assert bundle.segment_ids == tuple(PARENT_IDS)
    names = {s["id"]: s["name"] for s in trained.segment.segments}
    rows = _on_centroids(trained).astype(np.float64).tolist()
    for expected_id, row in zip(PARENT_IDS, rows):
        scores = bundle.score(row)
        assert (scores.segment_id, scores.segment_name) == (expected_id, names[expected_id])
        assert int(np.argmin(bundle.distances(row))) == PARENT_IDS.index(expected_id)
    batch = bundle.score_batch(trained.churn.holdout_X[:100].tolist())
    assert all(s.segment_name == names[s.segment_id] for s in batch)


@pytest.mark.parametrize("k, new_ids, disappeared", [(5, 1, 0), (3, 0, 1)])
def test_k_changes_on_real_data(second, second_rows, second_data, sparse_parent, k, new_ids, disappeared):
    params = dataclasses.replace(PARAMS, k_range=(k, k))
    segment = train_segments(second_rows, params, _personas(second_data), sparse_parent)
    alignment = segment.metrics["alignment"]
    ids = [s["id"] for s in segment.segments]
    assert len(alignment["new_ids"]) == new_ids and len(alignment["disappeared_ids"]) == disappeared
    assert alignment["new_ids"] == list(range(10, 10 + new_ids))  # after the parent's max id (9)
    assert ids == sorted(set(PARENT_IDS) - set(alignment["disappeared_ids"]) | set(alignment["new_ids"]))
    names = Counter(s["name"] for s in segment.segments)
    assert max(names.values()) == 1
    parent_names = {s["name"] for s in sparse_parent}
    for s in segment.segments:  # survivors keep their names; a new segment never takes a parent's name
        assert (s["name"] in parent_names) == (s["id"] in PARENT_IDS)
    _check_onnx(dataclasses.replace(second, segment=segment))
