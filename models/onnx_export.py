"""Export the trained models to ONE ONNX graph and check it against scikit-learn.

Graph (one ``run()`` computes everything)::

    features float32 [N, F] --Gather(segment columns)--> minus raw-space centroids -> / scale -> squared sums
                          |                                     --> ArgMin [-> Gather(ids)] --> segment int64 [N]
                          |                                     `-> Sqrt   --> distances float32 [N, k]
                          `--> churn: MatMul(folded weights) + bias -> Sigmoid             --> churn float32 [N]
                               (or, for a tree model: skl2onnx raw score -> Platt sigmoid)

The segmentation part (6 nodes) and the churn head are built here (see :func:`_segment_branch` and
:func:`_churn_branch` for why); a churn model that is not a calibrated logistic regression is converted with
skl2onnx. Nodes nobody's output needs are dropped. ``segment`` is the segment's stable id
(:mod:`models.segment_ids`): the cluster index itself for a first model, looked up in an id table when a
retrain kept its parent's ids and those are not 0..k-1. Few nodes on purpose: the stream runs the graph once
per event on one row, where the cost is per node, not per multiply-add.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from udfs.features import FEATURE_NAMES

TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
PARITY_TOLERANCE = 1e-5
INPUT = "features"
OUTPUTS = ("segment", "distances", "churn")


def _final_estimator(model: Any) -> Any:
    return model.steps[-1][1] if hasattr(model, "steps") else model


def _convert(model: Any, input_name: str, n_features: int, options: dict | None = None) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    return convert_sklearn(
        model,
        initial_types=[(input_name, FloatTensorType([None, n_features]))],
        target_opset=TARGET_OPSET,
        options=options,
    )


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


class _ChurnBranch(NamedTuple):
    """The churn part of the graph: nodes reading ``features`` and writing ``churn``, their initializers, and the
    operator sets (and IR version) the converted classifier needs, if it came from skl2onnx."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    opsets: dict[str, int]
    ir_version: int | None


def _scaler_mean_scale(scaler: Any) -> tuple[np.ndarray, np.ndarray]:
    """A fitted StandardScaler as ``(mean, scale)`` with ``(x - mean) / scale`` its transform (float64), whether
    or not it centres and scales."""
    n = scaler.n_features_in_
    mean = scaler.mean_ if scaler.with_mean else np.zeros(n)
    scale = scaler.scale_ if scaler.with_std else np.ones(n)
    return mean, scale


def _single_sigmoid(final: Any) -> bool:
    """A sigmoid-calibrated binary classifier with one calibrator (``CalibratedClassifierCV(ensemble=False)``)."""
    from sklearn.calibration import CalibratedClassifierCV

    return (isinstance(final, CalibratedClassifierCV) and final.method == "sigmoid"
            and len(final.calibrated_classifiers_) == 1 and len(final.classes_) == 2)


