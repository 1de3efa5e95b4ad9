"""An :class:`~experiments.analysis.ExperimentReport` rendered for people: a terminal table, a self-contained HTML
file (inline CSS, plots as base64 PNG, no network needed to open it) and a PNG of the main chart for sharing.

Plots use matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from experiments.analysis import METRIC_LABELS, METRICS, PRIMARY, ExperimentReport, MetricResult
from experiments.stats import Interval

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
_RATE_METRICS = {PRIMARY}


# ----------------------------------------------------------------------------------------------- numbers as text


def _num(value: float, metric: str = "", signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if metric in _RATE_METRICS:
        return f"{value * 100:+.2f} pts" if signed else f"{value * 100:.2f}%"
    spec = "+,.3g" if signed else ",.3g"
    if abs(value) >= 1000:
        spec = "+,.0f" if signed else ",.0f"
    return format(value, spec)


def _interval(ci: Interval, metric: str = "") -> str:
    if not (math.isfinite(ci.low) and math.isfinite(ci.high)):
        return "-"
    if metric in _RATE_METRICS:
        return f"[{ci.low * 100:.2f}, {ci.high * 100:.2f}]"
    return f"[{_num(ci.low)}, {_num(ci.high)}]"


def _p(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value * 100:+.1f}%"


def _day(ms: int | None) -> str:
    return "-" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows])


def _arm_rows(report: ExperimentReport) -> tuple[list[str], list[list[str]]]:
    level = f"{(1 - report.alpha) * 100:g}%"
    header = ["ARM", "USERS", "SHARE (EXPECTED)", f"COMPLETION ({level} CI)"] + [
        METRIC_LABELS[m].upper() for m, _ in METRICS[1:]]
    rows = []
    for arm in report.arms:
        completion = arm.metrics[PRIMARY]
        rows.append([
            arm.arm + (" (baseline)" if arm.arm == report.baseline else ""),
            f"{arm.users:,}",
            f"{arm.share * 100:.1f}% ({arm.expected_share * 100:.1f}%)" if math.isfinite(arm.share) else "-",
            f"{_num(completion.value, PRIMARY)} {_interval(completion.ci, PRIMARY)}",
        ] + [f"{_num(arm.metrics[m].value)} {_interval(arm.metrics[m].ci)} n={arm.metrics[m].n:,}"
             for m, _ in METRICS[1:]])
    return header, rows


def _result_rows(report: ExperimentReport) -> tuple[list[str], list[list[str]]]:
    header = ["METRIC", "ARM", "DIFF", "CI", "LIFT", "TEST", "P", "P HOLM", "SIG", "ALWAYS-VALID CI"]
    rows = []
    for r in report.results:
        c = r.cuped.comparison if r.cuped else r.comparison
        rows.append([
            METRIC_LABELS[r.metric] + (" *" if r.family == "primary" else ""), r.arm, _num(c.diff, r.metric, True),
            _interval(c.ci, r.metric), _pct(r.relative_lift), c.test, _p(c.p_value), _p(r.p_adjusted),
            "yes" if r.significant else "no", _interval(r.sequential.ci, r.metric),
        ])
    return header, rows


def _srm_line(report: ExperimentReport) -> str:
    srm = report.srm
    if not math.isfinite(srm.p_value):
        return "sample-ratio check: no users yet"
    state = "FLAGGED: the split does not match the weights" if srm.flagged else "ok"
    return (f"sample-ratio check: chi-square = {srm.statistic:.2f}, p = {srm.p_value:.3g} "
            f"(flagged below {srm.threshold:g}): {state}")


def _bayes_lines(report: ExperimentReport) -> list[str]:
    lines = []
    for arm, b in report.bayes.items():
        lines.append(f"P({arm} beats {report.baseline}) = {b.prob_beats_baseline * 100:.1f}%; expected loss if "
                     f"choosing {arm}: {b.expected_loss_treatment * 100:.3f} pts, if keeping {report.baseline}: "
                     f"{b.expected_loss_baseline * 100:.3f} pts; {(1 - report.alpha) * 100:g}% credible interval of "
                     f"the difference {_interval(b.diff_credible, PRIMARY)} pts")
    return lines


def _cuped_lines(report: ExperimentReport) -> list[str]:
    lines = []
    for r in report.results:
        if r.cuped:
            raw = r.comparison
            lines.append(f"{r.arm}: variance -{r.cuped.variance_reduction * 100:.1f}% (theta {r.cuped.theta:.3g}); "
                         f"diff {_num(r.cuped.comparison.diff, signed=True)} {_interval(r.cuped.comparison.ci)} "
                         f"vs unadjusted {_num(raw.diff, signed=True)} {_interval(raw.ci)} ({raw.test}, "
                         f"p {_p(raw.p_value)})")
    return lines


def format_report(report: ExperimentReport) -> str:
    """The terminal version: arms, comparisons, SRM, Bayesian and CUPED lines, verdict, warnings."""
    level = f"{(1 - report.alpha) * 100:g}%"
    parts = [
        f"experiment {report.experiment_id}: {report.description}".rstrip(": "),
        f"{report.total_users:,} users exposed {_day(report.first_exposure_ms)}..{_day(report.last_exposure_ms)}; "
        f"baseline '{report.baseline}'; alpha {report.alpha:g}; intervals {level}",
        _srm_line(report),
        "",
        _table(*_arm_rows(report)),
        "",
        _table(*_result_rows(report)),
        "  * primary metric. P HOLM: Holm-adjusted within the primary and within the secondary metrics. "
        "ALWAYS-VALID CI: valid at any look (sequential).",
        "",
        "Bayesian (completion, Beta(1,1) prior):",
        *[f"  {line}" for line in _bayes_lines(report)],
    ]
    if _cuped_lines(report):
        parts += ["CUPED (engagement, pre-exposure engagement as covariate):",
                  *[f"  {line}" for line in _cuped_lines(report)]]
    parts += ["", f"verdict: {report.verdict}"]
    parts += [f"warning: {w}" for w in report.warnings]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- charts


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def rates_figure(report: ExperimentReport) -> Figure:
    """The main chart: completion rate per arm with its confidence interval, the baseline's as a band."""
    fig = Figure(figsize=(8, 1.3 + 0.55 * len(report.arms)), dpi=110)
    ax = fig.add_subplot()
    arms = list(report.arms)
    for i, arm in enumerate(arms):
        m = arm.metrics[PRIMARY]
        if not math.isfinite(m.value):
            continue
        ax.errorbar([m.value * 100], [i], xerr=[[(m.value - m.ci.low) * 100], [(m.ci.high - m.value) * 100]],
                    fmt="o", color=_color(i), capsize=5, markersize=7)
        ax.annotate(f"{m.value * 100:.1f}%  (n={arm.users:,})", (m.ci.high * 100, i), xytext=(6, -3),
                    textcoords="offset points", fontsize=8)
        if arm.arm == report.baseline:
            ax.axvspan(m.ci.low * 100, m.ci.high * 100, color="#999999", alpha=0.15)
    ax.set_yticks(range(len(arms)), [a.arm + (" (baseline)" if a.arm == report.baseline else "") for a in arms],
                  fontsize=8)
    ax.set_ylim(-0.7, len(arms) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel(f"onboarding completion rate, % ({(1 - report.alpha) * 100:g}% Wilson interval)")
    ax.set_title(textwrap.fill(f"{report.experiment_id}: {report.verdict}", 100), fontsize=9)
    ax.margins(x=0.25)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def cumulative_figure(report: ExperimentReport) -> Figure:
    """Cumulative completion rate per arm by day of exposure (left) and each arm's difference to the baseline
    with its always-valid interval (right): what a team looking every day would have seen."""
    fig = Figure(figsize=(11, 3.8), dpi=100)
    left, right = fig.subplots(1, 2)
    days = sorted({p.day for p in report.daily})
    x = {d: i for i, d in enumerate(days)}
    for i, arm in enumerate(report.arms):
        points = [p for p in report.daily if p.arm == arm.arm and p.users]
        xs = [x[p.day] for p in points]
        left.plot(xs, [p.rate * 100 for p in points], color=_color(i), label=arm.arm, marker=".")
        left.fill_between(xs, [p.ci.low * 100 for p in points], [p.ci.high * 100 for p in points], color=_color(i),
                          alpha=0.15)
        if arm.arm != report.baseline:
            diffs = [p for p in points if math.isfinite(p.diff)]
            xd = [x[p.day] for p in diffs]
            right.plot(xd, [p.diff * 100 for p in diffs], color=_color(i), label=arm.arm, marker=".")
            right.fill_between(xd, [p.diff_sequential.low * 100 for p in diffs],
                               [p.diff_sequential.high * 100 for p in diffs], color=_color(i), alpha=0.15)
    right.axhline(0, color="black", linewidth=0.8)
    ticks = list(range(0, len(days), max(1, len(days) // 7)))
    for ax, title, label in ((left, "cumulative completion rate", "% completed (Wilson interval)"),
                             (right, f"difference to '{report.baseline}'", "points (always-valid interval)")):
        ax.set_xticks(ticks, [days[t][5:] for t in ticks], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlabel("day of exposure (UTC)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_png(report: ExperimentReport, path: str | Path) -> Path:
    """The main chart (rates with intervals per arm) as a PNG file, for sharing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(rates_figure(report)))
    return path


# ----------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:.6em 0} td,th{padding:3px 9px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child,td.l{text-align:left} th{background:#f5f5f5}
.verdict{font-size:1.1em;padding:.6em 1em;background:#eef5ee;border-left:4px solid #55a868}
.bad{background:#fbeeee;border-left-color:#c44e52} .warn{color:#a15c00} .muted{color:#777;font-size:12px}
img{max-width:100%}
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(fig: Figure, alt: str) -> str:
    data = base64.b64encode(_png_bytes(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(report: ExperimentReport) -> str:
    """The whole report as one HTML document with the plots inlined (opens offline, attach it anywhere)."""
    e = html.escape
    bad = report.srm.flagged or any(r.significant and r.comparison.diff < 0 for r in report.results
                                    if r.family == "primary")
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Experiment {e(report.experiment_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Experiment {e(report.experiment_id)}</h1>",
        f"<p>{e(report.description)}</p>" if report.description else "",
        f"<p class='muted'>{report.total_users:,} users exposed {_day(report.first_exposure_ms)} to "
        f"{_day(report.last_exposure_ms)} &middot; baseline <b>{e(report.baseline)}</b> &middot; alpha "
        f"{report.alpha:g} &middot; generated {generated}</p>",
        f"<p class='verdict{' bad' if bad else ''}'>{e(report.verdict)}</p>",
        *[f"<p class='warn'>&#9888; {e(w)}</p>" for w in report.warnings],
        "<h2>Completion rate by arm</h2>", _img(rates_figure(report), "completion rate per arm"),
        "<h2>Arms</h2>", _html_table(*_arm_rows(report)),
        f"<p>{e(_srm_line(report))}</p>",
        "<h2>Comparisons with the baseline</h2>", _html_table(*_result_rows(report)),
        "<p class='muted'>* primary metric. DIFF is arm minus baseline (completion in percentage points). TEST: "
        "chi-square for rates; Welch's t, or Mann-Whitney U when a sample is skewed; engagement uses CUPED when a "
        "pre-exposure covariate is available. P HOLM: Holm-adjusted within the primary and within the secondary "
        "metrics. ALWAYS-VALID CI: a confidence sequence that stays valid however often you look.</p>",
        "<h2>Bayesian view (completion)</h2>",
        "<ul>" + "".join(f"<li>{e(line)}</li>" for line in _bayes_lines(report)) + "</ul>",
    ]
    if _cuped_lines(report):
        parts += ["<h2>CUPED (engagement)</h2>",
                  "<ul>" + "".join(f"<li>{e(line)}</li>" for line in _cuped_lines(report)) + "</ul>"]
    if report.daily:
        parts += ["<h2>Over time</h2>", _img(cumulative_figure(report), "cumulative completion over time")]
    parts += ["<p class='muted'>How to read this report: docs/experiments.md</p></body></html>"]
    return "\n".join(p for p in parts if p)


def write_html(report: ExperimentReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path


def report_json(report: ExperimentReport) -> dict[str, Any]:
    return report.to_dict()
