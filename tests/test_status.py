"""`onramp status`: the lag and checkpoint arithmetic and the terminal view (no services), then the real thing on
the e2e cluster: submit the job, send events, and read state, checkpoints, throughput, lag and versions back."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from jobs.job_status import (
    Checkpoints,
    JobReport,
    PartitionLag,
    StatusReport,
    VertexRate,
    aggregated_metric,
    checkpoint_summary,
    format_status,
    partition_lag,
    pick_jobs,
    rules_version_of,
    source_vertex_ids,
    total_lag,
    uptime_seconds,
)

NOW = 1_790_000_000_000


def test_lag_is_end_minus_committed_per_partition():
    lags = partition_lag({1: 50, 0: 100, 2: 7}, {0: 90, 1: 50, 2: 0})
    assert [(p.partition, p.end_offset, p.committed, p.lag) for p in lags] == [(0, 100, 90, 10), (1, 50, 50, 0),
                                                                               (2, 7, 0, 7)]
    assert total_lag(lags) == 17


def test_partition_without_a_commit_has_unknown_lag_and_no_total():
    lags = partition_lag({0: 10, 1: 20}, {0: 4})
    assert lags[1] == PartitionLag(1, 20, None, None)
    assert total_lag(lags) is None  # a partial sum would understate the backlog
    assert partition_lag({0: 10}, {0: -1})[0].lag is None  # Kafka's "no offset" marker


def test_committed_past_the_end_counts_as_no_lag():
    assert partition_lag({0: 5}, {0: 9})[0].lag == 0


def test_checkpoint_summary_takes_counts_and_the_latest_completed():
    stats = {
        "counts": {"restored": 0, "total": 12, "in_progress": 1, "completed": 10, "failed": 1},
        "latest": {"completed": {"id": 11, "latest_ack_timestamp": NOW - 4_000, "end_to_end_duration": 35,
                                 "checkpointed_size": 2048, "external_path": "file:/tmp/cp/chk-11"}},
    }
    cp = checkpoint_summary(stats, NOW)
    assert (cp.completed, cp.failed, cp.in_progress, cp.last_id, cp.last_age_s, cp.last_duration_ms,
            cp.last_size_bytes) == (10, 1, 1, 11, 4.0, 35, 2048)
    none_yet = checkpoint_summary({"counts": {"completed": 0}, "latest": {"completed": None}}, NOW)
    assert none_yet.last_id is None and none_yet.last_age_s is None


def test_uptime_of_running_and_finished_jobs():
    assert uptime_seconds({"start-time": NOW - 90_500, "end-time": -1}, NOW) == 90.5
    assert uptime_seconds({"start-time": NOW - 90_000, "end-time": NOW - 30_000}, NOW) == 60.0
    assert uptime_seconds({"start-time": -1}, NOW) is None


def test_metrics_and_plan_helpers():
    answer = [{"id": "numRecordsOutPerSecond", "min": 1.0, "max": 2.0, "avg": 1.5, "sum": 3.0}]
    assert aggregated_metric(answer, "numRecordsOutPerSecond") == 3.0
    assert aggregated_metric(answer, "numRecordsInPerSecond") is None
    plan = {"nodes": [{"id": "a"}, {"id": "b", "inputs": [{"id": "a"}]}]}
    assert source_vertex_ids(plan) == {"a"}


def test_pick_jobs_prefers_the_running_one_then_the_latest_run():
    overview = [
        {"jid": "old", "name": "onramp-personalize", "state": "CANCELED", "start-time": 1},
        {"jid": "new", "name": "onramp-personalize", "state": "RUNNING", "start-time": 2},
        {"jid": "other", "name": "something-else", "state": "RUNNING", "start-time": 3},
    ]
    assert pick_jobs(overview, "onramp-personalize") == ["new"]
    assert pick_jobs(overview[:1], "onramp-personalize") == ["old"]
    assert pick_jobs(overview, "onramp-personalize", job_id="x") == ["x"]
    assert pick_jobs([], "onramp-personalize") == []


def test_rules_version_from_the_rules_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text('ruleset: x\nversion: "2026.1"\n')
    assert rules_version_of(str(path)) == "2026.1"
    assert rules_version_of("builtin") == "builtin-1"
    assert rules_version_of(str(tmp_path / "missing.yaml")) is None


def _report(**changes) -> StatusReport:
    job = JobReport(
        id="a" * 32, name="onramp-personalize", state="RUNNING", start_time_ms=NOW - 3_725_000, uptime_s=3725.0,
        restarts=0, checkpoints=Checkpoints(10, 0, 0, 0, 11, NOW - 4000, 4.0, 35, 2048),
        vertices=[VertexRate("Source: onboarding_events", 2, None, 120.0), VertexRate("personalize", 2, 120.0, 119.5)],
        events_in_per_s=120.0, pending_records=3, in_job_versions={"model_version": "m-1"},
    )
    base = StatusReport(
        flink_rest_url="http://localhost:8081", bootstrap_servers="localhost:9092", input_topic="onboarding-events",
        group_id="onramp-personalize", jobs=[job], lag=partition_lag({0: 100, 1: 50}, {0: 90, 1: 50}), total_lag=10,
        versions={"model": "m-1", "model_dir": "/m", "rules": "2026.1", "rules_file": "/r.yaml"},
    )
    return dataclasses.replace(base, **changes)


def test_terminal_view_shows_every_part():
    text = format_status(_report())
    for expected in ("RUNNING", "1h 2m 5s", "restarts 0", "last #11 4s ago, took 35 ms, 2.0 KiB", "completed 10",
                     "events in 120.0/s", "source pending records 3", "personalize", "total 10",
                     "model m-1", "rules 2026.1", "model_version m-1"):
        assert expected in text, expected
    assert "PARTITION" in text and "COMMITTED" in text


def test_terminal_view_says_unknown_instead_of_guessing():
    text = format_status(_report(jobs=[], lag=None, total_lag=None, problems=["Flink REST API not reachable"]))
    assert "no Onramp job" in text and "unknown (Kafka not reachable)" in text and "problem  Flink" in text
    partial = format_status(_report(lag=partition_lag({0: 5, 1: 5}, {0: 5}), total_lag=None))
    assert "total unknown" in partial and "unknown" in partial.splitlines()[-2]


def test_json_round_trips():
    data = json.loads(json.dumps(_report().as_dict()))
    assert data["jobs"][0]["checkpoints"]["last_id"] == 11
    assert data["lag"][0] == {"partition": 0, "end_offset": 100, "committed": 90, "lag": 10}


# --------------------------------------------------------------------------------------------------------------
# On the real services
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_status_of_a_running_job(live_services, capsys):
    from jobs import flink_jobs
    from jobs.cli import main as onramp, submit_job
    from jobs.event_stream import encode_events, generated_events
    from jobs.kafka_io import make_producer, produce, read_records
    from models.registry import current_version

    cfg = dataclasses.replace(
        live_services, checkpoint_interval_ms=500, topic_partitions=2, parallelism=2,
        input_topic="status-events", decisions_topic="status-decisions", dead_letter_topic="status-dead-letters",
        audit_topic="status-audit", control_topic="status-control", group_id="status",
    )
    events = generated_events(20, seed=21)
    job_id = submit_job(cfg)
    flags = ["--bootstrap-servers", cfg.bootstrap_servers, "--flink-rest-url", cfg.flink_rest_url,
             "--state-dir", str(cfg.state_dir), "--model-dir", str(cfg.model_dir),
             "--set", "input_topic=status-events", "--set", "group_id=status", "--json"]
    try:
        producer = make_producer(cfg)
        produce(producer, cfg.input_topic, encode_events(events))
        producer.close()
        assert len(list(read_records(cfg, cfg.decisions_topic, max_records=len(events), timeout_s=90))) == len(events)
        deadline = time.monotonic() + 60
        while True:  # the group's offsets reach the end at the first checkpoint after the last event
            capsys.readouterr()
            assert onramp(["status", *flags]) == 0
            status = json.loads(capsys.readouterr().out)
            if status["total_lag"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        flink_jobs.cancel(cfg, job_id)

    assert status["problems"] == []
    job = status["jobs"][0]
    assert (job["id"], job["name"], job["state"]) == (job_id, "onramp-personalize", "RUNNING")
    assert job["uptime_s"] > 0 and job["restarts"] == 0
    assert job["checkpoints"]["completed"] >= 1 and job["checkpoints"]["last_id"] is not None
    assert job["events_in_per_s"] is not None and job["vertices"]
    assert {v["parallelism"] for v in job["vertices"]} == {2}
    assert [p["partition"] for p in status["lag"]] == [0, 1]
    assert sum(p["end_offset"] for p in status["lag"]) == len(events)
    assert status["total_lag"] == 0, status["lag"]
    assert status["versions"]["model"] == current_version(cfg.model_dir)
    assert status["versions"]["rules"]
    # The terminal view of the same (now cancelled) job still reads.
    assert onramp(["status", *flags[:-1], "--job-id", job_id]) == 0
    assert job_id in capsys.readouterr().out


def test_status_with_nothing_reachable_says_so_and_exits_0(tmp_path, capsys):
    from jobs.cli import main as onramp

    args = ["status", "--json", "--flink-rest-url", "http://127.0.0.1:9", "--bootstrap-servers", "127.0.0.1:9",
            "--state-dir", str(tmp_path), "--model-dir", str(tmp_path / "models")]
    assert onramp(args) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["jobs"] == [] and status["lag"] is None and status["total_lag"] is None
    assert any("Flink REST API" in p for p in status["problems"])
    assert any("Kafka at 127.0.0.1:9" in p for p in status["problems"])
    assert status["versions"]["model"] is None and status["services"]["flink"]["running"] is False
