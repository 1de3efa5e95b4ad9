"""Normalization rules (docs/data-quality.md): each rule by example, unknown values, report counts, idempotence,
Avro round trip of normalized events, and the per-event cost on generated traffic."""

from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Any

import pytest

from models.generator import generate
from udfs import normalization
from udfs.avro_codec import event_codec
from udfs.normalization import (
    ALPHA2,
    canonical_country,
    canonical_device,
    canonical_locale,
    normalize_event,
)
from udfs.onboarding_catalog import DEVICES

from tests.conftest import make_event


def signup(demographic: dict[str, Any] | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    event = make_event("signup", plan="free")
    base_demo = {"country": "DE", "age_band": "25-34", "occupation": "engineer"}
    base_ctx = {"device": "mobile", "referral_source": "ads", "locale": "de-DE", "session_id": "Sess-1"}
    event["demographic"] = {**base_demo, **(demographic or {})}
    event["context"] = {**base_ctx, **(context or {})}
    event["consent"] = {"personalization": True, "analytics": False, "marketing": False}
    return event


# --- country -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("DE", "DE"), ("de", "DE"), (" dE ", "DE"), ("DEU", "DE"), ("deu", "DE"), ("Germany", "DE"),
        ("GERMANY", "DE"), ("US", "US"), ("USA", "US"), ("U.S.A.", "US"), ("u.s.", "US"),
        ("United States", "US"), ("United States of America", "US"), ("UK", "GB"), ("GBR", "GB"),
        ("United Kingdom", "GB"), ("Great Britain", "GB"), ("England", "GB"), ("the Netherlands", "NL"),
        ("Holland", "NL"), ("Côte d'Ivoire", "CI"), ("cote d’ivoire", "CI"), ("Ivory Coast", "CI"),
        ("St. Lucia", "LC"), ("Saint Lucia", "LC"), ("Türkiye", "TR"), ("Turkey", "TR"), ("Russia", "RU"),
        ("South Korea", "KR"), ("Korea, Republic of", "KR"), ("North Korea", "KP"), ("Viet Nam", "VN"),
        ("Vietnam", "VN"), ("Czech Republic", "CZ"), ("Guinea-Bissau", "GW"), ("guinea bissau", "GW"),
        ("Trinidad & Tobago", "TT"), ("Bosnia and Herzegovina", "BA"), ("Åland Islands", "AX"),
        ("Congo", "CG"), ("DR Congo", "CD"), ("Niger", "NE"), ("Nigeria", "NG"), ("India", "IN"), ("IND", "IN"),
        ("Japan", "JP"), ("brazil", "BR"), ("Spain", "ES"), ("France", "FR"), ("Canada", "CA"),
    ],
)
def test_country_to_alpha2(raw, expected):
    assert canonical_country(raw) == expected


@pytest.mark.parametrize("raw", ["XX", "ZZZ", "Korea", "Atlantis", "EU", "Deutschland", "1", "U S"])
def test_unknown_country_is_not_guessed(raw):
    assert canonical_country(raw) is None


def test_country_table_is_complete_iso_3166_1():
    table = normalization._ISO_3166_1.splitlines()
    assert len(table) == len(ALPHA2) == 249
    alpha3 = [line.split(" ", 2)[1] for line in table]
    assert len(set(alpha3)) == 249
    for line in table:
        a2, a3, names = line.split(" ", 2)
        assert canonical_country(a2) == canonical_country(a3) == canonical_country(names.split("|")[0]) == a2
    pytz = pytest.importorskip("pytz")  # an independent copy of the alpha-2 list (tzdata's iso3166.tab)
    assert set(pytz.country_names) == ALPHA2


# --- locale --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("en-US", "en-US"), ("en_us", "en-US"), ("EN-us", "en-US"), ("pt_BR.UTF-8", "pt-BR"),
        ("de_DE@euro", "de-DE"), ("de_DE.UTF-8@euro", "de-DE"), ("zh-hant-tw", "zh-Hant-TW"),
        ("ZH_HANS", "zh-Hans"), ("sr-latn-rs", "sr-Latn-RS"), ("en", "en"), ("FR", "fr"), (" ja-jp ", "ja-JP"),
        ("es-419", "es-419"), ("en_UK", "en-GB"), ("de-CH-1996", "de-CH-1996"), ("en-US-x-Twain", "en-US-x-twain"),
        ("ca-ES-VALENCIA", "ca-ES-valencia"), ("zh-yue-HK", "zh-yue-HK"),
    ],
)
def test_locale_to_bcp47(raw, expected):
    assert canonical_locale(raw) == expected


