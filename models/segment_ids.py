"""Stable segment ids across retrains: match a new k-means solution to its parent's segments.

K-means numbers its clusters arbitrarily, so without this step "segment 2" may be the analytics users in one
bundle and the mobile users in the next, and every rule or dashboard keyed on segment ids silently changes
meaning. :func:`align_to_parent` matches the new centroids to the parent bundle's centroids (one-to-one,
Hungarian algorithm on Euclidean distance) so each new cluster inherits the id and the name of the parent
segment it continues.

Id scheme (the simplest one that keeps an id meaning one thing):

* A first model (no parent) numbers its segments 0..k-1.
* A matched cluster keeps its parent's id and name; a new cluster (k grew, or more new clusters than parent
  segments) gets a fresh id after the parent's largest id; a parent id without a match (k shrank) is retired
  and reported in :attr:`Alignment.disappeared`. Ids are therefore distinct non-negative integers but not
  necessarily 0..k-1 -- renumbering to close a gap would give a surviving id a new meaning, which is exactly
  what this module exists to prevent.
* Inside a bundle the clusters are ordered by ascending id: the ONNX ``distances`` output's column ``j`` and the
  manifest's ``segments[j]`` both belong to the ``j``-th smallest id, and the graph maps the nearest column to
  its id (see :func:`models.onnx_export.build_graph`). The runtime (:class:`udfs.model_bundle.ModelBundle`)
  accepts any distinct non-negative ids, one per cluster, and looks names up by id.
* Fresh ids start after the *parent's* largest id only: an id retired two or more versions ago can come back
  with a new meaning. Rules should be checked against the current manifest after a retrain that retired ids.

Distances are measured in the *new* model's standardized space (centroid differences divided by the new
scaler's per-feature standard deviation): the space the new k-means itself measures similarity in. Centroids
are stored in the manifest in original feature units (``segments[i]["centroid"]``, by feature name), because
the parent's scaler is not the new one and scaled coordinates of two different fits are not comparable.
A match farther than ``drift_threshold`` is still a match (the Hungarian assignment is optimal), but it is
flagged as drifted: the segment kept its id while its members changed noticeably, worth a human look.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

# In standard deviations of the new data. On the generator's personas (600 users), a retrain on other users of
# the same populations moves centroids by 0.05-0.2 while distinct segments are 2.9-3.8 apart; 0.5 flags a real
# shift of a segment's make-up well before it could be confused with a neighbour.
DEFAULT_DRIFT_THRESHOLD = 0.5


class AlignmentError(ValueError):
    """The parent segments cannot be matched (no centroids, other segment features, bad ids)."""


@dataclass(frozen=True)
class ParentSegments:
    """The parent bundle's segments as arrays: ids, names and centroids (original units, in ``features`` order)."""

    ids: list[int]
    names: list[str]
    centroids: np.ndarray  # [k_parent, F]
    features: tuple[str, ...]

    @classmethod
    def from_manifest(cls, segments: Sequence[Mapping[str, Any]], features: Sequence[str]) -> "ParentSegments":
        """Read the manifest's ``segments`` entries; raise :class:`AlignmentError` if they cannot be matched."""
        features = tuple(features)
        if not segments:
            raise AlignmentError("the parent has no segments to align to")
        ids: list[int] = []
        rows: list[list[float]] = []
        for seg in segments:
            seg_id = seg.get("id")
            if not isinstance(seg_id, int) or isinstance(seg_id, bool) or seg_id < 0:
                raise AlignmentError(f"parent segment id {seg_id!r} is not a non-negative integer")
            centroid = seg.get("centroid")
            if not isinstance(centroid, Mapping):
                raise AlignmentError(
                    f"parent segment {seg_id} has no 'centroid' (bundle trained before stable segment ids); "
                    f"train without parent_segments: ids restart at 0..k-1"
                )
            if set(centroid) != set(features):
                raise AlignmentError(
                    f"parent segment {seg_id} has a centroid over {sorted(centroid)}, the new model segments on "
                    f"{sorted(features)}; segments over other features are not comparable -- train without "
                    f"parent_segments (ids restart at 0..k-1)"
                )
            ids.append(seg_id)
            rows.append([float(centroid[f]) for f in features])
        if len(set(ids)) != len(ids):
            raise AlignmentError(f"parent segment ids are not distinct: {sorted(ids)}")
        names = [str(seg.get("name") or f"segment_{seg_id}") for seg, seg_id in zip(segments, ids)]
        return cls(ids, names, np.asarray(rows, dtype=np.float64), features)


