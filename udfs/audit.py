"""Audit records (avro/audit_record.avsc): what Onramp did for a user and on what basis, with no raw personal data.

One record per decision, per erasure and per state check, on the audit topic (config ``audit_topic``). The user
appears only as the pseudonym the job keys state by; the profile appears only as the *categories* of input a
decision used and, for a state check, the names of the fields that hold a value. An auditor who needs one user's
trail computes that user's pseudonym with the key (``onramp privacy pseudonym``) and filters on ``subject``.
"""

from __future__ import annotations

import time
from typing import Any

from udfs.profile_state import Profile, profile_to_state

DECISION = "decision"
ERASURE = "erasure"
STATE_CHECK = "state_check"

PROGRESS = "onboarding_progress"
BEHAVIOUR = "behaviour"
DEMOGRAPHIC = "demographic"
CONTEXT = "context"
MODEL_SCORES = "model_scores"


def input_categories(profile: Profile, used_profile: bool) -> list[str]:
    """The categories of data a decision on ``profile`` used: the default flow reads onboarding progress only;
    a personalized decision, or one whose user the model scored (an experiment's control arm is scored, for the
    analysis, and then shown the default flow), read the behavioural profile, the allow-listed demographic/context
    fields it holds, and the model's scores of them."""
    if not used_profile:
        return [PROGRESS]
    used = [PROGRESS, BEHAVIOUR]
    if profile.demographic:
        used.append(DEMOGRAPHIC)
    if profile.context:
        used.append(CONTEXT)
    used.append(MODEL_SCORES)
    return used


def _consent(profile: Profile | None) -> dict[str, bool | None]:
    if profile is None:
        return {"personalization": None, "analytics": None, "marketing": None}
    return {"personalization": profile.consent_personalization, "analytics": profile.consent_analytics,
            "marketing": profile.consent_marketing}


def _record(kind: str, audit_id: str, subject: str, key_id: str, model_version: str, rules_version: str,
            recorded_at_ms: int | None, **fields: Any) -> dict[str, Any]:
    return {
        "audit_id": audit_id,
        "kind": kind,
        "subject": subject,
        "pseudonym_key_id": key_id,
        "decision_id": None,
        "event_type": None,
        "event_time": None,
        "input_categories": [],
        "consent": _consent(None),
        "personalized": False,
        "step_id": None,
        "reasons": [],
        "model_version": model_version,
        "rules_version": rules_version,
        "state": None,
        "request_id": None,
        "recorded_at": recorded_at_ms if recorded_at_ms is not None else time.time_ns() // 1_000_000,
        **fields,
    }


def decision_audit(decision: dict[str, Any], event_type: str, profile: Profile, subject: str,
                   key_id: str) -> dict[str, Any]:
    """The audit record of ``decision`` (the record :class:`udfs.personalizer.Personalizer` made for an event of
    ``event_type`` on ``profile``). One per event: built as one dict, not through :func:`_record`'s defaults
    (1.8 -> 1.1 µs); ``tests/test_privacy.py`` checks it has exactly the fields of the others."""
    decision_id = decision["decision_id"]
    return {
        "audit_id": f"{DECISION}:{decision_id}",
        "kind": DECISION,
        "subject": subject,
        "pseudonym_key_id": key_id,
        "decision_id": decision_id,
        "event_type": event_type,
        "event_time": decision["event_time"],
        "input_categories": input_categories(profile, decision["personalized"] or decision["segment_id"] >= 0),
        "consent": {"personalization": profile.consent_personalization, "analytics": profile.consent_analytics,
                    "marketing": profile.consent_marketing},
        "personalized": decision["personalized"],
        "step_id": decision["step_id"],
        "reasons": list(decision["reasons"]),
        "model_version": decision["model_version"],
        "rules_version": decision["rules_version"],
        "state": None,
        "request_id": None,
        "recorded_at": decision["decided_at"],
    }


def erasure_audit(decision: dict[str, Any], subject: str, key_id: str) -> dict[str, Any]:
    """The audit record of an erasure: every piece of keyed state of ``subject`` was deleted; ``decision`` (the
    answer to ``erasure_requested``) is the confirmation sent to the app."""
    return _record(
        ERASURE, f"{ERASURE}:{decision['decision_id']}", subject, key_id, decision["model_version"],
        decision["rules_version"], decision["decided_at"],
        decision_id=decision["decision_id"], event_type="erasure_requested", event_time=decision["event_time"],
        step_id=decision["step_id"], reasons=list(decision["reasons"]),
    )


def _is_state_tuple(value: Any) -> bool:
    """(format, field names, field values): how the profile and identity states are stored."""
    return isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], tuple)


def state_summary(state_values: dict[str, Any]) -> dict[str, Any]:
    """Field names with a value and the serialized size of what is kept, for the state values of one key
    (``{"profile": Profile | None, "identity": stored tuple | None}``); no values."""
    import pickle

    names: list[str] = []
    size = 0
    for name, value in state_values.items():
        if value is None:
            continue
        stored = profile_to_state(value) if isinstance(value, Profile) else value
        if _is_state_tuple(stored):
            names += [f"{name}.{n}" for n, v in zip(stored[1], stored[2]) if v not in (None, 0, "", b"", [], {}, ())]
        else:
            names.append(name)
        size += len(pickle.dumps(stored, protocol=pickle.HIGHEST_PROTOCOL))
    return {"empty": size == 0, "profile_fields": names, "state_bytes": size}


def state_check_audit(request_id: str, subject: str, key_id: str, state_values: dict[str, Any],
                      model_version: str, rules_version: str, recorded_at_ms: int | None = None) -> dict[str, Any]:
    """The answer to a state check: what the job keeps for ``subject`` (see :func:`state_summary`)."""
    profile = state_values.get("profile")
    return _record(
        STATE_CHECK, f"{STATE_CHECK}:{request_id}", subject, key_id, model_version, rules_version, recorded_at_ms,
        request_id=request_id, state=state_summary(state_values),
        consent=_consent(profile if isinstance(profile, Profile) else None),
    )
