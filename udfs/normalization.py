"""Normalization of decoded onboarding events: one spelling per value, so profiles, features and rules compare
like with like ("de", "DEU" and "Germany" are one country; "EN_us" and "en-US" one locale).

:func:`normalize_event` is pure apart from rewriting the event it is given (in place, and returned) and counting
what it did in an optional :class:`~collections.Counter`. It runs once per event on the hot path, so every rule
is a lookup in a per-field memo (raw value -> result) that is computed once per distinct raw value; the
tables behind them (ISO 3166-1, device synonyms) are built once at import. The memos are bounded
(:data:`MEMO_LIMIT` entries per field, then cleared) so hostile input cannot grow memory.

What is touched (``avro/onboarding_event.avsc``); ``docs/data-quality.md`` has the table with examples:

=========================  ===========================  ==============================================
field                      kind                         rule
=========================  ===========================  ==============================================
event_id, user_id,         id                           untouched (case-sensitive; validation checks
anonymous_id,                                           blanks and lengths)
context.session_id
event_type                 Avro enum                    untouched (the codec enforces the symbols)
event_time                 long, UTC epoch millis       kept; an integral float becomes an int; any
                                                        other non-int is counted, left for validation
demographic.country        ISO 3166-1 alpha-2           alpha-2/alpha-3 any case, English names ->
                                                        upper-case alpha-2; unknown -> None
context.locale             BCP 47                       canonical casing; ``_`` -> ``-``; ``.UTF-8``,
                                                        ``@euro`` dropped; malformed -> None
context.device             DEVICES vocabulary           synonyms / user-agent hints; unknown -> other
demographic.age_band,      categorical                  trimmed + ``str.casefold()``
demographic.occupation,
context.referral_source
consent.*                  booleans                     untouched
properties                 event-type specific map      untouched: catalog ids (step_id, topic, ...),
                                                        paths (page) and counts; no time values
=========================  ===========================  ==============================================

No field other than ``event_time`` carries a time (and no ``properties`` key holds an ISO-8601 string by
convention), so there is no timestamp conversion beyond the ``event_time`` type check. Blank strings (empty or
whitespace only) in any normalized field become None: "not stated", which is what the profile does with them
anyway. Unknown values are never guessed: they become None (``other`` for device) and are counted.

Report keys (``report[key] += 1`` per field changed): ``<field>_normalized`` (value rewritten),
``<field>_blank``, ``country_unknown``, ``locale_invalid``, ``device_unknown``, ``<field>_invalid`` (a
categorical that is not a string), ``event_time_coerced``, ``event_time_invalid``. An event that is already
normal adds nothing, so normalizing twice reports nothing the second time.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from typing import Any, Callable

from udfs.onboarding_catalog import DEVICES

MEMO_LIMIT = 4096

# ISO 3166-1: alpha-2, alpha-3, English short name, then "|"-separated English aliases (former and common
# names, the ISO long forms). All 249 officially assigned codes; checked against Debian's iso-codes.
_ISO_3166_1 = """\
AD AND Andorra
AE ARE United Arab Emirates|UAE|Emirates
AF AFG Afghanistan
AG ATG Antigua and Barbuda
AI AIA Anguilla
AL ALB Albania
AM ARM Armenia
AO AGO Angola
AQ ATA Antarctica
AR ARG Argentina
AS ASM American Samoa
AT AUT Austria
AU AUS Australia
AW ABW Aruba
AX ALA Åland Islands
AZ AZE Azerbaijan
BA BIH Bosnia and Herzegovina|Bosnia
BB BRB Barbados
BD BGD Bangladesh
BE BEL Belgium
BF BFA Burkina Faso
BG BGR Bulgaria
BH BHR Bahrain
BI BDI Burundi
BJ BEN Benin
BL BLM Saint Barthélemy
BM BMU Bermuda
BN BRN Brunei Darussalam|Brunei
BO BOL Bolivia|Bolivia (Plurinational State of)
BQ BES Bonaire, Sint Eustatius and Saba|Caribbean Netherlands
BR BRA Brazil
BS BHS Bahamas|The Bahamas
BT BTN Bhutan
BV BVT Bouvet Island
BW BWA Botswana
BY BLR Belarus
BZ BLZ Belize
CA CAN Canada
CC CCK Cocos (Keeling) Islands|Cocos Islands
CD COD Congo, Democratic Republic of the|Congo, The Democratic Republic of the|Democratic Republic of the Congo|DR Congo|DRC|Congo-Kinshasa
CF CAF Central African Republic
CG COG Congo|Republic of the Congo|Congo-Brazzaville
CH CHE Switzerland
CI CIV Côte d'Ivoire|Ivory Coast
CK COK Cook Islands
CL CHL Chile
CM CMR Cameroon
CN CHN China|People's Republic of China|PRC
CO COL Colombia
CR CRI Costa Rica
CU CUB Cuba
CV CPV Cabo Verde|Cape Verde
CW CUW Curaçao
CX CXR Christmas Island
CY CYP Cyprus
CZ CZE Czechia|Czech Republic
DE DEU Germany
DJ DJI Djibouti
DK DNK Denmark
DM DMA Dominica
DO DOM Dominican Republic
DZ DZA Algeria
EC ECU Ecuador
EE EST Estonia
EG EGY Egypt
EH ESH Western Sahara
ER ERI Eritrea
ES ESP Spain
ET ETH Ethiopia
FI FIN Finland
FJ FJI Fiji
FK FLK Falkland Islands (Malvinas)|Falkland Islands
FM FSM Micronesia, Federated States of|Micronesia|Federated States of Micronesia
FO FRO Faroe Islands
FR FRA France
GA GAB Gabon
GB GBR United Kingdom|UK|Great Britain|Britain|England|Scotland|Wales|Northern Ireland|United Kingdom of Great Britain and Northern Ireland
GD GRD Grenada
GE GEO Georgia
GF GUF French Guiana
GG GGY Guernsey
GH GHA Ghana
GI GIB Gibraltar
GL GRL Greenland
GM GMB Gambia|The Gambia
GN GIN Guinea
GP GLP Guadeloupe
GQ GNQ Equatorial Guinea
GR GRC Greece
GS SGS South Georgia and the South Sandwich Islands
GT GTM Guatemala
GU GUM Guam
GW GNB Guinea-Bissau
GY GUY Guyana
HK HKG Hong Kong|Hong Kong SAR
HM HMD Heard Island and McDonald Islands
HN HND Honduras
HR HRV Croatia
HT HTI Haiti
HU HUN Hungary
ID IDN Indonesia
IE IRL Ireland
IL ISR Israel
IM IMN Isle of Man
IN IND India
IO IOT British Indian Ocean Territory
IQ IRQ Iraq
IR IRN Iran|Iran, Islamic Republic of|Islamic Republic of Iran
IS ISL Iceland
IT ITA Italy
JE JEY Jersey
JM JAM Jamaica
JO JOR Jordan
JP JPN Japan
KE KEN Kenya
KG KGZ Kyrgyzstan|Kyrgyz Republic
KH KHM Cambodia
KI KIR Kiribati
KM COM Comoros
KN KNA Saint Kitts and Nevis
KP PRK North Korea|Korea, Democratic People's Republic of|Democratic People's Republic of Korea|DPRK
KR KOR South Korea|Korea, Republic of|Republic of Korea
KW KWT Kuwait
KY CYM Cayman Islands
KZ KAZ Kazakhstan
LA LAO Laos|Lao People's Democratic Republic|Lao PDR
LB LBN Lebanon
LC LCA Saint Lucia
LI LIE Liechtenstein
LK LKA Sri Lanka
LR LBR Liberia
LS LSO Lesotho
LT LTU Lithuania
LU LUX Luxembourg
LV LVA Latvia
LY LBY Libya
MA MAR Morocco
MC MCO Monaco
MD MDA Moldova|Moldova, Republic of|Republic of Moldova
ME MNE Montenegro
MF MAF Saint Martin (French part)|Saint Martin
MG MDG Madagascar
MH MHL Marshall Islands
MK MKD North Macedonia|Macedonia|Republic of North Macedonia
ML MLI Mali
MM MMR Myanmar|Burma
MN MNG Mongolia
MO MAC Macao|Macau
MP MNP Northern Mariana Islands
MQ MTQ Martinique
MR MRT Mauritania
MS MSR Montserrat
MT MLT Malta
MU MUS Mauritius
MV MDV Maldives
MW MWI Malawi
MX MEX Mexico
MY MYS Malaysia
MZ MOZ Mozambique
NA NAM Namibia
NC NCL New Caledonia
NE NER Niger
NF NFK Norfolk Island
NG NGA Nigeria
NI NIC Nicaragua
NL NLD Netherlands|The Netherlands|Holland
NO NOR Norway
NP NPL Nepal
NR NRU Nauru
NU NIU Niue
NZ NZL New Zealand
OM OMN Oman
PA PAN Panama
PE PER Peru
PF PYF French Polynesia
PG PNG Papua New Guinea
PH PHL Philippines
PK PAK Pakistan
PL POL Poland
PM SPM Saint Pierre and Miquelon
PN PCN Pitcairn|Pitcairn Islands
PR PRI Puerto Rico
PS PSE Palestine|Palestine, State of|State of Palestine
PT PRT Portugal
PW PLW Palau
PY PRY Paraguay
QA QAT Qatar
RE REU Réunion
RO ROU Romania
RS SRB Serbia
RU RUS Russian Federation|Russia
RW RWA Rwanda
SA SAU Saudi Arabia|KSA
SB SLB Solomon Islands
SC SYC Seychelles
SD SDN Sudan
SE SWE Sweden
SG SGP Singapore
SH SHN Saint Helena, Ascension and Tristan da Cunha|Saint Helena
SI SVN Slovenia
SJ SJM Svalbard and Jan Mayen
SK SVK Slovakia|Slovak Republic
SL SLE Sierra Leone
SM SMR San Marino
SN SEN Senegal
SO SOM Somalia
SR SUR Suriname
SS SSD South Sudan
ST STP Sao Tome and Principe
SV SLV El Salvador
SX SXM Sint Maarten (Dutch part)|Sint Maarten
SY SYR Syria|Syrian Arab Republic
SZ SWZ Eswatini|Swaziland
TC TCA Turks and Caicos Islands
TD TCD Chad
TF ATF French Southern Territories
TG TGO Togo
TH THA Thailand
TJ TJK Tajikistan
TK TKL Tokelau
TL TLS Timor-Leste|East Timor
TM TKM Turkmenistan
TN TUN Tunisia
TO TON Tonga
TR TUR Türkiye|Turkey
TT TTO Trinidad and Tobago
TV TUV Tuvalu
TW TWN Taiwan|Taiwan, Province of China
TZ TZA Tanzania|Tanzania, United Republic of|United Republic of Tanzania
UA UKR Ukraine
UG UGA Uganda
UM UMI United States Minor Outlying Islands
US USA United States|United States of America|America
UY URY Uruguay
UZ UZB Uzbekistan
VA VAT Holy See|Holy See (Vatican City State)|Vatican|Vatican City|Vatican City State
VC VCT Saint Vincent and the Grenadines
VE VEN Venezuela|Venezuela (Bolivarian Republic of)
VG VGB Virgin Islands (British)|Virgin Islands, British|British Virgin Islands
VI VIR Virgin Islands (U.S.)|Virgin Islands, U.S.|US Virgin Islands
VN VNM Viet Nam|Vietnam
VU VUT Vanuatu
WF WLF Wallis and Futuna
WS WSM Samoa
YE YEM Yemen
YT MYT Mayotte
ZA ZAF South Africa
ZM ZMB Zambia
ZW ZWE Zimbabwe
"""


_NAME_PUNCTUATION = str.maketrans({".": "", "'": "", "\u2019": "", ",": " ", "(": " ", ")": " ", "-": " ", "&": " and "})


def _name_key(value: str) -> str:
    """Lookup key for a country name: case, accents, punctuation, a leading "the" and "St." do not matter."""
    decomposed = unicodedata.normalize("NFKD", value.casefold())
    words = "".join(c for c in decomposed if not unicodedata.combining(c)).translate(_NAME_PUNCTUATION).split()
    if words and words[0] == "the":
        del words[0]
    return " ".join("saint" if w == "st" else w for w in words)


def _build_country_index(table: str) -> tuple[frozenset[str], dict[str, str]]:
    """(alpha-2 codes, lookup key -> alpha-2); refuses a key that would map to two countries."""
    alpha2: set[str] = set()
    index: dict[str, str] = {}
    for line in table.splitlines():
        a2, a3, names = line.split(" ", 2)
        alpha2.add(a2)
        for key in (a2, a2.casefold(), a3.casefold(), *(_name_key(n) for n in names.split("|"))):
            if index.setdefault(key, a2) != a2:
                raise ValueError(f"country key {key!r} is ambiguous: {index[key]} and {a2}")
    return frozenset(alpha2), index


ALPHA2, _COUNTRY_INDEX = _build_country_index(_ISO_3166_1)


def canonical_country(value: str) -> str | None:
    """ISO 3166-1 alpha-2 (upper case) for a code or English name, or None when not recognised."""
    return _COUNTRY_INDEX.get(value) or _COUNTRY_INDEX.get(_name_key(value))


# BCP 47 region subtags are ISO alpha-2 codes or UN M.49 numbers; "UK" is the one common mistake we repair
# (it is "exceptionally reserved" for the United Kingdom, same as the country rule).
_REGION_ALIASES = {"UK": "GB"}


def canonical_locale(value: str) -> str | None:
    """BCP 47 tag with canonical casing (``zh-Hant-TW``) or None when the value is not a well-formed tag.

    Accepts POSIX spellings (``pt_BR.UTF-8``, ``de_DE@euro``): ``_`` becomes ``-`` and the encoding/modifier
    suffix is dropped. Structure: language (2-3 letters) [-extlang]{0,3} [-Script] [-REGION] [-variant]*
    [-singleton-ext...]; the region must be an ISO alpha-2 code or three digits. Subtag *validity* against
    the IANA registry is not checked (no registry on the hot path), only form.
    """
    tag = value.strip()
    for sep in ".@":
        cut = tag.find(sep)
        if cut >= 0:
            tag = tag[:cut]
    if not tag.isascii():
        return None
    subtags = tag.replace("_", "-").split("-")
    lang = subtags[0]
    if not (2 <= len(lang) <= 3 and lang.isalpha()):
        return None
    out = [lang.lower()]
    i, n = 1, len(subtags)
    while i < n and len(out) < 4 and len(subtags[i]) == 3 and subtags[i].isalpha():  # extlang
        out.append(subtags[i].lower())
        i += 1
    if i < n and len(subtags[i]) == 4 and subtags[i].isalpha():  # script
        out.append(subtags[i].title())
        i += 1
    if i < n:  # region
        sub = subtags[i]
        if len(sub) == 2 and sub.isalpha():
            region = _REGION_ALIASES.get(sub.upper(), sub.upper())
            if region not in ALPHA2:
                return None
            out.append(region)
            i += 1
        elif len(sub) == 3 and sub.isdigit():
            out.append(sub)
            i += 1
    while i < n and len(subtags[i]) != 1:  # variants
        sub = subtags[i]
        if not (sub.isalnum() and (5 <= len(sub) <= 8 or (len(sub) == 4 and sub[0].isdigit()))):
            return None
        out.append(sub.lower())
        i += 1
    rest = subtags[i:]  # extensions and private use: singleton, then subtags of 1-8 alphanumerics
    if rest and (len(rest[-1]) == 1 or not all(1 <= len(s) <= 8 and s.isalnum() for s in rest)):
        return None
    out.extend(s.lower() for s in rest)
    return "-".join(out)


_DEVICE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "desktop": ("desktop", "pc", "mac", "macos", "mac os", "osx", "os x", "imac", "macbook", "windows", "win",
                "win32", "win64", "linux", "ubuntu", "laptop", "notebook", "computer", "workstation",
                "chromebook", "chromeos", "chrome os"),
    "mobile": ("mobile", "phone", "smartphone", "cellphone", "cell phone", "cell", "handset", "iphone", "ipod",
               "android", "ios"),
    "tablet": ("tablet", "ipad", "ipados", "kindle", "tab"),
    "other": ("other", "tv", "smart tv", "smarttv", "console", "game console", "watch", "smartwatch",
              "wearable", "car", "kiosk", "bot"),
}
_DEVICE_INDEX: dict[str, str] = {syn: device for device, syns in _DEVICE_SYNONYMS.items() for syn in syns}
assert set(_DEVICE_SYNONYMS) == set(DEVICES) and all(_DEVICE_INDEX[d] == d for d in DEVICES)

# Substrings for user-agent-like values, first match wins: tablets before phones (iPad UAs say "Mobile"),
# phones before desktop OSes ("Windows Phone", Android UAs say "Linux"); Android without "mobile" is a tablet.
_DEVICE_HINTS: tuple[tuple[str, str], ...] = (
    ("ipad", "tablet"), ("tablet", "tablet"), ("kindle", "tablet"), ("silk/", "tablet"),
    ("iphone", "mobile"), ("ipod", "mobile"), ("mobile", "mobile"), ("phone", "mobile"), ("android", "tablet"),
    ("windows", "desktop"), ("macintosh", "desktop"), ("mac os", "desktop"), ("x11", "desktop"),
    ("linux", "desktop"), ("desktop", "desktop"), ("laptop", "desktop"),
)


def canonical_device(value: str) -> str | None:
    """One of DEVICES for a synonym or user-agent-like value, or None when nothing matches."""
    key = " ".join(value.casefold().replace("_", " ").replace("-", " ").split())
    device = _DEVICE_INDEX.get(key)
    if device is None:
        device = next((d for needle, d in _DEVICE_HINTS if needle in key), None)
    return device


def canonical_category(value: str) -> str:
    """Trimmed and case-folded, so "Engineer " and "ENGINEER" are one category."""
    return value.strip().casefold()


class _FieldRule:
    """One field's normalizer: the canonical function, what an unrecognised value becomes, and a memo."""

    __slots__ = ("field", "canonical", "unknown", "memo", "normalized", "blank", "rejected")

    def __init__(self, field: str, canonical: Callable[[str], str | None], rejected: str, unknown: str | None = None):
        self.field = field
        self.canonical = canonical
        self.unknown = unknown
        self.memo: dict[str, tuple[str | None, str | None]] = {}
        self.normalized, self.blank, self.rejected = f"{field}_normalized", f"{field}_blank", rejected

    def resolve(self, value: Any) -> tuple[str | None, str | None]:
        """(new value, report key or None if unchanged) on a memo miss; memoizes string inputs."""
        if value.__class__ is not str:
            return self.unknown, self.rejected
        if not value.strip():
            result = (None, self.blank)
        else:
            canonical = self.canonical(value)
            if canonical is None:
                result = (self.unknown, self.rejected)
            else:
                result = (canonical, None if canonical == value else self.normalized)
        if len(self.memo) >= MEMO_LIMIT:
            self.memo.clear()
        self.memo[value] = result
        return result


