"""Config precedence (defaults < env < overrides) and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.cli import build_parser, config_from_args
from jobs.config import ConfigError, OnrampConfig, load_config


def test_defaults_are_valid():
    cfg = OnrampConfig()
    assert cfg.delivery == "at-least-once" and cfg.execution_mode == "thread"


def test_env_then_overrides():
    env = {"ONRAMP_PARALLELISM": "2", "ONRAMP_DELIVERY": "exactly-once", "ONRAMP_KAFKA_PORT": "19092"}
    cfg = load_config({"parallelism": "3"}, environ=env)
    assert cfg.parallelism == 3 and cfg.delivery == "exactly-once"
    assert cfg.bootstrap_servers == "localhost:19092"  # follows the port unless set


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"delivery": "twice"}, "delivery must be one of"),
        ({"parallelism": "0"}, "parallelism must be >= 1"),
        ({"kafka_port": "70000"}, "kafka_port must be a TCP port"),
        ({"parallelism": "many"}, "cannot read 'many'"),
        ({"no_such_setting": "1"}, "unknown setting"),
        ({"churn_auc_margin": "5"}, "churn_auc_margin must be between -1 and 1"),
    ],
)
def test_bad_values_fail_clearly(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides, environ={})


def test_cli_flags_and_pass_through():
    args = build_parser().parse_args(
        ["status", "--parallelism", "2", "--set", "kafka.security.protocol=SSL", "--set", "bundle_size=50",
         "--state-dir", "/tmp/x"]
    )
    cfg = config_from_args(args)
    assert cfg.parallelism == 2 and cfg.bundle_size == 50
    assert cfg.extra["kafka.security.protocol"] == "SSL"
    assert cfg.state_dir == Path("/tmp/x") and cfg.model_dir == Path("/tmp/x/models")


def test_config_survives_the_json_trip_to_the_job():
    from jobs.personalize import config_from_json
    import json

    cfg = load_config({"parallelism": "2", "state_dir": "/tmp/y"}, environ={})
    assert config_from_json(json.dumps(cfg.as_dict())) == cfg


def test_process_mode_with_ttl_warns_why_it_is_slow():
    """Process mode with TTL state commits every write synchronously (~1,000 events/s measured): the job says so
    at start instead of leaving users to profile it; thread mode, or no TTL, needs no warning."""
    from jobs.personalize import process_mode_warning

    assert process_mode_warning(load_config(environ={})) is None
    assert "synchronously" in process_mode_warning(load_config(overrides={"execution_mode": "process"}, environ={}))
    assert process_mode_warning(load_config(overrides={"execution_mode": "process", "state_ttl_hours": 0},
                                            environ={})) is None


@pytest.mark.parametrize("name, raw", [("kafka_ssl_check_hostname", "ture"), ("gc_freeze", "maybe"),
                                       ("state_ttl_hours", "nan"), ("churn_horizon_hours", "inf")])
def test_a_mistyped_switch_or_a_non_finite_number_is_refused_not_guessed(name, raw):
    """A typo must not turn hostname checking off, and nan would pass every range check (comparisons are false)."""
    with pytest.raises(ConfigError, match=f"ONRAMP_{name.upper()}: cannot read"):
        load_config(environ={f"ONRAMP_{name.upper()}": raw})
    assert load_config(environ={"ONRAMP_GC_FREEZE": "off"}).gc_freeze is False


def test_two_local_services_on_one_port_are_refused():
    with pytest.raises(ConfigError, match="kafka_port and flink_rest_port are both 9092"):
        load_config(overrides={"flink_rest_port": 9092}, environ={})
