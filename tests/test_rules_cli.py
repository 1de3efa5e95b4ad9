"""`onramp rules lint|diff|backtest|preview|publish` on the shipped rule set and edited copies."""

from __future__ import annotations

import json
import shutil

import yaml

from jobs.cli import main
from jobs.config import REPO_ROOT
from jobs.rules_tools import backtest, diff_documents
from models.generator import generate
from models.history import write_avro_file
from udfs.model_bundle import load_current
from udfs.rules.compiler import compile_rules_text

SHIPPED = REPO_ROOT / "rules" / "onboarding.yaml"


def _edited(tmp_path, name: str, change) -> str:
    doc = yaml.safe_load(SHIPPED.read_text())
    change(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def _without_concierge(doc):
    doc["version"] = "test-2"
    doc["changelog"] = "no concierge calls"
    doc["tables"]["main"]["rules"] = [r for r in doc["tables"]["main"]["rules"] if r["then"].get("step") != "concierge_call"]


def test_lint_passes_the_shipped_rules_and_fails_broken_ones(tmp_path, capsys):
    assert main(["rules", "lint", str(SHIPPED)]) == 0
    assert "ok" in capsys.readouterr().out
    dead = _edited(tmp_path, "dead.yaml", lambda d: d["tables"]["main"]["rules"].insert(
        0, {"id": "catch-all", "description": "shadows everything", "priority": 1000, "then": {"step": "welcome_tour"}}))
    assert main(["rules", "lint", dead]) == 1
    out = capsys.readouterr().out
    assert "error: unreachable" in out and f"{dead}:" in out
    unknown = _edited(tmp_path, "unknown.yaml", lambda d: d["tables"]["main"]["rules"][0].update(
        when={"churn_riks": {"gt": 0.5}}))
    assert main(["rules", "lint", unknown]) == 1
    assert "churn_riks" in capsys.readouterr().out


def test_diff_names_removed_rules_and_the_changelog(tmp_path, capsys):
    new = _edited(tmp_path, "new.yaml", _without_concierge)
    assert main(["rules", "diff", str(SHIPPED), new]) == 0
    out = capsys.readouterr().out
    assert "no concierge calls" in out and "\n- main/" in out
    same = diff_documents(yaml.safe_load(SHIPPED.read_text()), yaml.safe_load(SHIPPED.read_text()))
    assert same.empty


def test_backtest_counts_changed_decisions_by_segment(tmp_path, trained_model_dir, capsys):
    events, _ = generate(200, seed=4)
    for e in events:  # everyone consents, so the rules decide
        e.setdefault("consent", {"personalization": True, "analytics": True, "marketing": False})
    history = tmp_path / "history.avro"
    write_avro_file(history, events)
    new = _edited(tmp_path, "new.yaml", _without_concierge)

    assert main(["rules", "backtest", new, "--events", str(history), "--against", str(SHIPPED),
                 "--model-dir", str(trained_model_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_version"] == "test-2" and result["events"] > 0
    assert sum(s["users"] for s in result["by_segment"].values()) == result["users"]
    assert sum(s["decisions_changed"] for s in result["by_segment"].values()) == result["decisions_changed"]
    assert all(k.startswith("concierge_call -> ") for k in result["step_changes"])

    # the same rule set on both sides changes nothing
    rules = compile_rules_text(SHIPPED.read_text(), str(SHIPPED))
    same = backtest(events, rules, rules, load_current(trained_model_dir), 72 * 3_600_000.0)
    assert same.decisions_changed == same.users_changed == 0


def test_preview_renders_what_a_user_would_see(tmp_path, trained_model_dir, capsys):
    events, _ = generate(3, seed=1)
    user = events[0]["user_id"]
    profile = tmp_path / "user.json"
    profile.write_text(json.dumps([e for e in events if e["user_id"] == user]))
    assert main(["rules", "preview", "--user-profile", str(profile), "--model-dir", str(trained_model_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decision"]["rules_version"] == yaml.safe_load(SHIPPED.read_text())["version"]
    assert result["content"]["text"].strip()


def test_publish_refuses_a_file_with_errors_and_replaces_atomically(tmp_path):
    target = tmp_path / "live.yaml"
    shutil.copy(SHIPPED, target)
    broken = tmp_path / "broken.yaml"
    broken.write_text("ruleset: x\nversion: '1'\n")
    assert main(["rules", "publish", str(broken), "--set", f"rules_file={target}"]) == 1
    assert target.read_text() == SHIPPED.read_text()
    new = _edited(tmp_path, "new.yaml", _without_concierge)
    assert main(["rules", "publish", new, "--set", f"rules_file={target}"]) == 0
    assert yaml.safe_load(target.read_text())["version"] == "test-2"


def test_rule_commands_name_an_unreadable_or_broken_file_instead_of_a_traceback(tmp_path, capsys, caplog):
    """A typo'd path, a directory, a binary file or broken YAML: one line naming the file (and the line), exit 1."""
    shipped = str(REPO_ROOT / "rules" / "onboarding.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    broken = tmp_path / "broken.yaml"
    broken.write_text("ruleset: x\n  bad: [\n")
    assert main(["rules", "lint", str(tmp_path / "nope.yaml"), str(tmp_path), str(binary)]) == 1
    out = capsys.readouterr().out
    assert "nope.yaml:0: error: io: cannot read rule file: No such file or directory" in out
    assert "Is a directory" in out and "binary.yaml:0: error: io: not a UTF-8 text file" in out
    assert main(["rules", "diff", shipped, str(broken)]) == 1
    assert "broken.yaml:2: [yaml] not valid YAML" in caplog.text
    assert main(["rules", "diff", shipped, str(tmp_path / "nope.yaml")]) == 1
    assert main(["rules", "publish", str(tmp_path / "nope.yaml")]) == 1
    assert "Traceback" not in caplog.text + capsys.readouterr().err

