"""The per-user outcome row: produced by outcome aggregation (streaming job or batch path), consumed by analysis.

One row per (user, experiment): the arm the user was assigned, when they first saw a decision carrying it, and
what they did afterwards. JSON lines files hold one :func:`outcome_to_dict` object per line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping


@dataclass(frozen=True)
class UserOutcome:
    user_id: str            # pseudonymized or raw, opaque to analysis
    experiment_id: str
    arm: str
    exposed_at_ms: int      # first decision carrying this arm
    completed: bool         # onboarding_completed seen after exposure
    time_to_complete_s: float | None   # signup -> onboarding_completed, None if not completed
    steps_completed: int
    engagement_s: float     # summed session time after exposure
    satisfaction: float | None         # last satisfaction score sent by the app (1..5), None if none
    pre_engagement_s: float # engagement before exposure (CUPED covariate; 0.0 if none)


class OutcomeFileError(ValueError):
    """A JSON lines file of outcomes has a row that is not a UserOutcome."""


_FIELDS = {f.name: f for f in dataclasses.fields(UserOutcome)}
_OPTIONAL = {"time_to_complete_s", "satisfaction"}
_DEFAULTS = {"pre_engagement_s": 0.0}


def outcome_to_dict(outcome: UserOutcome) -> dict[str, Any]:
    return dataclasses.asdict(outcome)


def outcome_from_dict(data: Mapping[str, Any]) -> UserOutcome:
    """A row from a JSON object; missing optional fields are None (pre_engagement_s: 0.0); unknown keys fail."""
    unknown = set(data) - set(_FIELDS)
    if unknown:
        raise OutcomeFileError(f"unknown field(s) {', '.join(sorted(unknown))}; a UserOutcome has {', '.join(_FIELDS)}")
    values: dict[str, Any] = {}
    for name in _FIELDS:
        raw = data.get(name, _DEFAULTS.get(name))
        if raw is None:
            if name in _OPTIONAL:
                values[name] = None
                continue
            raise OutcomeFileError(f"missing field {name!r}")
        try:
            if name in ("user_id", "experiment_id", "arm"):
                values[name] = str(raw)
            elif name in ("exposed_at_ms", "steps_completed"):
                values[name] = int(raw)
            elif name == "completed":
                if not isinstance(raw, bool):
                    raise ValueError("expected true or false")
                values[name] = raw
            else:
                values[name] = float(raw)
        except (TypeError, ValueError) as exc:
            raise OutcomeFileError(f"field {name!r}: cannot read {raw!r}: {exc}") from None
    return UserOutcome(**values)


def read_outcomes_jsonl(path: str | Path) -> list[UserOutcome]:
    """Every row of a JSON lines file (blank lines skipped); errors name the line."""
    path = Path(path)
    rows: list[UserOutcome] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise OutcomeFileError(f"{path}: cannot read outcomes: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(outcome_from_dict(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise OutcomeFileError(f"{path}:{number}: not JSON: {exc.msg}") from None
        except OutcomeFileError as exc:
            raise OutcomeFileError(f"{path}:{number}: {exc}") from None
    return rows


def write_outcomes_jsonl(path: str | Path, outcomes: Iterable[UserOutcome]) -> int:
    count = 0
    with Path(path).open("w", encoding="utf-8") as out:
        for outcome in outcomes:
            out.write(json.dumps(outcome_to_dict(outcome)) + "\n")
            count += 1
    return count


def iter_for_experiment(outcomes: Iterable[UserOutcome], experiment_id: str) -> Iterator[UserOutcome]:
    return (o for o in outcomes if o.experiment_id == experiment_id)