def linear_churn(model: Any) -> tuple[np.ndarray, float] | None:
    """``(w, c)`` with ``churn = sigmoid(x . w + c)`` when ``model`` is a sigmoid-calibrated logistic regression
    (``[StandardScaler ->] CalibratedClassifierCV(LogisticRegression, ensemble=False)``); None otherwise.

    Scaler, linear decision function and Platt scaling are all affine, so they fold into one weight vector
    (computed in float64): ``-(a * (((x - m) / s) . v + i) + b)``. The graph then needs 3 nodes instead of the 9
    of skl2onnx's scaler + linear classifier + the calibration head.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    steps = [step for _name, step in model.steps] if hasattr(model, "steps") else [model]
    final, pre = steps[-1], steps[:-1]
    if not _single_sigmoid(final) or len(pre) > 1 or (pre and not isinstance(pre[0], StandardScaler)):
        return None
    calibrated = final.calibrated_classifiers_[0]
    base, calibrator = calibrated.estimator, calibrated.calibrators[0]
    if not isinstance(base, LogisticRegression) or base.coef_.shape[0] != 1:
        return None
    v, i = base.coef_[0].astype(np.float64), float(base.intercept_[0])
    if pre:
        mean, scale = _scaler_mean_scale(pre[0])
        v, i = v / scale, i - float(np.dot(mean / scale, v))
    a, b = float(calibrator.a_), float(calibrator.b_)
    return -a * v, -a * i - b


def _churn_branch(model: Any, n_features: int) -> _ChurnBranch:
    """The churn part: ``churn`` [N] from ``features``.

    * A calibrated logistic regression (:func:`linear_churn`): ``Sigmoid(MatMul(features, w) + c)``.
    * Another single-calibrator sigmoid-calibrated classifier: the base estimator's raw decision function via
      skl2onnx, followed by the Platt scaling done here: ``churn = sigmoid(-(a * decision + b))`` -- 3 nodes
      instead of the ~9 of skl2onnx's generic calibration graph.
    * Anything else is converted as a whole and its positive-class probability taken.
    """
    from sklearn.pipeline import Pipeline

    linear = linear_churn(model)
    if linear is not None:
        w, c = linear
        init = [numpy_helper.from_array(w.astype(np.float32), "churn_weights"),
                numpy_helper.from_array(np.asarray(c, dtype=np.float32), "churn_bias")]
        nodes = [
            helper.make_node("MatMul", [INPUT, "churn_weights"], ["churn_score"], name="churn_linear"),  # [N]
            helper.make_node("Add", ["churn_score", "churn_bias"], ["churn_logit"], name="churn_bias"),
            helper.make_node("Sigmoid", ["churn_logit"], ["churn"], name="churn_sigmoid"),
        ]
        return _ChurnBranch(nodes, init, {}, None)
    final = _final_estimator(model)
    pre = list(model.steps[:-1]) if hasattr(model, "steps") else []
    single_sigmoid = _single_sigmoid(final)
    if single_sigmoid:
        calibrated = final.calibrated_classifiers_[0]
        base = calibrated.estimator
        calibrator = calibrated.calibrators[0]
        raw_model = Pipeline(pre + [("base", base)]) if pre else base
        churn = _convert(raw_model, "x", n_features, {id(base): {"zipmap": False, "raw_scores": True}})
    else:
        churn = _convert(model, "x", n_features, {id(final): {"zipmap": False}})
    churn = onnx.compose.add_prefix(churn, "churn_")
    _rename(churn.graph, churn.graph.input[0].name, INPUT)
    scores = next(o.name for o in churn.graph.output if "prob" in o.name)  # [N, 2]; column 1: positive class
    init = [numpy_helper.from_array(np.asarray(1, dtype=np.int64), "glue_positive_class")]
    opsets = {imp.domain: int(imp.version) for imp in churn.opset_import}
    converted_nodes, converted_init = list(churn.graph.node), list(churn.graph.initializer)
    if not single_sigmoid:
        nodes = [helper.make_node("Gather", [scores, "glue_positive_class"], ["churn"], axis=1, name="glue_churn")]
        return _ChurnBranch(converted_nodes + nodes, converted_init + init, opsets, churn.ir_version)
    init += [
        numpy_helper.from_array(np.asarray(-calibrator.a_, dtype=np.float32), "glue_platt_neg_a"),
        numpy_helper.from_array(np.asarray(-calibrator.b_, dtype=np.float32), "glue_platt_neg_b"),
    ]
    nodes = [
        helper.make_node("Gather", [scores, "glue_positive_class"], ["glue_decision"], axis=1, name="glue_decision"),
        helper.make_node("Mul", ["glue_decision", "glue_platt_neg_a"], ["glue_platt_scaled"], name="glue_platt_mul"),
        helper.make_node("Add", ["glue_platt_scaled", "glue_platt_neg_b"], ["glue_platt_logit"], name="glue_platt_add"),
        helper.make_node("Sigmoid", ["glue_platt_logit"], ["churn"], name="glue_churn"),
    ]
    return _ChurnBranch(converted_nodes + nodes, converted_init + init, opsets, churn.ir_version)


def _checked_segment_ids(segment_ids: Sequence[int] | None, k: int) -> list[int] | None:
    """The cluster -> stable id table, or None when it is the identity (no lookup node needed).

    Ids must be distinct, non-negative and ascending: cluster ``i`` (``distances`` column ``i``) is the one with
    the ``i``-th smallest id (see :mod:`models.segment_ids`).
    """
    if segment_ids is None:
        return None
    ids = [int(i) for i in segment_ids]
    if len(ids) != k or any(i < 0 for i in ids) or any(a >= b for a, b in zip(ids, ids[1:])):
        raise ValueError(f"segment ids must be {k} distinct non-negative integers in ascending (cluster) order, got {ids}")
    return None if ids == list(range(k)) else ids


def _segment_branch(
    pipeline: Any, segment_index: list[int], segment_ids: Sequence[int] | None = None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``segment`` and ``distances`` from ``features`` for Pipeline(StandardScaler, KMeans).

    ``segment_index``: the columns of ``features`` the pipeline reads. ``segment_ids``: stable id of each
    cluster; when they are not 0..k-1 the nearest cluster's position is mapped to its id by one ``Gather``.

    Built by hand rather than with skl2onnx's KMeans converter: that one expands ``|z|^2 - 2 z.c + |c|^2`` in
    float32, which cancels to a small negative number -- and ``Sqrt`` to NaN -- for a point sitting on a
    centroid (seen with small training sets). Here the differences are squared directly: never negative, and
    closer to scikit-learn's float64 result.

    The scaler is folded into the centroids: ``(x - m)/s - c == (x - (m + s*c))/s``, so the graph subtracts the
    centroids in raw feature space and divides once; the ``Gather`` of the columns uses [1, Fs] indices and so
    yields [N, 1, Fs] directly (no ``Unsqueeze``). 6 nodes (7 with the id lookup) instead of 8: the stream runs
    the graph once per event on one row, where each node costs ~1 µs of dispatch.
    """
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    steps = [step for _name, step in pipeline.steps] if hasattr(pipeline, "steps") else []
    if len(steps) != 2 or not isinstance(steps[0], StandardScaler) or not isinstance(steps[1], KMeans):
        raise TypeError(f"expected Pipeline(StandardScaler, KMeans), got {pipeline!r}")
    scaler, kmeans = steps
    ids = _checked_segment_ids(segment_ids, kmeans.n_clusters)
    mean, scale = _scaler_mean_scale(scaler)
    raw_centers = mean[None, :] + scale[None, :] * kmeans.cluster_centers_  # float64, cast once below
    init = [
        numpy_helper.from_array(np.asarray([segment_index], dtype=np.int64), "seg_columns"),  # [1, Fs]
        numpy_helper.from_array(raw_centers.astype(np.float32)[None, :, :], "seg_raw_centers"),  # [1, k, Fs]
        numpy_helper.from_array(scale.astype(np.float32), "seg_scale"),
    ]
    nodes = [
        helper.make_node("Gather", [INPUT, "seg_columns"], ["seg_x"], axis=1, name="seg_select_features"),  # [N, 1, Fs]
        helper.make_node("Sub", ["seg_x", "seg_raw_centers"], ["seg_raw_diff"], name="seg_diff"),  # [N, k, Fs]
        helper.make_node("Div", ["seg_raw_diff", "seg_scale"], ["seg_diff"], name="seg_scale"),
        helper.make_node("ReduceSumSquare", ["seg_diff"], ["seg_sq"], axes=[2], keepdims=0, name="seg_sq"),  # [N, k]
        helper.make_node("ArgMin", ["seg_sq"], ["seg_position" if ids else "segment"], axis=1, keepdims=0, name="seg_argmin"),
        helper.make_node("Sqrt", ["seg_sq"], ["distances"], name="seg_sqrt"),
    ]
    if ids:
        init.append(numpy_helper.from_array(np.asarray(ids, dtype=np.int64), "seg_ids"))
        nodes.append(helper.make_node("Gather", ["seg_ids", "seg_position"], ["segment"], axis=0, name="seg_id_lookup"))
    return nodes, init