@dataclass(frozen=True)
class Match:
    """One new cluster matched to a parent segment."""

    cluster: int  # index of the new cluster (its k-means label)
    segment_id: int  # the parent's id, inherited
    name: str  # the parent's name, inherited
    distance: float  # between the two centroids, in the new standardized space
    drifted: bool  # distance > threshold


@dataclass(frozen=True)
class Alignment:
    """Stable id of every new cluster, and what changed relative to the parent."""

    ids: list[int]  # ids[cluster] = stable id of new cluster ``cluster``
    matches: list[Match]  # by cluster
    new_ids: list[int]  # fresh ids of clusters without a parent segment (ascending)
    disappeared: list[int]  # parent ids without a new cluster (ascending)
    threshold: float

    @property
    def inherited_names(self) -> dict[int, str]:
        """New cluster -> the name it inherits from its parent segment."""
        return {m.cluster: m.name for m in self.matches}

    @property
    def drifted(self) -> list[int]:
        """Ids that were matched although their centroid moved farther than the threshold."""
        return sorted(m.segment_id for m in self.matches if m.drifted)

    def as_metrics(self) -> dict[str, Any]:
        """JSON-ready summary for the manifest's metrics."""
        return {
            "matched": {str(m.segment_id): round(m.distance, 4) for m in sorted(self.matches, key=lambda m: m.segment_id)},
            "new_ids": list(self.new_ids),
            "disappeared_ids": list(self.disappeared),
            "drifted_ids": self.drifted,
            "drift_threshold": self.threshold,
        }


def distance_matrix(new_centroids: np.ndarray, parent_centroids: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances [k_new, k_parent] between centroids, coordinates divided by ``scale`` (default 1)."""
    new = np.asarray(new_centroids, dtype=np.float64)
    old = np.asarray(parent_centroids, dtype=np.float64)
    if new.ndim != 2 or old.ndim != 2 or new.shape[1] != old.shape[1]:
        raise ValueError(f"centroid arrays must be [k, F] over the same features, got {new.shape} and {old.shape}")
    s = np.ones(new.shape[1]) if scale is None else np.asarray(scale, dtype=np.float64)
    if s.shape != (new.shape[1],) or np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"scale must be {new.shape[1]} positive finite numbers, got {s}")
    diff = (new[:, None, :] - old[None, :, :]) / s
    return np.sqrt(np.sum(diff * diff, axis=2))


def align_to_parent(
    new_centroids: np.ndarray,
    parent_segments: Sequence[Mapping[str, Any]],
    *,
    features: Sequence[str],
    scale: np.ndarray | None = None,
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
) -> Alignment:
    """Map each new cluster to a stable id by matching its centroid to the parent's (Hungarian, Euclidean).

    ``new_centroids``: [k, F] in original feature units, columns in ``features`` order (row i = cluster i).
    ``parent_segments``: the parent manifest's ``segments`` entries (each with ``id``, ``name`` and ``centroid``
    by feature name). ``scale``: per-feature divisors for the distance, normally the new StandardScaler's
    ``scale_`` (see the module docstring); None compares in original units.
    """
    from scipy.optimize import linear_sum_assignment

    parent = ParentSegments.from_manifest(parent_segments, features)
    distances = distance_matrix(new_centroids, parent.centroids, scale)
    rows, cols = linear_sum_assignment(distances)
    matches = [
        Match(
            cluster=int(r),
            segment_id=parent.ids[c],
            name=parent.names[c],
            distance=float(distances[r, c]),
            drifted=bool(distances[r, c] > drift_threshold),
        )
        for r, c in zip(rows, cols)
    ]
    ids: list[int | None] = [None] * distances.shape[0]
    for m in matches:
        ids[m.cluster] = m.segment_id
    next_id = max(parent.ids) + 1
    new_ids = []
    for cluster, seg_id in enumerate(ids):
        if seg_id is None:
            ids[cluster] = next_id
            new_ids.append(next_id)
            next_id += 1
    matched = {m.segment_id for m in matches}
    disappeared = sorted(i for i in parent.ids if i not in matched)
    alignment = Alignment(
        ids=[int(i) for i in ids if i is not None],
        matches=sorted(matches, key=lambda m: m.cluster),
        new_ids=new_ids,
        disappeared=disappeared,
        threshold=float(drift_threshold),
    )
    log.info("segment ids: matched %s, new %s, disappeared %s, drifted %s",
             alignment.as_metrics()["matched"], new_ids, disappeared, alignment.drifted)
    return alignment