@pytest.mark.parametrize("raw", ["C", "POSIX", "e", "english", "en-XX", "en--US", "en-", "en-US-x", "12-US", "de-ü", "en US"])
def test_malformed_locale_is_rejected(raw):
    assert canonical_locale(raw) is None


# --- device --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        *((d, d) for d in DEVICES),
        ("Desktop", "desktop"), (" PC ", "desktop"), ("mac", "desktop"), ("macOS", "desktop"), ("Windows", "desktop"),
        ("linux", "desktop"), ("Laptop", "desktop"), ("chromebook", "desktop"), ("desktop_web", "desktop"),
        ("iPhone", "mobile"), ("Android", "mobile"), ("phone", "mobile"), ("Smartphone", "mobile"), ("iOS", "mobile"),
        ("mobile-web", "mobile"), ("Mobile App", "mobile"), ("iPad", "tablet"), ("TABLET", "tablet"),
        ("kindle", "tablet"), ("android_tablet", "tablet"), ("Smart TV", "other"), ("console", "other"),
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148", "mobile"),
        ("Mozilla/5.0 (iPad; CPU OS 13_2 like Mac OS X) Mobile/15E148 Safari", "tablet"),
        ("Mozilla/5.0 (Linux; Android 13; Pixel 7) Mobile Safari/537.36", "mobile"),
        ("Mozilla/5.0 (Linux; Android 13; SM-X700) Safari/537.36", "tablet"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0", "desktop"),
        ("Mozilla/5.0 (Windows Phone 10.0; Android 6.0.1; Lumia 950)", "mobile"),
        ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) Safari/605.1.15", "desktop"),
        ("Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) Chrome/120.0", "desktop"),
    ],
)
def test_device_to_vocabulary(raw, expected):
    assert canonical_device(raw) == expected


@pytest.mark.parametrize("raw", ["fridge", "web", "unknown", "curl/8.0"])
def test_unknown_device_is_not_matched(raw):
    assert canonical_device(raw) is None


# --- normalize_event: every field, the report ----------------------------------------------------------------


def test_normalize_event_rewrites_each_field_and_reports_it():
    event = signup(
        {"country": "Germany", "age_band": " 25-34 ", "occupation": "Data Analyst"},
        {"device": "iPhone", "referral_source": "ADS", "locale": "de_de.UTF-8", "session_id": " Sess-1 "},
    )
    original = copy.deepcopy(event)
    report: Counter[str] = Counter()
    assert normalize_event(event, report) is event  # in place
    assert event["demographic"] == {"country": "DE", "age_band": "25-34", "occupation": "data analyst"}
    assert event["context"] == {"device": "mobile", "referral_source": "ads", "locale": "de-DE", "session_id": " Sess-1 "}
    for untouched in ("event_id", "user_id", "anonymous_id", "event_type", "event_time", "consent", "properties"):
        assert event[untouched] == original[untouched]
    assert report == Counter(
        country_normalized=1, age_band_normalized=1, occupation_normalized=1,
        device_normalized=1, referral_source_normalized=1, locale_normalized=1,
    )


@pytest.mark.parametrize(
    "section, field, raw, expected, rule",
    [
        ("demographic", "country", "Atlantis", None, "country_unknown"),
        ("demographic", "country", "  ", None, "country_blank"),
        ("demographic", "country", 49, None, "country_unknown"),
        ("context", "locale", "POSIX", None, "locale_invalid"),
        ("context", "locale", "", None, "locale_blank"),
        ("context", "device", "fridge", "other", "device_unknown"),
        ("context", "device", " ", None, "device_blank"),
        ("context", "referral_source", "\t", None, "referral_source_blank"),
        ("demographic", "occupation", ["engineer"], None, "occupation_invalid"),
        ("demographic", "age_band", "", None, "age_band_blank"),
    ],
)
def test_rejected_values_become_none_or_other_and_are_counted(section, field, raw, expected, rule):
    event = signup(**{section: {field: raw}})
    report: Counter[str] = Counter()
    normalize_event(event, report)
    assert event[section][field] == expected
    assert report == Counter({rule: 1})


