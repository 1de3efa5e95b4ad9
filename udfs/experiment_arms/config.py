"""Experiment files -> validated, frozen :class:`ExperimentSet` objects (assignment itself: assignment.py).

Runs on the Flink cluster, so only the standard library, PyYAML and jsonschema are used here.

Loading reports *every* problem (not just the first) as ``file:line: path: message``, where the message says how
to fix it, in one :class:`ExperimentConfigError`:

1. YAML is composed node by node so each key keeps its line (:mod:`udfs.yaml_lines`, shared with the rule-set
   loader); duplicate keys are errors. Unquoted YAML timestamps become ISO strings.
2. The data is validated against ``udfs/experiment_arms/experiments.schema.json``.
3. Checks a schema cannot express: unique layer, experiment and arm ids; weights > 0; start < stop; a layer's
   shares add up to at most 1; one baseline arm per experiment (``control: true`` or ``baseline: <arm id>``);
   crossed factors do not set the same change twice; a change key (rules_version / model_version /
   content_variant) is set by the experiments of one layer only, because a user can be in one experiment of
   every layer at once and two layers setting the same key would contradict each other.

The format is documented in docs/experiments.md; ``rules/experiments.yaml`` is the shipped example.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import jsonschema

from udfs.yaml_lines import (
    JsonPath, LineMap, TYPE_WORDS, YamlProblem, YamlSourceError, compose_with_lines, schema_validator,
    where as _where,
)

SCHEMA_PATH = Path(__file__).resolve().parent / "experiments.schema.json"
BUCKETS = 10_000  # hash buckets per experiment / layer (0.01% granularity)
DEFAULT_SALT = "onramp"
CHANGE_KEYS = ("control", "rules_version", "model_version", "content_variant")
# Fields an eligibility condition may test: the user's context as the job knows it at decision time.
ELIGIBILITY_FIELDS = ("segment_id", "country", "device", "locale", "referral_source", "occupation", "age_band")
NEVER_MS = 2**62  # "no stop": later than any event time


class ExperimentConfigError(ValueError):
    """An experiment file that cannot be used; ``problems`` lists every ``file:line: path: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        count = len(problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in experiments file:\n" + "\n".join(problems))


# ----------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class ArmChanges:
    """What an arm changes for the user's decisions. All None/False: nothing (the regular personalized flow).

    ``control``: use the non-personalized default flow. The other fields pin a rule set version, a model bundle
    version or a content variant instead of the job's current one.
    """

    control: bool = False
    rules_version: str | None = None
    model_version: str | None = None
    content_variant: str | None = None

    def is_empty(self) -> bool:
        """Changes nothing (read per event: attribute tests, not the dataclass ``==``)."""
        return not (self.control or self.rules_version or self.model_version or self.content_variant)


NO_CHANGES = ArmChanges()


@dataclass(frozen=True, slots=True)
class Arm:
    id: str
    weight: float
    changes: ArmChanges
    levels: tuple[tuple[str, str], ...] = ()  # multivariate: (factor, level) per factor, in file order
    description: str = ""


@dataclass(frozen=True, slots=True)
class Experiment:
    id: str
    layer: str
    arms: tuple[Arm, ...]
    baseline: str
    layer_salt: str = ""
    salt: str = DEFAULT_SALT
    description: str = ""
    enabled: bool = True
    start_ms: int = 0
    stop_ms: int = NEVER_MS
    eligible: tuple[tuple[str, frozenset[str]], ...] = ()  # field -> accepted values (as strings); all must hold
    factors: tuple[tuple[str, tuple[str, ...]], ...] = ()  # multivariate: factor -> levels
    layer_range: tuple[int, int] = (0, BUCKETS)  # [lo, hi) of the layer hash this experiment owns
    # arm i takes arm buckets [thresholds[i-1], thresholds[i]); derived from the weights
    thresholds: tuple[int, ...] = field(default=(), repr=False)

    def arm(self, arm_id: str) -> Arm | None:
        for arm in self.arms:  # a handful of arms: a loop beats a dict here, and a generator (per event)
            if arm.id == arm_id:
                return arm
        return None

    def running(self, now_ms: int) -> bool:
        """Enabled and ``start <= now < stop``: new users are assigned and the arms' changes apply."""
        return self.enabled and self.start_ms <= now_ms < self.stop_ms

    def weight_share(self) -> dict[str, float]:
        total = sum(a.weight for a in self.arms)
        return {a.id: a.weight / total for a in self.arms}

    def arm_for_bucket(self, bucket: int) -> str:
        return self.arms[bisect.bisect_right(self.thresholds, bucket)].id


@dataclass(frozen=True, slots=True)
class Layer:
    id: str
    salt: str
    experiments: tuple[str, ...]


@dataclass(frozen=True)
class ExperimentSet:
    """Every experiment of one file. :meth:`assign` and :meth:`changes_for` are the job's entry points
    (implemented in :mod:`udfs.experiment_arms.assignment`)."""

    version: str
    layers: tuple[Layer, ...]
    experiments: Mapping[str, Experiment]
    source: str = "<experiments>"
    changelog: str = ""

    def experiment(self, experiment_id: str) -> Experiment:
        try:
            return self.experiments[experiment_id]
        except KeyError:
            known = ", ".join(self.experiments) or "none"
            raise ExperimentConfigError([f"{self.source}: no experiment {experiment_id!r}; defined: {known}"]) from None

    def pinned_versions(self) -> list[tuple[str, str, str, str]]:
        """``(experiment id, arm id, "rules_version" | "model_version", version)`` for every rule set or model
        bundle an arm of an enabled experiment pins: what a job running this file must ship."""
        return [(exp.id, arm.id, kind, version)
                for exp in self.experiments.values() if exp.enabled for arm in exp.arms
                for kind, version in (("rules_version", arm.changes.rules_version),
                                      ("model_version", arm.changes.model_version)) if version]

    def assign(self, pseudo_user_id: str, context: Mapping[str, Any], now_ms: int,
               sticky: Mapping[str, str]) -> dict[str, str]:
        from udfs.experiment_arms.assignment import assign

        return assign(self, pseudo_user_id, context, now_ms, sticky)

    def changes_for(self, assignments: Mapping[str, str], now_ms: int) -> ArmChanges:
        from udfs.experiment_arms.assignment import changes_for

        return changes_for(self, assignments, now_ms)


EMPTY_SET = ExperimentSet(version="none", layers=(), experiments={}, source="<none>")


# ----------------------------------------------------------------------------------------------- YAML with lines


class _Problems:
    def __init__(self, source: str, lines: LineMap) -> None:
        self.source, self.lines, self.items = source, lines, []  # type: ignore[var-annotated]

    def add(self, path: JsonPath, message: str) -> None:
        self.items.append((self.lines.at(path), f"{self.source}:{self.lines.at(path)}: {_where(path)}: {message}"))

    def raise_if_any(self) -> None:
        if self.items:
            raise ExperimentConfigError([text for _, text in sorted(set(self.items))])


def _plain(value: Any) -> Any:
    """YAML timestamps (unquoted dates) -> ISO strings, so the schema sees text."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _compose(text: str, source: str) -> tuple[Any, LineMap]:
    """:func:`compose_with_lines` (dates as ISO text), its problems worded as ``file:line: path: message``."""
    try:
        return compose_with_lines(text, convert_scalar=_plain)
    except YamlSourceError as exc:
        found = exc.problems
    lines = LineMap()  # outside the except block, so the error does not chain the YamlSourceError
    problems = _Problems(source, lines)
    for problem in found:
        _add_yaml_problem(problem, source, lines, problems)
    problems.raise_if_any()
    raise AssertionError("a YamlSourceError always has a problem")


def _add_yaml_problem(problem: YamlProblem, source: str, lines: LineMap, problems: _Problems) -> None:
    """Word one YAML problem; an empty or unparsable file stops at once, key problems are collected."""
    if problem.kind == "empty":
        raise ExperimentConfigError([f"{source}:1: the file is empty; expected version: and layers: "
                                     "(see rules/experiments.yaml)"])
    if problem.kind == "syntax":
        raise ExperimentConfigError([f"{source}:{problem.line}: not valid YAML: {problem.detail}"])
    if problem.kind == "key-not-plain":
        at: JsonPath = problem.path + ("?",)
        message = "keys must be plain names"
    else:
        at = problem.path + (problem.key, "dup")
        message = f"duplicate key '{problem.key}' (first at line {problem.first_line}); keep one"
    lines.by_path[at] = problem.line
    problems.add(at, message)


# ----------------------------------------------------------------------------------------------- schema


_REQUIRED_HINTS = {
    "version": 'e.g. version: "2026.12.01-1"',
    "layers": "a list of layers, each with an id and its experiments",
    "experiments": "a list (may be empty: experiments: [])",
    "id": "lower-case letters, digits, '_' and '-'",
    "level": "each level needs a name, e.g. {level: friendly, content_variant: friendly}",
}


def _schema_problem(error: jsonschema.ValidationError, problems: _Problems) -> None:
    path: JsonPath = tuple(error.absolute_path)
    kind, instance = error.validator, error.instance
    if kind == "required":
        for key in error.validator_value:
            if isinstance(instance, dict) and key not in instance:
                hint = f" ({_REQUIRED_HINTS[key]})" if key in _REQUIRED_HINTS else ""
                problems.add(path, f"missing required key '{key}'{hint}")
    elif kind == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        for key in [k for k in instance if k not in allowed]:
            hint = ""
            if set(allowed) == set(ELIGIBILITY_FIELDS):
                hint = " (eligibility can test: " + ", ".join(ELIGIBILITY_FIELDS) + ")"
            elif "control" in allowed:
                hint = f"; an arm or level may only change: {', '.join(CHANGE_KEYS)}"
            problems.add(path + (key,), f"unknown key '{key}'; expected one of: {', '.join(allowed)}{hint}")
    elif kind == "oneOf" and isinstance(instance, dict) and "id" in instance and "eligible" in error.schema.get("properties", {}):
        has_arms, has_factors = "arms" in instance, "factors" in instance
        if has_arms and has_factors:
            problems.add(path, "give either 'arms' or 'factors' (multivariate), not both")
        elif "arm_weights" in instance and has_arms:
            problems.add(path + ("arm_weights",), "arm_weights is for factors; with 'arms' give each arm a weight")
        elif not has_arms and not has_factors:
            problems.add(path, "missing 'arms' (a list of at least two arms) or 'factors' (multivariate)")
        else:  # the branch that applies has its own error; report it
            best = jsonschema.exceptions.best_match(error.context)
            if best is not None:
                _schema_problem(best, problems)
    elif kind == "oneOf":
        problems.add(path, f"expected a value or a list of values (strings or integers), got {json.dumps(instance)[:60]}")
    elif kind == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        words = " or ".join(TYPE_WORDS.get(t, t) for t in expected)
        hint = "; quote it" if "string" in expected and not isinstance(instance, (dict, list)) else ""
        problems.add(path, f"expected {words}, got {json.dumps(instance, default=str)[:60]}{hint}")
    elif kind == "const":
        problems.add(path, "control can only be true (omit it for a non-control arm)")
    elif kind == "pattern":
        what = "name" if "propertyNames" in error.relative_schema_path else "value"
        problems.add(path, f"invalid {what} {instance!r}; use lower-case letters, digits, '_' and '-', "
                           "starting with a letter or digit")
    elif kind in ("minItems", "minLength", "minProperties"):
        if path and path[-1] == "arms":
            problems.add(path, "an experiment needs at least two arms (e.g. a treatment and control: true)")
        elif len(path) >= 2 and path[-2] == "factors":
            problems.add(path, "a factor needs at least two levels")
        else:
            problems.add(path, "must not be empty")
    else:
        problems.add(path, error.message)


# ----------------------------------------------------------------------------------------------- semantics


def _parse_time(value: str, path: JsonPath, problems: _Problems) -> int | None:
    """ISO date or date-time -> epoch ms; no time zone means UTC."""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        problems.add(path, f"cannot read {value!r} as a date or time; write e.g. 2026-12-01 or 2026-12-01T09:00:00Z")
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return int(parsed.timestamp() * 1000)


def _changes(data: Mapping[str, Any], path: JsonPath, problems: _Problems) -> ArmChanges:
    if data.get("control") and any(k in data for k in CHANGE_KEYS[1:]):
        others = [k for k in CHANGE_KEYS[1:] if k in data]
        problems.add(path, f"control: true is the default flow and cannot also set {', '.join(others)}; "
                           "drop one of them")
    return ArmChanges(bool(data.get("control", False)), data.get("rules_version"), data.get("model_version"),
                      data.get("content_variant"))


def _thresholds(weights: list[float]) -> tuple[int, ...]:
    """Cumulative bucket upper bounds: arm i owns ``[t[i-1], t[i])`` of the BUCKETS buckets (last is BUCKETS)."""
    total = sum(weights)
    cumulative = list(itertools.accumulate(weights))
    bounds = [round(c / total * BUCKETS) for c in cumulative]
    bounds[-1] = BUCKETS
    return tuple(bounds)


def _weight(value: Any, path: JsonPath, problems: _Problems) -> float:
    weight = 1.0 if value is None else float(value)
    if not weight > 0:
        problems.add(path, f"weight must be > 0, got {value}; remove the arm to stop assigning users to it")
        return 1.0
    return weight


def _plain_arms(exp: Mapping[str, Any], path: JsonPath, problems: _Problems) -> list[Arm]:
    arms: list[Arm] = []
    seen: dict[str, int] = {}
    for i, data in enumerate(exp["arms"]):
        arm_id = data["id"]
        if arm_id in seen:
            problems.add(path + ("arms", i, "id"), f"arm id '{arm_id}' is already used by arms[{seen[arm_id]}]; "
                                                   "arm ids must be unique within an experiment")
        seen.setdefault(arm_id, i)
        arms.append(Arm(arm_id, _weight(data.get("weight"), path + ("arms", i, "weight"), problems),
                        _changes(data, path + ("arms", i), problems), description=data.get("description", "")))
    return arms


def _crossed_arms(exp: Mapping[str, Any], path: JsonPath, problems: _Problems) -> tuple[list[Arm], tuple]:
    factors: list[tuple[str, list[Mapping[str, Any]]]] = list(exp["factors"].items())
    setters: dict[str, str] = {}  # change key -> the factor that sets it
    for name, levels in factors:
        seen: set[str] = set()
        for j, level in enumerate(levels):
            if level["level"] in seen:
                problems.add(path + ("factors", name, j, "level"),
                             f"level '{level['level']}' appears twice in factor '{name}'; level names must be unique")
            seen.add(level["level"])
            _changes(level, path + ("factors", name, j), problems)
            for key in CHANGE_KEYS[1:]:
                if key in level:
                    owner = setters.setdefault(key, name)
                    if owner != name:
                        problems.add(path + ("factors", name, j, key),
                                     f"factors '{owner}' and '{name}' both set {key}; a crossed arm could only "
                                     f"have one {key}, so let one factor own it")
    arms: list[Arm] = []
    weights = dict(exp.get("arm_weights") or {})
    for combo in itertools.product(*[[(name, lv) for lv in levels] for name, levels in factors]):
        arm_id = "|".join(f"{name}={lv['level']}" for name, lv in combo)
        merged: dict[str, Any] = {}
        for _, lv in combo:
            merged.update({k: lv[k] for k in CHANGE_KEYS[1:] if k in lv})
        control = any(lv.get("control") for _, lv in combo)
        weight = _weight(weights.pop(arm_id, None), path + ("arm_weights", arm_id), problems)
        arms.append(Arm(arm_id, weight, ArmChanges(control, merged.get("rules_version"), merged.get("model_version"),
                                                   merged.get("content_variant")),
                        levels=tuple((name, lv["level"]) for name, lv in combo)))
    for unknown in weights:
        problems.add(path + ("arm_weights", unknown),
                     f"arm_weights names '{unknown}', which is not a combination of the factors; arms are named "
                     f"like {arms[0].id!r}")
    return arms, tuple((name, tuple(lv["level"] for lv in levels)) for name, levels in factors)


def _eligibility(data: Mapping[str, Any]) -> tuple[tuple[str, frozenset[str]], ...]:
    out = []
    for name in ELIGIBILITY_FIELDS:  # fixed order: cheap fields first is not knowable; keep it stable
        if name in data:
            values = data[name] if isinstance(data[name], list) else [data[name]]
            out.append((name, frozenset(str(v) for v in values)))
    return tuple(out)


def _implied_baseline(arms: list[Arm], crossed: bool, path: JsonPath, problems: _Problems) -> str:
    """The arm with ``control: true``; if no arm has it, the one arm that changes nothing."""
    controls = [a.id for a in arms if a.changes.control]
    if len(controls) == 1:
        return controls[0]
    unchanged = [a.id for a in arms if a.changes.is_empty()]
    if not controls and len(unchanged) == 1:
        return unchanged[0]
    if controls:
        what = f"{len(controls)} arms have control: true ({', '.join(controls)})"
    else:
        what = f"no arm has control: true and {len(unchanged) or 'no'} arms change nothing"
    hint = "give every factor one level that changes nothing" if crossed else "mark one arm control: true"
    problems.add(path, f"cannot tell the baseline arm: {what}; {hint}, or name it with baseline: <arm id>")
    return ""


def _experiment(exp: Mapping[str, Any], layer: str, path: JsonPath, problems: _Problems) -> Experiment:
    if "factors" in exp:
        arms, factors = _crossed_arms(exp, path, problems)
    else:
        arms, factors = _plain_arms(exp, path, problems), ()
    arm_ids = [a.id for a in arms]
    if "baseline" in exp:
        baseline = exp["baseline"]
        if baseline not in arm_ids:
            problems.add(path + ("baseline",), f"baseline '{baseline}' is not an arm; arms: {', '.join(arm_ids)}")
    else:
        baseline = _implied_baseline(arms, bool(factors), path, problems)
    start = _parse_time(exp["start"], path + ("start",), problems) if "start" in exp else 0
    stop = _parse_time(exp["stop"], path + ("stop",), problems) if "stop" in exp else NEVER_MS
    if start is not None and stop is not None and start >= stop:
        problems.add(path + ("stop",), f"stop ({exp['stop']}) must be after start ({exp['start']})")
    return Experiment(
        id=exp["id"], layer=layer, arms=tuple(arms), baseline=baseline, salt=exp.get("salt", DEFAULT_SALT),
        description=exp.get("description", ""), enabled=exp.get("enabled", True), start_ms=start or 0,
        stop_ms=stop if stop is not None else NEVER_MS, eligible=_eligibility(exp.get("eligible") or {}),
        factors=factors, thresholds=_thresholds([a.weight for a in arms]),
    )


def _layer_ranges(layer: Mapping[str, Any], path: JsonPath, problems: _Problems) -> list[tuple[int, int]]:
    """Disjoint [lo, hi) ranges of the layer hash, in file order, sized by layer_share."""
    experiments = layer["experiments"]
    explicit = [e.get("layer_share") for e in experiments]
    given = sum(s for s in explicit if s is not None)
    missing = sum(1 for s in explicit if s is None)
    ranges, lo = [], 0
    for i, share in enumerate(explicit):
        if share is not None and not 0 < share <= 1:
            problems.add(path + ("experiments", i, "layer_share"), f"layer_share must be in (0, 1], got {share}")
            share = 0.0
        if share is None:
            share = max(0.0, 1.0 - given) / missing
        hi = min(BUCKETS, lo + round(share * BUCKETS))
        ranges.append((lo, hi))
        lo = hi
    if given > 1.0 + 1e-9:
        problems.add(path, f"the layer_share values add up to {given:g} > 1; a user can be in only one experiment "
                           "of a layer, so the shares must add up to at most 1 (put overlapping experiments in "
                           "different layers)")
    return ranges


def parse_experiments(text: str, source: str = "<experiments>") -> ExperimentSet:
    """Parse and validate an experiments YAML text; raise :class:`ExperimentConfigError` listing every problem."""
    data, lines = _compose(text, source)
    problems = _Problems(source, lines)
    for error in schema_validator(SCHEMA_PATH).iter_errors(data):
        _schema_problem(error, problems)
    problems.raise_if_any()

    layers: list[Layer] = []
    experiments: dict[str, Experiment] = {}
    where_defined: dict[str, JsonPath] = {}
    layer_ids: dict[str, int] = {}
    key_layer: dict[str, str] = {}  # change key -> the layer whose experiments set it
    for li, layer in enumerate(data["layers"]):
        lpath: JsonPath = ("layers", li)
        if layer["id"] in layer_ids:
            problems.add(lpath + ("id",), f"layer id '{layer['id']}' is already used by layers[{layer_ids[layer['id']]}]")
        layer_ids.setdefault(layer["id"], li)
        ranges = _layer_ranges(layer, lpath, problems)
        for ei, exp_data in enumerate(layer["experiments"]):
            epath = lpath + ("experiments", ei)
            exp = _experiment(exp_data, layer["id"], epath, problems)
            exp = dataclasses.replace(exp, layer_range=ranges[ei], layer_salt=layer.get("salt", layer["id"]))
            if exp.id in experiments:
                problems.add(epath + ("id",), f"experiment id '{exp.id}' is already defined at {_where(where_defined[exp.id])}; "
                                              "experiment ids must be unique across the file")
                continue
            experiments[exp.id] = exp
            where_defined[exp.id] = epath
            for key in CHANGE_KEYS[1:]:
                if any(getattr(a.changes, key) is not None for a in exp.arms):
                    owner = key_layer.setdefault(key, layer["id"])
                    if owner != layer["id"]:
                        problems.add(epath, f"experiments in layers '{owner}' and '{layer['id']}' both set {key}; a "
                                            "user can be in both layers at once, so move them into one layer")
        layers.append(Layer(layer["id"], layer.get("salt", layer["id"]),
                            tuple(e["id"] for e in layer["experiments"])))
    problems.raise_if_any()
    return ExperimentSet(version=data["version"], layers=tuple(layers), experiments=experiments, source=source,
                         changelog=data.get("changelog", ""))


def load_experiments(path: str | Path) -> ExperimentSet:
    """:func:`parse_experiments` of a file; problems name the file as given."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExperimentConfigError([f"{path}: cannot read experiments file: {exc.strerror or exc}"]) from None
    return parse_experiments(text, str(path))
