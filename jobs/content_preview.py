"""``rules preview --user-profile FILE``: what a given user would see next, rendered from the content templates.

The file is JSON, either the onboarding events of one user (replayed through the same
:func:`udfs.profile_state.apply_event` and :class:`udfs.personalizer.Personalizer` the stream runs, so the
preview cannot drift from production) or a ready decision-like object ``{step_id, content_variant,
template_vars}`` to try copy without events. Pure apart from reading the files; the CLI only prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from jobs.config import OnrampConfig
from udfs.content_templates import DEFAULT_TEMPLATE_DIR, DEFAULT_VARIANT, TemplateCatalog
from udfs.personalizer import Personalizer, RuleSet, Scorer
from udfs.profile_state import Profile

DEFAULT_HALF_LIFE_MS: float = OnrampConfig.interest_half_life_hours * 3_600_000.0
REQUIRED_EVENT_FIELDS = ("event_id", "user_id", "event_type", "event_time")
# Decision fields worth showing next to the copy, when the decision has them.
SHOWN_DECISION_FIELDS = ("step_id", "content_variant", "template_vars", "reasons", "personalized", "segment_name",
                         "churn_risk", "model_version", "rules_version")
_EXPECTED = ("a JSON list of one user's onboarding events (avro/onboarding_event.avsc) or an object "
             "{\"step_id\": ..., \"content_variant\": ..., \"template_vars\": {...}}")


class PreviewError(ValueError):
    """The profile file cannot be previewed; the message names the file and what to fix."""


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PreviewError(f"{path}: cannot read the user profile file: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreviewError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); expected {_EXPECTED}") from None


def _checked_events(data: list[Any], path: Path) -> list[dict[str, Any]]:
    """The events in event-time order (the order the keyed state would have folded them in, ties kept)."""
    if not data:
        raise PreviewError(f"{path}: the event list is empty; expected {_EXPECTED}")
    for i, event in enumerate(data):
        if not isinstance(event, dict):
            raise PreviewError(f"{path}: item #{i} is {type(event).__name__}, not an event object; "
                               f"expected {_EXPECTED}")
        missing = [f for f in REQUIRED_EVENT_FIELDS if event.get(f) in (None, "")]
        if missing:
            raise PreviewError(f"{path}: event #{i} lacks {', '.join(missing)}; expected {_EXPECTED}")
        if type(event["event_time"]) is not int:
            raise PreviewError(f"{path}: event #{i} has event_time {event['event_time']!r}; expected epoch millis "
                               f"(an integer)")
    users = sorted({e["user_id"] for e in data})
    if len(users) > 1:
        raise PreviewError(f"{path}: events of {len(users)} users ({', '.join(users[:3])}"
                           f"{', ...' if len(users) > 3 else ''}); a preview replays one user, keep only their events")
    return sorted(data, key=lambda e: e["event_time"])


def _scorer(bundle: Scorer | None, bundle_path: Path | str | None, half_life_ms: float) -> Scorer | None:
    if bundle_path is None:
        return bundle
    if bundle is not None:
        raise ValueError("pass either a loaded bundle or bundle_path, not both")
    from udfs.model_bundle import ModelBundle  # onnxruntime only when a bundle is asked for

    return ModelBundle.load(Path(bundle_path), half_life_hours=half_life_ms / 3_600_000.0)


def decide_from_events(events: list[dict[str, Any]], personalizer: Personalizer) -> dict[str, Any]:
    """The decision answering the last event, after replaying all of them as the personalize operator does
    (``erasure_requested`` drops the profile). ``decided_at`` is the last event time, so previews are stable."""
    profile = Profile()
    for event in events:
        profile = Profile() if event["event_type"] == "erasure_requested" else personalizer.update(profile, event)
    last = events[-1]
    if last["event_type"] == "erasure_requested":
        return personalizer.erased(last, decided_at_ms=last["event_time"])
    return personalizer.decide(profile, last, decided_at_ms=last["event_time"])


def _checked_decision(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    step_id = data.get("step_id")
    if not isinstance(step_id, str) or not step_id:
        raise PreviewError(f"{path}: the object has no step_id; expected {_EXPECTED}")
    variant = data.get("content_variant", DEFAULT_VARIANT)
    variables = data.get("template_vars", {})
    if not isinstance(variant, str) or not variant:
        raise PreviewError(f"{path}: content_variant must be a non-empty string, got {variant!r}")
    if not isinstance(variables, dict):
        raise PreviewError(f"{path}: template_vars must be an object of name -> value, got {type(variables).__name__}")
    return {**data, "content_variant": variant, "template_vars": variables}


def preview(
    user_profile_path: Path | str,
    catalog_dir: Path | str = DEFAULT_TEMPLATE_DIR,
    *,
    bundle: Scorer | None = None,
    bundle_path: Path | str | None = None,
    rules: RuleSet | None = None,
    half_life_ms: float = DEFAULT_HALF_LIFE_MS,
) -> dict[str, Any]:
    """The decision for the user in ``user_profile_path`` and its rendered copy (JSON-serializable).

    The model: a loaded ``bundle``, or a bundle directory ``bundle_path`` (loaded and checked against
    ``half_life_ms``); neither previews the default flow (what a user without consent, or a job without a
    model, gets). ``rules``: a compiled rule set, None for the built-in rules. Both only matter for events.
    Keys: ``source`` ("events" or "decision"), ``user_id``, ``events_replayed``, ``decision`` (the fields of
    :data:`SHOWN_DECISION_FIELDS` it has) and ``content`` (variant rendered, template path, text, missing
    variables).
    """
    path = Path(user_profile_path)
    data = _read_json(path)
    if isinstance(data, list):
        events = _checked_events(data, path)
        personalizer = Personalizer(_scorer(bundle, bundle_path, half_life_ms), half_life_ms, rules=rules)
        decision = decide_from_events(events, personalizer)
        source, user_id, replayed = "events", events[0]["user_id"], len(events)
    elif isinstance(data, dict):
        decision = _checked_decision(data, path)
        source, user_id, replayed = "decision", decision.get("user_id"), 0
    else:
        raise PreviewError(f"{path}: got a JSON {type(data).__name__}; expected {_EXPECTED}")
    content = TemplateCatalog.load(catalog_dir).render(
        decision["step_id"], decision["content_variant"], decision["template_vars"])
    return {
        "source": source,
        "user_id": user_id,
        "events_replayed": replayed,
        "decision": {k: decision[k] for k in SHOWN_DECISION_FIELDS if k in decision},
        "content": {
            "variant": content.variant,
            "template_path": content.template_path,
            "text": content.text,
            "missing_variables": list(content.missing_variables),
        },
    }


def format_preview(result: Mapping[str, Any]) -> str:
    """``preview()``'s result for a terminal: the decision in aligned ``key: value`` lines, then the copy."""
    decision, content = result["decision"], result["content"]
    variables = decision.get("template_vars") or {}
    variant = decision["content_variant"]
    if content["variant"] != variant:
        variant += f" (no template of its own: rendered {content['variant']})"
    who = result.get("user_id") or "(no user)"
    lines = [("user", who + (f", {result['events_replayed']} events replayed" if result["events_replayed"] else ""))]
    lines += [("step", decision["step_id"]), ("variant", variant),
              ("vars", ", ".join(f"{k}={v}" for k, v in sorted(variables.items())) or "(none)")]
    if "segment_name" in decision:
        lines.append(("segment", f"{decision['segment_name']} (churn risk {decision.get('churn_risk', 0.0):.2f}, "
                                 f"model {decision.get('model_version', '?')})"))
    lines += [("reason", reason) for reason in decision.get("reasons", ())]
    lines.append(("template", content["template_path"]))
    if content["missing_variables"]:
        lines.append(("warning", f"not provided, rendered empty: {', '.join(content['missing_variables'])}"))
    width = max(len(key) for key, _value in lines) + 2
    head = [f"{key + ':':<{width}}{value}" for key, value in lines]
    body = ["    " + line for line in content["text"].splitlines()] or ["    (empty)"]
    return "\n".join(head + [""] + body)