def build_graph(segment_pipeline: Any, segment_index: list[int], churn_model: Any, k: int,
                segment_ids: Sequence[int] | None = None) -> onnx.ModelProto:
    """The combined model: input ``features`` [N, F]; outputs ``segment``, ``distances``, ``churn``.

    ``segment`` is the stable id of the nearest cluster (``segment_ids[cluster]``; default: the cluster index),
    ``distances`` has one column per cluster in ascending id order. Few nodes on purpose: the stream runs this
    graph once per event with a single row, where the cost is per node (~0.3-0.5 us each), not per multiply-add.
    """
    n_features = len(FEATURE_NAMES)
    seg_nodes, seg_init = _segment_branch(segment_pipeline, segment_index, segment_ids)
    churn = _churn_branch(churn_model, n_features)
    graph = helper.make_graph(
        seg_nodes + churn.nodes,
        "onramp_segments_and_churn",
        inputs=[helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", n_features])],
        outputs=[
            helper.make_tensor_value_info("segment", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("distances", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("churn", TensorProto.FLOAT, ["N"]),
        ],
        initializer=seg_init + churn.initializers,
    )
    # Drop what no output needs (e.g. the classifiers' label branches).
    needed = {"segment", "distances", "churn"}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used_init = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_init)
    opsets: dict[str, int] = {"": TARGET_OPSET[""]}
    for domain, version in churn.opsets.items():
        opsets[domain] = max(opsets.get(domain, 0), version)
    opset_imports = [helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
    model = helper.make_model(
        graph,
        opset_imports=opset_imports,
        producer_name="onramp",
        doc_string="Onramp onboarding segments (KMeans) and churn risk; input: features in manifest order.",
    )
    # skl2onnx's IR version when it converted a part (it knows what onnxruntime reads), else the oldest one the
    # opsets allow: helper.make_model's default is the newest the onnx package knows, which a runtime may not.
    model.ir_version = churn.ir_version or helper.find_min_ir_version_for(opset_imports)
    onnx.checker.check_model(model, full_check=True)
    return model


def opset_of(model: onnx.ModelProto) -> dict[str, int]:
    return {(imp.domain or "ai.onnx"): int(imp.version) for imp in model.opset_import}


def segment_ids(segment_model: Any) -> list[int]:
    """Stable id of each cluster of a :class:`models.training.SegmentModel` (its segments are in cluster order)."""
    return [int(s["id"]) for s in segment_model.segments]


def export_onnx(trained: Any) -> tuple[bytes, dict[str, int]]:
    """Serialized combined model and its opset imports, from :class:`models.training.TrainedModels`."""
    model = build_graph(trained.segment.pipeline, trained.segment.feature_index, trained.churn.model,
                        trained.segment.metrics["k"], segment_ids(trained.segment))
    return model.SerializeToString(), opset_of(model)


def sklearn_outputs(trained: Any, X: np.ndarray) -> dict[str, np.ndarray]:
    """What scikit-learn computes for the float32 rows ``X`` (evaluated in float64, as it trains)."""
    X64 = np.asarray(X, dtype=np.float32).astype(np.float64)
    Xs = X64[:, trained.segment.feature_index]
    ids = np.asarray(segment_ids(trained.segment), dtype=np.int64)
    return {
        "segment": ids[trained.segment.pipeline.predict(Xs)],
        "distances": trained.segment.pipeline.transform(Xs),
        "churn": trained.churn.model.predict_proba(X64)[:, 1],
    }


def onnx_outputs(onnx_bytes: bytes, X: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    values = session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(X, dtype=np.float32)})
    return dict(zip(OUTPUTS, values))


def check_parity(onnx_bytes: bytes, trained: Any, X: np.ndarray | None = None, tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Compare ONNX (float32) with scikit-learn on ``X`` (default: churn holdout + segmentation rows)."""
    X = trained.parity_X if X is None else X
    ref = sklearn_outputs(trained, X)
    got = onnx_outputs(onnx_bytes, X)
    d_dist = float(np.max(np.abs(got["distances"].astype(np.float64) - ref["distances"]))) if len(X) else 0.0
    d_churn = float(np.max(np.abs(got["churn"].astype(np.float64) - ref["churn"]))) if len(X) else 0.0
    mismatched = int(np.sum(got["segment"] != ref["segment"]))
    return {
        "rows": int(len(X)),
        "tolerance": tolerance,
        "max_abs_diff_distances": d_dist,
        "max_abs_diff_churn": d_churn,
        "segment_mismatches": mismatched,
        "ok": bool(d_dist <= tolerance and d_churn <= tolerance and mismatched == 0),
    }
