"""Change management for rule sets: `onramp rules diff` and `onramp rules backtest`.

``diff`` says what changed between two rule set files, rule by rule (added, removed, changed: which keys), plus
the version, changelog and default. ``backtest`` replays historical events through the job's own profile,
feature, model and decision code once per rule set and counts, by segment, the decisions and the users whose
latest next step would differ — the number to look at before shipping a change.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml


@dataclass
class RuleSetDiff:
    old_version: str
    new_version: str
    changelog: str
    added: list[str] = field(default_factory=list)  # "table/rule-id"
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)  # "table/rule-id" -> changed keys
    default_changed: list[str] = field(default_factory=list)  # tables whose default changed ("" = top-level)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.default_changed)

    def lines(self) -> list[str]:
        out = [f"rule set {self.old_version} -> {self.new_version}", f"changelog: {self.changelog or '(none)'}"]
        out += [f"+ {r}" for r in self.added]
        out += [f"- {r}" for r in self.removed]
        out += [f"~ {r}: {', '.join(keys)}" for r, keys in self.changed.items()]
        out += [f"~ default of {t or 'the rule set'}" for t in self.default_changed]
        if self.empty:
            out.append("no rule changed")
        return out


def _rules_by_key(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rules = {}
    for table, spec in (doc.get("tables") or {}).items():
        for rule in (spec or {}).get("rules") or []:
            rules[f"{table}/{rule.get('id')}"] = rule
    return rules


def diff_documents(old: dict[str, Any], new: dict[str, Any]) -> RuleSetDiff:
    """Rule-by-rule difference of two parsed rule set documents (plain YAML mappings)."""
    result = RuleSetDiff(str(old.get("version")), str(new.get("version")), str(new.get("changelog") or ""))
    a, b = _rules_by_key(old), _rules_by_key(new)
    result.added = sorted(set(b) - set(a))
    result.removed = sorted(set(a) - set(b))
    for key in sorted(set(a) & set(b)):
        keys = sorted(k for k in set(a[key]) | set(b[key]) if a[key].get(k) != b[key].get(k))
        if keys:
            result.changed[key] = keys
    if old.get("default") != new.get("default"):
        result.default_changed.append("")
    old_tables, new_tables = old.get("tables") or {}, new.get("tables") or {}
    for table in sorted(set(old_tables) & set(new_tables)):
        if (old_tables[table] or {}).get("default") != (new_tables[table] or {}).get("default"):
            result.default_changed.append(table)
    return result


def _rule_document(path: Path) -> dict[str, Any]:
    """A rule file's YAML document; unreadable files and YAML errors as a RuleSetError naming file and line."""
    from udfs.rules.model import Finding, RuleSetError, read_rule_text, yaml_error_finding

    text = read_rule_text(path)
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RuleSetError([yaml_error_finding(exc, str(path))]) from None
    if not isinstance(doc, dict):
        raise RuleSetError([Finding(str(path), 1, "yaml", "expected a rule set (a mapping: ruleset, version, ...)")])
    return doc


def diff_files(old: Path, new: Path) -> RuleSetDiff:
    return diff_documents(_rule_document(Path(old)), _rule_document(Path(new)))


@dataclass
class BacktestResult:
    old_version: str
    new_version: str
    events: int
    users: int
    decisions_changed: int
    users_changed: int  # users whose latest next step differs
    by_segment: dict[str, dict[str, int]]  # segment -> {"users", "users_changed", "decisions", "decisions_changed"}
    step_changes: dict[str, int]  # "old_step -> new_step" -> decisions

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def backtest(events: Iterable[dict[str, Any]], old_rules: Any, new_rules: Any, scorer: Any,
             half_life_ms: float) -> BacktestResult:
    """Replay ``events`` (per user, in event-time order) and decide each with both rule sets.

    The profile is folded once per event with the job's ``fold_event``; both decisions see the same profile and
    scores, so every difference comes from the rules. Users are counted under the segment of their latest event.
    """
    from udfs.personalizer import Personalizer
    from udfs.profile_state import Profile

    old = Personalizer(scorer, half_life_ms, rules=old_rules)
    new = Personalizer(scorer, half_life_ms, rules=new_rules)
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        by_user[event["user_id"]].append(event)
    segments: dict[str, Counter] = defaultdict(Counter)
    step_changes: Counter = Counter()
    n_events = decisions_changed = users_changed = 0
    for user_events in by_user.values():
        user_events.sort(key=lambda e: e["event_time"])
        profile = Profile()
        last: tuple[dict[str, Any], dict[str, Any]] | None = None
        segment_counts: Counter = Counter()
        for event in user_events:
            if event["event_type"] == "erasure_requested":
                profile = Profile()
                continue
            if not old.fold(profile, event):  # a duplicate: the job answers it with nothing
                continue
            a, b = old.decide(profile, event, decided_at_ms=0), new.decide(profile, event, decided_at_ms=0)
            n_events += 1
            segment_counts["decisions"] += 1
            if (a["step_id"], a["content_variant"]) != (b["step_id"], b["content_variant"]):
                decisions_changed += 1
                segment_counts["decisions_changed"] += 1
                step_changes[f"{a['step_id']} -> {b['step_id']}"] += 1
            last = (a, b)
        if last is None:
            continue
        seg = segments[last[1]["segment_name"]]
        seg.update(segment_counts)
        seg["users"] += 1
        if last[0]["step_id"] != last[1]["step_id"]:
            users_changed += 1
            seg["users_changed"] += 1
    keys = ("users", "users_changed", "decisions", "decisions_changed")
    return BacktestResult(
        old_version=old.rules_version, new_version=new.rules_version, events=n_events, users=len(by_user),
        decisions_changed=decisions_changed, users_changed=users_changed,
        by_segment={s: {k: c[k] for k in keys} for s, c in sorted(segments.items())},
        step_changes=dict(step_changes.most_common()),
    )


def format_backtest(result: BacktestResult) -> str:
    lines = [f"backtest {result.old_version} -> {result.new_version}: {result.events} events of {result.users} users",
             f"decisions that change: {result.decisions_changed}; users whose latest next step changes: "
             f"{result.users_changed}", "", f"{'segment':28s} {'users':>7s} {'changed':>8s} {'decisions':>10s} {'changed':>8s}"]
    for seg, c in result.by_segment.items():
        lines.append(f"{seg:28s} {c['users']:7d} {c['users_changed']:8d} {c['decisions']:10d} {c['decisions_changed']:8d}")
    if result.step_changes:
        lines += ["", "most frequent changes:"] + [f"  {k}: {v}" for k, v in list(result.step_changes.items())[:10]]
    return "\n".join(lines)


def load_events(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Events for a backtest from Avro container files (the same loader training uses)."""
    from models.history import read_avro_files

    return read_avro_files(list(paths)).events
