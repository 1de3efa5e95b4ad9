"""`onramp train` on real history (Avro files) with segment ids carried over from the current bundle."""

from __future__ import annotations

import json
import shutil

from jobs.cli import main
from models import registry
from models.generator import generate
from models.history import write_avro_file


def test_train_from_avro_files_keeps_segment_ids_of_the_current_bundle(trained_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "models"
    shutil.copytree(trained_model_dir, model_dir)  # current: the session's bundle (generator, 600 users, seed 7)
    parent = registry.current_manifest(model_dir)
    events, _truths = generate(600, seed=21)
    export = tmp_path / "history"
    export.mkdir()
    half = len(events) // 2
    write_avro_file(export / "part-1.avro", events[:half])
    write_avro_file(export / "part-2.avro", events[half:])

    code = main(["train", "--from-avro", str(export), "--force", "--model-dir", str(model_dir),
                 "--set", "churn_horizon_hours=72"])

    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = registry.current_manifest(model_dir)
    assert manifest["version"] == printed["version"] != parent["version"]
    assert manifest["parent_version"] == parent["version"]
    source = manifest["training"]["source"]
    assert source["kind"] == "events" and source["events"] == len(events)
    assert source["source"]["kind"] == "avro_files" and len(source["source"]["files"]) == 2
    assert manifest["training"]["params"]["churn_horizon_hours"] == 72.0
    alignment = manifest["metrics"]["segmentation"]["alignment"]
    assert alignment["matched"], "no segment matched the parent's"
    parent_names = {s["id"]: s["name"] for s in parent["segments"]}
    for seg in manifest["segments"]:
        if str(seg["id"]) in alignment["matched"]:
            assert seg["name"] == parent_names[seg["id"]]


def test_train_refuses_history_without_valid_events(tmp_path, caplog):
    export = tmp_path / "empty.avro"
    write_avro_file(export, [])
    assert main(["train", "--from-avro", str(export), "--model-dir", str(tmp_path / "models")]) == 1
    assert "no valid events to train on" in caplog.text
