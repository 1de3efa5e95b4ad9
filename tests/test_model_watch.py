"""Hot reload: a running keyed function follows the registry's CURRENT pointer between two events, refuses a
broken bundle and keeps the one it has, and every decision names the version that scored it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pyflink.common import Row

from models import registry
from udfs.avro_codec import decision_codec, event_codec
from udfs.model_bundle import MANIFEST_FILE, MODEL_FILE, ModelBundle
from udfs.model_watch import BundleWatcher
from udfs.personalizer import Personalizer

from tests.conftest import make_event
from tests.test_personalize_function import FakeContext, _function

HALF_LIFE_HOURS = 72.0


def _copy_version(model_dir: Path, source: str, version: str) -> str:
    """A second published version with the same model (a retrain, for the purpose of switching)."""
    shutil.copytree(model_dir / source, model_dir / version)
    manifest_path = model_dir / version / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest.update(version=version, parent_version=source)
    manifest_path.write_text(json.dumps(manifest))
    return version


@pytest.fixture
def registry_copy(trained_model_dir, tmp_path) -> tuple[Path, str, str]:
    """A private copy of the session's registry (its CURRENT may be moved) holding versions A (current) and B."""
    model_dir = tmp_path / "models"
    shutil.copytree(trained_model_dir, model_dir)
    a = registry.current_version(model_dir)
    b = _copy_version(model_dir, a, "m-20990101-000000-0000000b")
    return model_dir, a, b


def test_poll_follows_the_pointer_only_when_due(registry_copy):
    model_dir, a, b = registry_copy
    watcher = BundleWatcher(model_dir, 1000, a, HALF_LIFE_HOURS)
    assert watcher.poll(now_ms=10_000) is None  # due, pointer unchanged
    registry.set_current(model_dir, b)
    assert watcher.poll(now_ms=10_500) is None  # not due yet: one file read per interval at most
    bundle = watcher.poll(now_ms=11_000)
    assert bundle is not None and bundle.version == b and watcher.current_version == b and watcher.reloads == 1
    assert watcher.poll(now_ms=12_000) is None


def test_broken_bundle_is_refused_once_and_the_current_one_kept(registry_copy):
    model_dir, a, _ = registry_copy
    broken = _copy_version(model_dir, a, "m-20990101-000001-0000000c")
    (model_dir / broken / MODEL_FILE).write_bytes(b"not an onnx model")
    calls = []

    def loader(path, **kwargs):
        calls.append(path)
        return ModelBundle.load(path, **kwargs)

    watcher = BundleWatcher(model_dir, 1000, a, HALF_LIFE_HOURS, loader=loader)
    registry.set_current(model_dir, broken)
    assert watcher.poll(now_ms=1_000) is None
    assert "sha256" in watcher.refused[broken] and watcher.current_version == a
    assert watcher.poll(now_ms=5_000) is None and len(calls) == 1  # not retried every interval


def test_bundle_with_another_half_life_is_refused(registry_copy):
    model_dir, a, b = registry_copy
    watcher = BundleWatcher(model_dir, 1000, a, half_life_hours=1.0)
    registry.set_current(model_dir, b)
    assert watcher.poll(now_ms=1_000) is None
    assert "interest_half_life_hours" in watcher.refused[b]


def test_invisible_model_dir_and_disabled_watcher_keep_the_bundle(tmp_path):
    assert BundleWatcher(tmp_path / "nowhere", 1000, "m-x").poll(now_ms=1_000) is None
    off = BundleWatcher(tmp_path, 0, "m-x")
    assert not off.due(10**15) and off.poll(now_ms=10**15) is None


def test_keyed_function_switches_between_two_events(registry_copy, monkeypatch):
    model_dir, a, b = registry_copy
    bundle_a = ModelBundle.load(model_dir / a)
    fn = _function(bundle_a)
    fn.watcher = BundleWatcher(model_dir, 1000, a, HALF_LIFE_HOURS)
    clock = iter(range(1_000_000, 2_000_000, 400))  # each event 400 ms after the previous one
    monkeypatch.setattr("udfs.flink_functions._now_ms", lambda: next(clock))
    codec, decisions = event_codec(), decision_codec()

    def decide(i: int) -> dict:
        event = make_event("page_view", user_id="u-1", t=1_000_000)
        event["event_id"] = f"e-{i}"
        event["consent"] = {"personalization": True, "analytics": True, "marketing": False}
        out = list(fn.process_element(Row(codec.encode(event), "events", 0, i), FakeContext()))
        assert len(out) == 1 and isinstance(out[0], bytes)
        return decisions.decode(out[0])

    before = [decide(i) for i in range(3)]
    registry.set_current(model_dir, b)
    after = [decide(i) for i in range(3, 9)]
    assert [d["model_version"] for d in before] == [a] * 3
    # the pointer is read at most once per second of processing time: within three events the job has switched
    versions = [d["model_version"] for d in after]
    assert versions[-3:] == [b] * 3 and versions == sorted(versions, key=[a, b].index)
    assert fn.reloads.count == 1 and isinstance(fn.personalizer, Personalizer)
