"""Content templates: the Mustache subset, the template catalog, the shipped copy and ``rules preview``."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.content_preview import PreviewError, format_preview, preview
from models.generator import generate
from udfs.content_templates import (
    CATALOG_STEPS,
    DEFAULT_TEMPLATE_DIR,
    TemplateCatalog,
    TemplateError,
    TemplateNotFoundError,
    parse,
    template_variables,
)
from udfs.model_bundle import Scores
from udfs.next_step import HIGH_CHURN_RISK, StepChoice, choose_step, default_flow
from udfs.onboarding_catalog import ONBOARDING_STEPS, TOPICS
from udfs.profile_state import Profile


def render(source: str, **variables: object) -> str:
    return parse(source).render(variables)


# --- the renderer -------------------------------------------------------------------------------------------


def test_variables_are_html_escaped_unless_raw() -> None:
    assert render("{{v}}", v='<b>"Tom" & Jerry</b>') == "&lt;b&gt;&quot;Tom&quot; &amp; Jerry&lt;/b&gt;"
    assert render("{{{v}}}|{{& v}}", v="<b>") == "<b>|<b>"
    assert render("{{ v }} and {{v}}", v=3) == "3 and 3"


def test_unknown_variables_render_empty_and_are_reported() -> None:
    template = parse("Hi {{first_name}}{{#nick}} ({{nick}}){{/nick}}, {{missing}}{{first_name}}.")
    assert template.render_reporting({}) == ("Hi , .", ("first_name", "missing"))
    assert template.render_reporting({"first_name": None}) == ("Hi , .", ("missing",))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, "[yes]"), (False, ""), ("x", "[yes]"), ("", ""), (None, ""), ([], ""), ({}, ""), (0, ""),
     ({"k": "v"}, "[yes]")],
)
def test_sections_render_for_truthy_values(value: object, expected: str) -> None:
    assert render("{{#v}}[yes]{{/v}}", v=value) == expected
    assert render("{{^v}}[no]{{/v}}", v=value) == ("" if expected else "[no]")


def test_missing_section_is_falsy() -> None:
    assert render("a{{#v}}[yes]{{/v}}{{^v}}[no]{{/v}}b") == "a[no]b"


def test_sections_iterate_lists_of_strings_and_dicts() -> None:
    assert render("{{#xs}}<{{.}}>{{/xs}}", xs=["a", "b"]) == "<a><b>"
    steps = [{"name": "connect", "done": True}, {"name": "invite", "done": False}]
    assert render("{{#steps}}{{name}}{{#done}}*{{/done}};{{/steps}}", steps=steps) == "connect*;invite;"


def test_section_over_a_dict_pushes_context_and_outer_names_stay_visible() -> None:
    out = render("{{#user}}{{name}} from {{team}}{{/user}}", user={"name": "Ada"}, team="core")
    assert out == "Ada from core"


def test_section_over_a_scalar_exposes_it_as_dot() -> None:
    out = render("{{#top_topic}}Since you like {{.}}...{{/top_topic}}", top_topic="analytics")
    assert out == "Since you like analytics..."


def test_dotted_names_resolve_strictly_inside_the_first_part() -> None:
    variables = {"user": {"profile": {"name": "Ada"}}, "name": "outer"}
    assert render("{{user.profile.name}}", **variables) == "Ada"
    template = parse("[{{user.name}}]")
    assert template.render_reporting(variables) == ("[]", ("user.name",))  # never the outer "name"


def test_comments_render_nothing() -> None:
    assert render("a{{! a comment with {braces} }}b") == "ab"
    assert render("a{{!\nmulti\nline\n}}b") == "ab"


def test_standalone_tag_lines_leave_no_blank_lines() -> None:
    source = "Hello\n{{! note }}\n{{#v}}\n  shown\n{{/v}}\n{{^v}}\n  hidden\n{{/v}}\nbye\n"
    assert render(source, v=True) == "Hello\n  shown\nbye\n"
    assert render("x {{#v}}y{{/v}} z\n", v=True) == "x y z\n"  # not standalone: spaces kept


def test_template_variables_lists_names_used_anywhere() -> None:
    template = parse("{{a}} {{{b}}} {{#c}}{{d.e}}{{.}}{{/c}}{{^f}}{{/f}}{{! g }}")
    assert template_variables(template) == {"a", "b", "c", "d.e", "f"}


def test_a_template_is_parsed_once_and_rendered_many_times() -> None:
    template = parse("{{n}}")
    assert [template.render({"n": i}) for i in range(3)] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("source", "line", "fragment"),
    [
        ("ok\n\n{{#a}}\nnever closed\n", 3, "section {{#a}} is never closed"),
        ("{{#a}}\n{{^b}}\n{{/a}}\n{{/b}}", 3, "{{/a}} does not match the open section {{^b}} from line 2"),
        ("one\n{{/a}}", 2, "closes a section that was never opened"),
        ("one\ntwo {{a\n", 2, "never closed with }}"),
        ("{{{a}}", 1, "never closed with }}}"),
        ("\n{{> partial}}", 2, "partials"),
        ("{{=<% %>=}}", 1, "delimiter changes"),
        ("{{}}", 1, "invalid variable name"),
        ("{{a b}}", 1, "invalid variable name"),
    ],
)
def test_parse_errors_name_file_and_line(source: str, line: int, fragment: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse(source, "rules/templates/x/default.mustache")
    assert info.value.line == line
    assert str(info.value).startswith(f"rules/templates/x/default.mustache:{line}: ")
    assert fragment in str(info.value)


# --- the catalog --------------------------------------------------------------------------------------------


def write_catalog(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_catalog_renders_the_variant_else_falls_back_to_default(tmp_path: Path) -> None:
    catalog = TemplateCatalog.load(write_catalog(tmp_path, {
        "welcome_tour/default.mustache": "Welcome! {{steps_left}} to go.\n",
        "welcome_tour/eu.mustache": "Willkommen! {{steps_left}} to go.\n",
    }))
    eu = catalog.render("welcome_tour", "eu", {"steps_left": "6"})
    assert (eu.variant, eu.text, eu.missing_variables) == ("eu", "Willkommen! 6 to go.", ())
    assert eu.template_path == str(tmp_path / "welcome_tour" / "eu.mustache")
    other = catalog.render("welcome_tour", "data_explorer", {})
    assert (other.step_id, other.variant, other.text) == ("welcome_tour", "default", "Welcome!  to go.")
    assert other.template_path.endswith("welcome_tour/default.mustache")
    assert other.missing_variables == ("steps_left",)


def test_catalog_without_any_template_for_a_step_says_which_file_to_add(tmp_path: Path) -> None:
    catalog = TemplateCatalog.load(write_catalog(tmp_path, {"welcome_tour/eu.mustache": "x"}))
    with pytest.raises(TemplateNotFoundError, match=r"invite_team/default\.mustache"):
        catalog.render("invite_team", "eu", {})
    with pytest.raises(TemplateNotFoundError, match=r"welcome_tour/default\.mustache"):
        catalog.render("welcome_tour", "tutorial", {})


def test_catalog_load_fails_on_a_broken_template_with_its_path_and_line(tmp_path: Path) -> None:
    write_catalog(tmp_path, {"none/default.mustache": "ok\n{{#a}}\n"})
    with pytest.raises(TemplateError, match=r"none/default\.mustache:2: section \{\{#a\}\} is never closed"):
        TemplateCatalog.load(tmp_path)
    with pytest.raises(TemplateError, match="does not exist"):
        TemplateCatalog.load(tmp_path / "nope")


def test_check_reports_missing_defaults_unknown_steps_and_unprovided_variables(tmp_path: Path) -> None:
    files = {f"{step}/default.mustache": "Next up.\n" for step in CATALOG_STEPS if step != "invite_team"}
    files["welcome_tour/eu.mustache"] = "Hi {{first_name}}!\n{{#top_topic}}{{top_topic}} {{first_name}}{{/top_topic}}\n"
    files["welcome_tour/nested.mustache"] = "{{user.locale}} {{steps_left.x}}"
    files["welcom_tour/default.mustache"] = "typo in the step directory"
    catalog = TemplateCatalog.load(write_catalog(tmp_path, files))
    problems = catalog.check({"steps_left", "top_topic", "user"})
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{tmp_path / 'invite_team' / 'default.mustache'}: missing")
    assert problems[1].startswith(f"{tmp_path / 'welcom_tour'}: step 'welcom_tour' is not in the catalog")
    eu = tmp_path / "welcome_tour" / "eu.mustache"
    assert problems[2].startswith(f"{eu}:1: variable 'first_name' is never provided")
    assert catalog.check({"steps_left", "top_topic", "user", "first_name"}) == problems[:2]


# --- the shipped templates ----------------------------------------------------------------------------------


def builtin_choices() -> list[StepChoice]:
    """Every kind of decision the built-in rules make: each point of the flow, default and personalized, with
    and without a top topic, low and high churn risk, finished."""
    choices = []
    for done in range(len(ONBOARDING_STEPS) + 1):
        profile = Profile(steps_done=list(ONBOARDING_STEPS[:done]))
        choices.append(default_flow(profile))
        for topic, risk in itertools.product((None, *TOPICS), (0.1, HIGH_CHURN_RISK + 0.1)):
            choices.append(choose_step(profile, "analytics_fast", risk, topic))
    return choices


def test_builtin_choices_cover_every_step() -> None:
    assert {c.step_id for c in builtin_choices()} == set(CATALOG_STEPS)


def test_shipped_catalog_is_complete_and_uses_only_variables_the_rules_provide() -> None:
    catalog = TemplateCatalog.load(DEFAULT_TEMPLATE_DIR)
    provided = set().union(*(c.template_vars for c in builtin_choices()))
    assert provided == {"steps_left", "segment", "top_topic"}
    assert catalog.check(provided) == []
    for variant in ("eu", "tutorial"):
        assert ("welcome_tour", variant) in catalog.templates
    assert ("concierge_call", "high_touch") in catalog.templates


def test_every_builtin_decision_renders_without_gaps() -> None:
    catalog = TemplateCatalog.load(DEFAULT_TEMPLATE_DIR)
    for choice in builtin_choices():
        content = catalog.render(choice.step_id, choice.content_variant, choice.template_vars)
        assert content.missing_variables == (), (choice, content)
        assert content.text.strip() and "{{" not in content.text and "\n\n" not in content.text, content
        assert content.text.count("\n") <= 2, content.text  # 1-3 lines of copy


@pytest.mark.parametrize("key", sorted(TemplateCatalog.load(DEFAULT_TEMPLATE_DIR).templates))
def test_every_shipped_template_renders_with_the_full_builtin_variables(key: tuple[str, str]) -> None:
    step, variant = key
    catalog = TemplateCatalog.load(DEFAULT_TEMPLATE_DIR)
    full = {"steps_left": "4", "segment": "analytics_fast", "top_topic": "analytics"}
    content = catalog.render(step, variant, full)
    assert (content.variant, content.missing_variables) == (variant, ())
    assert 0 < len(content.text) and content.text.count("\n") <= 2


# --- rules preview ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated_events() -> list[dict]:
    events, _truths = generate(3, seed=1, start_ms=1_780_000_000_000)
    return events


def one_user_file(tmp_path: Path, events: list[dict], n: int | None = None) -> tuple[Path, str]:
    user_id = events[0]["user_id"]
    mine = [e for e in events if e["user_id"] == user_id][:n]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(list(reversed(mine))))  # out of order on purpose: preview sorts by event time
    return path, user_id


def test_preview_replays_a_users_events_and_renders_their_next_step(
    tmp_path: Path, generated_events: list[dict]
) -> None:
    path, user_id = one_user_file(tmp_path, generated_events, n=4)
    result = preview(path, DEFAULT_TEMPLATE_DIR)
    assert (result["source"], result["user_id"], result["events_replayed"]) == ("events", user_id, 4)
    decision, content = result["decision"], result["content"]
    assert decision["step_id"] in CATALOG_STEPS and decision["personalized"] is False  # no bundle: default flow
    assert decision["template_vars"].get("steps_left") or decision["step_id"] == "none"
    assert content["text"].strip() and content["missing_variables"] == []
    json.dumps(result)  # the CLI can print it as JSON
    shown = format_preview(result)
    assert user_id in shown and decision["step_id"] in shown and content["text"].splitlines()[0] in shown


def test_preview_of_a_whole_history_after_onboarding(tmp_path: Path, generated_events: list[dict]) -> None:
    path, _user_id = one_user_file(tmp_path, generated_events)
    result = preview(path, DEFAULT_TEMPLATE_DIR)
    assert result["content"]["text"].strip()


def test_preview_of_a_ready_decision_shows_the_fallback_variant(tmp_path: Path) -> None:
    path = tmp_path / "decision.json"
    path.write_text(json.dumps({"step_id": "connect_data", "content_variant": "integrations_fast",
                                "template_vars": {"steps_left": "3", "top_topic": "integrations"}}))
    result = preview(path, DEFAULT_TEMPLATE_DIR)
    assert result["source"] == "decision" and result["events_replayed"] == 0
    assert result["content"]["variant"] == "default"
    assert "integrations" in result["content"]["text"]
    assert "no template of its own: rendered default" in format_preview(result)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", ":1: not valid JSON"),
        ("[]", "the event list is empty"),
        ('[{"user_id": "u"}]', "event #0 lacks event_id, event_type, event_time"),
        ('{"content_variant": "x"}', "has no step_id"),
        ('"hello"', "got a JSON str"),
    ],
)
def test_preview_rejects_bad_profile_files_with_the_reason(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PreviewError, match=str(path).replace(".", r"\.")) as info:
        preview(path, DEFAULT_TEMPLATE_DIR)
    assert fragment in str(info.value)


def test_preview_refuses_events_of_several_users(tmp_path: Path, generated_events: list[dict]) -> None:
    path = tmp_path / "all.json"
    path.write_text(json.dumps(generated_events))
    with pytest.raises(PreviewError, match="events of 3 users"):
        preview(path, DEFAULT_TEMPLATE_DIR)


def test_preview_after_erasure_shows_nothing_personal(tmp_path: Path, generated_events: list[dict]) -> None:
    path, user_id = one_user_file(tmp_path, generated_events, n=4)
    events = json.loads(path.read_text())
    last = max(e["event_time"] for e in events)
    events.append({**events[0], "event_id": "erase-1", "event_type": "erasure_requested", "event_time": last + 1})
    path.write_text(json.dumps(events))
    result = preview(path, DEFAULT_TEMPLATE_DIR)
    assert (result["decision"]["step_id"], result["decision"]["content_variant"]) == ("none", "erased")
    assert result["content"]["variant"] == "default" and result["content"]["text"]


@dataclass
class FixedScorer:
    """Stands in for a model bundle: every user is in one segment, with one churn risk."""

    churn_risk: float
    version: str = "m-test"

    def score(self, features: list[float]) -> Scores:
        return Scores(3, "integrations_fast", self.churn_risk)


@pytest.mark.parametrize(("churn_risk", "step"), [(0.05, None), (0.95, "concierge_call")])
def test_preview_with_a_model_personalizes(tmp_path: Path, generated_events: list[dict], churn_risk: float,
                                           step: str | None) -> None:
    path, _user_id = one_user_file(tmp_path, generated_events, n=6)
    result = preview(path, DEFAULT_TEMPLATE_DIR, bundle=FixedScorer(churn_risk))
    decision, content = result["decision"], result["content"]
    assert decision["personalized"] is True and decision["model_version"] == "m-test"
    assert decision["template_vars"]["segment"] == decision["segment_name"] == "integrations_fast"
    assert step is None or (decision["step_id"], content["variant"]) == (step, "high_touch")
    assert content["text"].strip() and content["missing_variables"] == []
    assert "churn risk" in format_preview(result)