def test_categoricals_are_case_folded_not_lowered():
    event = signup({"occupation": "STRASSE"}, {"referral_source": "Straße"})
    normalize_event(event)
    assert event["demographic"]["occupation"] == event["context"]["referral_source"] == "strasse"


def test_missing_records_and_null_fields_are_left_alone():
    event = make_event("page_view", topic="Analytics")
    event["context"] = {"device": None, "referral_source": None, "locale": None, "session_id": None}
    before = copy.deepcopy(event)
    report: Counter[str] = Counter()
    normalize_event(event, report)
    assert event == before and not report  # properties are not normalized (catalog ids, owned by the app)


@pytest.mark.parametrize(
    "raw, expected, rule",
    [(1_790_000_000_000, 1_790_000_000_000, None), (1_790_000_000_000.0, 1_790_000_000_000, "event_time_coerced"),
     (1.5, 1.5, "event_time_invalid"), ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "event_time_invalid"),
     (True, True, "event_time_invalid"), (float("nan"), None, "event_time_invalid")],
)
def test_event_time_sanity(raw, expected, rule):
    event = make_event(t=raw)
    report: Counter[str] = Counter()
    normalize_event(event, report)
    if expected is None:  # NaN != NaN: just check it was not replaced by a guess
        assert event["event_time"] is raw
    else:
        assert event["event_time"] == expected and type(event["event_time"]) is type(expected)
    assert report == (Counter({rule: 1}) if rule else Counter())


# --- properties of the whole: idempotence, codec, cost -------------------------------------------------------

MESSY = [
    signup({"country": "usa", "age_band": "25-34 ", "occupation": " Engineer"},
           {"device": "Mozilla/5.0 (iPad; CPU OS 13_2)", "referral_source": "Organic", "locale": "EN_us.utf8"}),
    signup({"country": "Atlantis", "occupation": "  "}, {"device": "fridge", "locale": "zh_hant_tw@x"}),
    signup({"country": "côte d'ivoire", "age_band": None}, {"device": " PC", "locale": "c", "referral_source": ""}),
]


@pytest.mark.parametrize("event", MESSY + [signup()])
def test_normalizing_twice_equals_once_and_reports_nothing_new(event):
    once = normalize_event(copy.deepcopy(event))
    report: Counter[str] = Counter()
    twice = normalize_event(copy.deepcopy(once), report)
    assert twice == once and not report


def test_generated_events_are_already_normal():
    events, _ = generate(30, seed=3)
    report: Counter[str] = Counter()
    for event in events:
        assert normalize_event(copy.deepcopy(event), report) == event
    assert not report


@pytest.mark.parametrize("event", MESSY)
def test_normalized_events_round_trip_through_avro(event):
    codec = event_codec()
    normalized = normalize_event(copy.deepcopy(event))
    assert codec.decode(codec.encode(normalized)) == normalized


def test_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(normalization, "MEMO_LIMIT", 8)
    rule = next(r for r in normalization._RULES["context"] if r.field == "referral_source")
    for i in range(50):
        normalize_event(signup(context={"referral_source": f"Source-{i}"}))
    assert len(rule.memo) <= 8
    event = normalize_event(signup(context={"referral_source": "Source-1"}))
    assert event["context"]["referral_source"] == "source-1"


def test_cost_per_event(capsys):
    """Timing is printed, not asserted (CI machines vary); the target is < 2 µs per event."""
    events, _ = generate(200, seed=1)
    messy = copy.deepcopy(events)
    for e in messy:
        e["context"]["locale"] = e["context"]["locale"].replace("-", "_").lower()
        e["context"]["device"] = e["context"]["device"].upper()
        if e["demographic"]:
            e["demographic"]["country"] = e["demographic"]["country"].lower()
    for name, source in (("clean", events), ("messy", messy)):
        best = float("inf")
        for _ in range(5):
            batch = copy.deepcopy(source)
            report: Counter[str] = Counter()
            start = time.perf_counter()
            for event in batch:
                normalize_event(event, report)
            best = min(best, (time.perf_counter() - start) / len(batch) * 1e6)
        with capsys.disabled():
            print(f"\nnormalize_event ({name}, {len(batch)} events of generate(200, seed=1)): {best:.2f} us/event")
