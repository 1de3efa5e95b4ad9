"""Per-stage cost of Onramp's per-event work, in one Python process (no Flink, no Kafka).

Runs the job's own functions over generated events in the order the job does, timing each stage separately,
so a regression points at its stage: decode+validate, state (de)serialisation, profile update, features, model
inference, interest scores, the rule context (the values rules see), rules (evaluating the configured rule set,
template variables included), decision record, encode.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

from jobs.config import OnrampConfig
from udfs.avro_codec import decision_codec, event_codec
from udfs.features import compute_features, interest_scores
from udfs.next_step import choose_step, default_flow
from udfs.personalizer import Personalizer
from udfs.profile_state import Profile, fold_event, profile_from_state, profile_to_state
from udfs.validation import ValidationLimits, decode_event

STAGES = ("decode_validate", "state_io", "profile_update", "features", "inference", "interest", "rule_context",
          "rules", "experiments", "decision_record", "encode", "audit")


def stage_costs(cfg: OnrampConfig, bundle: Any, events: list[dict[str, Any]]) -> dict[str, float]:
    """Mean µs per event of each stage (state_io includes the pickle round trip PyFlink does for the state)."""
    half_life = cfg.interest_half_life_hours * 3_600_000.0
    codec, out_codec = event_codec(), decision_codec()
    limits = ValidationLimits(cfg.max_future_skew_ms, 10 * cfg.max_event_age_ms)
    payloads = [codec.encode(e) for e in events]
    from jobs.personalize import resolve_rules
    from udfs.rules.fields import rule_context

    rules = resolve_rules(cfg).compiled
    policy = cfg.profile_policy()
    from jobs.config import NO_EXPERIMENTS
    from udfs.audit import decision_audit
    from udfs.avro_codec import audit_codec
    from udfs.experiment_arms import EMPTY_SET, load_experiments

    experiments = EMPTY_SET if cfg.experiments_file == NO_EXPERIMENTS else load_experiments(cfg.experiments_file)
    audit_encode = audit_codec().encode
    personalizer = Personalizer(bundle, half_life, rules, policy, experiments)
    states: dict[str, bytes] = {}
    totals = dict.fromkeys(STAGES, 0)
    now = time.time_ns() // 1_000_000
    clock = time.perf_counter_ns
    for payload in payloads:
        t0 = clock()
        event = decode_event(codec, payload, now, limits)
        t1 = clock()
        blob = states.get(event["user_id"])
        profile = profile_from_state(pickle.loads(blob)) if blob else Profile()
        t2 = clock()
        fold_event(profile, event, half_life, policy)  # dedup, consent, allow-lists, then the profile update
        t3 = clock()
        features = compute_features(profile, event["event_time"], half_life)
        t4 = clock()
        scores = bundle.score(features)
        t5 = clock()
        personal = profile.consent_personalization
        interest = interest_scores(profile, event["event_time"], half_life, features) if personal else {}
        top = max(interest, key=interest.__getitem__) if interest else None
        t5a = clock()
        ctx = rule_context(profile, features, scores, top, event) if rules is not None else None
        t5b = clock()
        if profile.consent_personalization:
            if rules is not None:  # what the job runs: the configured rule set over the rule context
                choice = rules.evaluate(ctx)
            else:
                choice = choose_step(profile, scores.segment_name, scores.churn_risk, top)
        else:
            choice = default_flow(profile)
        t6 = clock()
        personalizer._experiment_arms(profile, event, scores.segment_id, event["user_id"])
        t6a = clock()
        record = personalizer._record(event, choice, scores.segment_id, scores.segment_name, scores.churn_risk,
                                      interest, True, None, profile.experiments)
        t7 = clock()
        out_codec.encode(record)
        t8 = clock()
        states[event["user_id"]] = pickle.dumps(profile_to_state(profile))
        t9 = clock()
        audit_encode(decision_audit(record, event["event_type"], profile, event["user_id"], "k"))
        t10 = clock()
        for stage, ns in zip(STAGES, (t1 - t0, (t2 - t1) + (t9 - t8), t3 - t2, t4 - t3, t5 - t4, t5a - t5, t5b - t5a,
                                      t6 - t5b, t6a - t6, t7 - t6a, t8 - t7, t10 - t9)):
            totals[stage] += ns
    n = max(1, len(payloads))
    costs = {stage: round(ns / n / 1000, 2) for stage, ns in totals.items()}
    costs["total"] = round(sum(costs.values()), 2)
    return costs