def _categorical(field: str) -> _FieldRule:
    return _FieldRule(field, canonical_category, f"{field}_invalid")


# Per record field of the event: (field name, memo, resolver), so the hot loop does not touch attributes.
_RULES: dict[str, tuple[_FieldRule, ...]] = {
    "demographic": (
        _FieldRule("country", canonical_country, "country_unknown"),
        _categorical("age_band"),
        _categorical("occupation"),
    ),
    "context": (
        _FieldRule("device", canonical_device, "device_unknown", unknown="other"),
        _FieldRule("locale", canonical_locale, "locale_invalid"),
        _categorical("referral_source"),
    ),
}
_PLAN = tuple((section, tuple((r.field, r.memo, r.resolve) for r in rules)) for section, rules in _RULES.items())


def normalize_event(event: dict[str, Any], report: Counter[str] | None = None) -> dict[str, Any]:
    """Normalize a decoded event **in place** and return it; count each change in ``report`` if given.

    In place because the decoded dict is owned by the caller and used once: copying it would cost more than
    the normalization. Idempotent: a normalized event comes back unchanged and adds nothing to ``report``.
    """
    event_time = event.get("event_time")
    if event_time.__class__ is not int:
        _check_event_time(event, event_time, report)
    for section, rules in _PLAN:
        record = event.get(section)
        if not record:
            continue
        for field, memo, resolve in rules:
            value = record.get(field)
            if value is None:
                continue
            hit = memo.get(value) if value.__class__ is str else None
            new, rule = hit if hit is not None else resolve(value)
            if rule is not None:
                record[field] = new
                if report is not None:
                    report[rule] += 1
    return event


def _check_event_time(event: dict[str, Any], value: Any, report: Counter[str] | None) -> None:
    """event_time is UTC epoch millis by schema; a whole float (JSON paths) becomes an int, nothing is guessed."""
    if value.__class__ is float and math.isfinite(value) and value.is_integer():
        event["event_time"] = int(value)
        rule = "event_time_coerced"
    else:
        rule = "event_time_invalid"  # left as is: validation / the codec reject it with a dead-letter code
    if report is not None:
        report[rule] += 1
