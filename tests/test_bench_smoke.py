"""`onramp bench --quick` machinery with tiny sizes on the real services: counts, not timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.bench import BenchSizes, run_bench, summary_table

pytestmark = pytest.mark.e2e


def test_bench_runs_and_accounts_for_every_event(live_services):
    sizes = BenchSizes(rate=200.0, duration_s=2.0, backlog=400, stage_events=300, exactly_once_duration_s=2.0,
                       warmup_s=1.0, jit_warmup_events=100)
    result = run_bench(live_services, sizes)
    for name in ("full", "bare"):
        run = result[name]
        assert run["events"] == run["decisions"] == run["unique_decisions"] == 400
        assert run["throughput_eps"] > 0
        assert set(run["latency_ms"]) == {"p50", "p95", "p99", "max"}
        # 200 warm-up events are decided and counted too; only the 400 after them are timed
        assert run["latency_run"]["decisions"] == run["latency_run"]["events"] == 600
        assert run["latency_run"]["measured_events"] == 400
    assert result["exactly_once"]["decisions"] == result["exactly_once"]["events"] == 400
    assert result["counts_ok"] is True
    assert result["jit_warmup"]["decisions"] == result["jit_warmup"]["events"] == 100
    assert result["throughput_ratio"] > 0
    assert {"decode_validate", "inference", "rules", "encode", "total"} <= set(result["stages_us"])
    assert result["machine"]["execution_mode"] == "thread"
    # The four jobs after the first left little in the TaskManager's metaspace: on a fresh TaskManager 23-26 MB of
    # classes they load for the first time (sinks, exactly-once), on a used one under 1 MB. When each job loaded
    # its own Kafka connector, each left ~16 MB more, and the 17th job on a TaskManager failed
    # (OutOfMemoryError: Metaspace).
    metaspace = result["machine"]["taskmanager_metaspace_mb"]
    assert metaspace["after_last_job"] - metaspace["after_first_job"] < 40, metaspace
    assert "throughput full/bare" in summary_table(result)
    # the run's topics are gone: a broker keeping every run's topics slows the next runs
    from jobs.kafka_admin import admin_client

    with admin_client(live_services.bootstrap_servers, cfg=live_services) as admin:
        assert not [t for t in admin.list_topics() if t.startswith("bench-")]
    # ...and so are its jobs and checkpoints: none left running, each named apart from the user's job (which
    # `onramp submit/stop/status` find by name), and no checkpoint of theirs in the user's checkpoint_dir, where
    # `submit --from-checkpoint latest` would have picked the newest one up
    from urllib.parse import urlparse

    from jobs import flink_jobs

    bench_jobs = [j for j in flink_jobs.list_jobs(live_services) if j["name"].startswith("onramp-bench-")]
    assert len(bench_jobs) >= 6 and not [j for j in bench_jobs if j["state"] not in ("FINISHED", "CANCELED")]
    user_checkpoints = Path(urlparse(live_services.checkpoint_uri).path)
    assert not [j for j in bench_jobs if (user_checkpoints / j["jid"]).exists()]
    assert not list((live_services.state_dir / "bench-checkpoints").glob("*/*"))
