"""Rules and the decision record: consent gates personalization, reasons name the rules, ids are stable."""

from __future__ import annotations

import pytest

from dataclasses import dataclass

from udfs.avro_codec import decision_codec
from udfs.next_step import HIGH_CHURN_RISK, choose_step, default_flow
from udfs.personalizer import Personalizer, decision_id_for
from udfs.profile_state import Profile

from tests.conftest import NOW_MS, make_event


@dataclass(frozen=True)
class FixedScores:
    segment_id: int
    segment_name: str
    churn_risk: float


class FixedScorer:
    version = "m-test"

    def __init__(self, churn: float = 0.1) -> None:
        self.calls = 0
        self.churn = churn

    def score(self, features):
        self.calls += 1
        return FixedScores(2, "integrator", self.churn)


def _consenting(event_type="signup", **props):
    event = make_event(event_type, **props)
    event["consent"] = {"personalization": True, "analytics": True, "marketing": False}
    return event


def test_default_flow_walks_the_steps_in_order():
    profile = Profile(steps_done=["welcome_tour"])
    assert default_flow(profile).step_id == "profile_setup"
    assert default_flow(Profile(completed_ms=1)).step_id == "none"


def test_high_churn_risk_gets_a_concierge():
    choice = choose_step(Profile(), "casual", HIGH_CHURN_RISK + 0.01, None)
    assert choice.step_id == "concierge_call" and choice.reasons[0].startswith("high_churn_risk")


def test_interest_pulls_its_step_forward_unless_done():
    assert choose_step(Profile(), "integrator", 0.1, "integrations").step_id == "connect_data"
    done = Profile(steps_done=["connect_data"])
    assert choose_step(done, "integrator", 0.1, "integrations").step_id == "welcome_tour"


def test_skipped_steps_come_last():
    profile = Profile(steps_skipped=["welcome_tour"])
    assert choose_step(profile, "x", 0.1, None).step_id == "profile_setup"


def test_personalized_decision_uses_one_model_call_and_encodes():
    scorer = FixedScorer()
    personalizer = Personalizer(scorer, 3_600_000.0)
    event = _consenting("feature_used", topic="integrations")
    profile = personalizer.update(Profile(), event)
    decision = personalizer.decide(profile, event, decided_at_ms=NOW_MS)
    assert scorer.calls == 1
    assert decision["personalized"] and decision["segment_name"] == "integrator"
    assert decision["step_id"] == "connect_data" and decision["model_version"] == "m-test"
    assert decision["decision_id"] == decision_id_for(event["event_id"])
    assert decision["interest"] == {"integrations": 1.0}
    codec = decision_codec()
    assert codec.decode(codec.encode(decision)) == decision


def test_without_consent_no_model_is_called():
    scorer = FixedScorer()
    personalizer = Personalizer(scorer, 3_600_000.0)
    event = make_event("signup")
    decision = personalizer.decide(personalizer.update(Profile(), event), event)
    assert scorer.calls == 0
    assert not decision["personalized"] and decision["content_variant"] == "default"
    assert any(r.startswith("no_consent") for r in decision["reasons"])


def test_decision_ids_are_deterministic():
    assert decision_id_for("e-1") == decision_id_for("e-1") != decision_id_for("e-2")


@pytest.mark.parametrize("event_id", ["e-1", "", "ü-événement-" + "x" * 200, "6f1d2a7e-5b8c-4c1e-9a57-0e7d4f3b2a10"])
def test_decision_ids_are_rfc4122_uuid5(event_id):
    import uuid

    from udfs.personalizer import DECISION_NAMESPACE

    assert decision_id_for(event_id) == str(uuid.uuid5(DECISION_NAMESPACE, event_id))


def test_erasure_answer():
    decision = Personalizer(FixedScorer(), 1.0).erased(make_event("erasure_requested"))
    assert decision["step_id"] == "none" and decision["content_variant"] == "erased"
