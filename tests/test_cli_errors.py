"""Mistakes a user makes on the command line end in one line saying what to do, quickly, not in a traceback,
a 30 s hang or a silently different action."""

from __future__ import annotations

import socket
import time

import pytest

from jobs.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [
    ["consume", "--max", "1"],
    ["produce", "--max-events", "1"],
    ["privacy", "audit", "--user", "alice"],
    ["rules", "backtest", "rules/onboarding.yaml", "--events", "exports/typo.avro"],
    ["train", "--from-topic", "onboarding-events", "--days", "1"],
])
def test_commands_that_need_the_broker_say_at_once_that_nothing_listens(command, caplog, tmp_path):
    """kafka-python would retry for ~30 s, logging every attempt, before failing."""
    key = tmp_path / "key"
    key.write_text("k" * 40)
    started = time.monotonic()
    code = main(command + ["--bootstrap-servers", f"localhost:{_closed_port()}", "--set",
                           f"pseudonym_key_file={key}", "--model-dir", str(tmp_path / "models")])
    assert code == 1 and time.monotonic() - started < 10
    assert "nothing accepts connections at localhost:" in caplog.text and "onramp up" in caplog.text
    if "backtest" in command:  # a typo'd file name is read as a topic name: say so
        assert "'exports/typo.avro' is neither a file nor a directory" in caplog.text


def test_train_refuses_a_window_without_a_topic(caplog):
    """`train --days 30` without --from-topic would train on synthetic data and publish it: refuse instead."""
    assert main(["train", "--days", "30"]) == 2
    assert "--days applies only with --from-topic" in caplog.text


@pytest.mark.parametrize("argv, verbose", [
    (["rules", "lint", "-v", "x.yaml"], True),
    (["-v", "rules", "lint", "x.yaml"], True),
    (["rules", "lint", "x.yaml"], False),
    (["models", "list", "--verbose"], True),
])
def test_verbose_works_before_and_after_the_command(argv, verbose):
    from jobs.cli import build_parser

    assert build_parser().parse_args(argv).verbose is verbose


def test_a_mistyped_environment_variable_is_pointed_out(monkeypatch, caplog):
    """A mistyped --set key is refused; the environment is shared with other tools, so a near miss is warned."""
    from jobs.config import misspelled_env_vars

    assert misspelled_env_vars({"ONRAMP_PARALELISM": "4", "ONRAMP_PSEUDONYM_KEY": "k", "ONRAMP_IMAGE": "x",
                                "ONRAMP_PARALLELISM": "2"}) == [
        "ONRAMP_PARALELISM is not an Onramp setting and is ignored; did you mean ONRAMP_PARALLELISM?"]
    monkeypatch.setenv("ONRAMP_STATE_TTL_HOUR", "1")
    assert main(["rules", "lint"]) == 0
    assert "did you mean ONRAMP_STATE_TTL_HOURS?" in caplog.text


def test_an_unknown_setting_gets_a_suggestion_not_a_list_of_seventy_names(caplog):
    assert main(["rules", "lint", "--set", "paralelism=2"]) == 2
    assert "unknown setting 'paralelism'; did you mean parallelism?" in caplog.text
    assert "extra" not in caplog.text
