"""A self-contained HTML report of a study. Computed as plain data first, then drawn (plotly).

The page embeds plotly.js and links nothing, so it opens offline: no script, style or image is
fetched from the network. The scatter matrix and the hypervolume plot are SVG (every point is
an element, readable without WebGL); the parallel coordinates need WebGL, as plotly draws them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from nas_fair.postprocess import DISPARATE_TREATMENT
from nas_fair.search._optuna import compute_hypervolume
from nas_fair.search.fidelity import at_top, fidelity_of
from nas_fair.search.front import pareto_front
from nas_fair.search.records import ReferenceRecord, TrialRecord
from nas_fair.search.table import NEEDS_GROUP_NOTE, status_note, trial_constraints, violated

# Each trial is drawn in one of these groups; the table sorts them in this order too.
GROUPS = {
    "front": {"label": "Pareto front (feasible)", "color": "#1f77b4", "symbol": "circle"},
    "dominated": {"label": "dominated (feasible)", "color": "#c7c7c7", "symbol": "circle"},
    "infeasible": {"label": "infeasible or collapsed", "color": "#ff7f0e", "symbol": "x"},
    # multi-fidelity: scored after a shorter recovery than the top rung's, so provisional
    "lower rung": {"label": "lower rung (provisional)", "color": "#aec7e8",
                   "symbol": "circle-open"},
}
REFERENCE_STYLE = {"label": "reference (uncompressed)", "color": "#d62728", "symbol": "star"}


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume (minimization) dominated by ``points`` and bounded by ``ref``.

    Optuna's exact WFG implementation; points outside the reference box contribute nothing.
    """
    pts = points[np.all(points < ref, axis=1)]
    return compute_hypervolume(pts, ref) if len(pts) else 0.0


def normalized(values: np.ndarray, reference: list[float], dirs: list[str]) -> np.ndarray:
    """Objectives as ratios to the reference model, all turned into 'lower is better'."""
    out = np.empty_like(values, dtype=float)
    for j, d in enumerate(dirs):
        ref = reference[j] if reference[j] else 1.0
        out[:, j] = values[:, j] / ref if d == "minimize" else 2.0 - values[:, j] / ref
    return out


HV_REFERENCE_POINT = 2.0  # every normalized objective: twice the reference model's (or half)


def report_data(study: optuna.Study, dirs: list[str], names: list[str]) -> dict[str, Any]:
    reference = ReferenceRecord.from_study(study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values is not None]
    front = {t.number for t in pareto_front(complete, dirs)}
    trials = []
    for t in complete:
        cons = trial_constraints(t)
        bad = violated(cons)
        rec = TrialRecord.from_trial(t)
        collapsed = rec.collapsed
        feasible = not bad
        final = at_top(t)
        row = {
            "number": t.number,
            "values": list(t.values),
            "params": t.params,
            "constraints": cons,
            "violated": bad,
            "feasible": feasible,
            "collapsed": collapsed,
            "on_front": t.number in front,
            "group": ("front" if t.number in front else "lower rung" if not final
                      else "dominated" if feasible else "infeasible"),
            "rung": fidelity_of(t)["rung"] if rec.fidelity is not None else None,
            "final": final,
            "bias_ci": rec.bias_ci,
            "disparity": rec.disparity,
            "class_rates": rec.class_rates if t.number in front else None,
            "needs_group": bool(rec.postprocess),
        }
        row["note"] = status_note(row)
        trials.append(row)
    hv = []
    if trials:
        vals = np.array([t["values"] for t in trials], dtype=float)
        norm = normalized(vals, reference.values, dirs)
        ref_pt = np.full(len(dirs), HV_REFERENCE_POINT)
        # lower-rung scores are provisional: only final results count
        feasible = np.array([t["feasible"] and t["final"] for t in trials])
        for k in range(1, len(trials) + 1):
            pts = norm[:k][feasible[:k]]
            hv.append(hypervolume(pts, ref_pt) if len(pts) else 0.0)
    return {"study": study.study_name, "names": names, "directions": dirs,
            "reference": reference.values, "reference_bias_ci": reference.bias_ci,
            "reference_class_rates": reference.class_rates,
            "trials": trials, "hypervolume": hv, "hv_reference_point": HV_REFERENCE_POINT}


def table_order(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Feasible first: the front (smallest first), the dominated, then the infeasible."""
    rank = {g: i for i, g in enumerate(GROUPS)}
    return sorted(trials, key=lambda t: (rank[t["group"]], t["values"][0], t["number"]))


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _hover(data: dict[str, Any], label: str, values: list[float], note: str) -> str:
    ref = data["reference"]
    lines = [label]
    for n, v, r in zip(data["names"], values, ref):
        lines.append(f"{n}: {_fmt(v)}" + (f" ({v / r:.2f}x)" if r else ""))
    if note:
        lines.append(note)
    return "<br>".join(html.escape(x) for x in lines)


def _matrix(data: dict[str, Any]):  # noqa: ANN202
    """The four objectives pairwise (lower triangle), one legend entry per group."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = data["names"]
    k = len(names)
    specs = [[{} if c <= r else None for c in range(k - 1)] for r in range(k - 1)]
    fig = make_subplots(rows=k - 1, cols=k - 1, specs=specs, shared_xaxes=True,
                        shared_yaxes=True, horizontal_spacing=0.03, vertical_spacing=0.03)
    groups = [(g, style, [t for t in data["trials"] if t["group"] == g])
              for g, style in GROUPS.items()]
    ref_row = {"values": data["reference"], "number": None}
    groups.append(("reference", REFERENCE_STYLE, [ref_row]))
    for r in range(1, k):  # y objective
        for c in range(r):  # x objective
            for g, style, rows in groups:
                if not rows:
                    continue
                first = (r, c) == (1, 0)
                fig.add_trace(go.Scatter(
                    x=[t["values"][c] for t in rows], y=[t["values"][r] for t in rows],
                    mode="markers", name=style["label"], legendgroup=g, showlegend=first,
                    marker=dict(color=style["color"], symbol=style["symbol"],
                                size=14 if g == "reference" else 9,
                                line=dict(width=0.5, color="#333")),
                    hovertext=[_hover(data, "reference" if t["number"] is None
                                      else f"trial {t['number']}", t["values"],
                                      t.get("note", "")) for t in rows],
                    hoverinfo="text",
                ), row=r, col=c + 1)
    arrows = {"minimize": "lower is better", "maximize": "higher is better"}
    for c in range(k - 1):
        fig.update_xaxes(title_text=f"{names[c]} ({arrows[data['directions'][c]]})",
                         row=k - 1, col=c + 1)
    for r in range(1, k):
        fig.update_yaxes(title_text=f"{names[r]}<br>({arrows[data['directions'][r]]})",
                         row=r, col=1)
    fig.update_layout(title="Objectives: Pareto front (blue), dominated (grey), "
                            "infeasible or collapsed (orange x), reference (red star)",
                      height=780, legend=dict(orientation="h", y=1.06, x=0))
    return fig


def _parcoords(data: dict[str, Any]):  # noqa: ANN202
    import plotly.graph_objects as go

    trials = data["trials"]
    param_names = sorted({k for t in trials for k in t["params"]})
    if not trials or not param_names:
        return None
    dims = []
    for p in param_names:
        vals = [t["params"].get(p) for t in trials]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            dims.append(dict(label=p, values=vals))
        else:
            cats = sorted({str(v) for v in vals})
            dims.append(dict(label=p, values=[cats.index(str(v)) for v in vals],
                             tickvals=list(range(len(cats))), ticktext=cats))
    for j, n in enumerate(data["names"]):
        dims.append(dict(label=n, values=[t["values"][j] for t in trials]))
    code = {"infeasible": 0.0, "lower rung": 0.5, "dominated": 0.5, "front": 1.0}
    fig = go.Figure(go.Parcoords(
        dimensions=dims, labelangle=-30, labelside="top",
        line=dict(color=[code[t["group"]] for t in trials], cmin=0, cmax=1,
                  colorscale=[[0, GROUPS["infeasible"]["color"]],
                              [0.5, GROUPS["dominated"]["color"]],
                              [1, GROUPS["front"]["color"]]]),
    ))
    fig.update_layout(title=dict(text="Search parameters and objectives: Pareto front (blue), "
                                      "dominated (grey), infeasible (orange)", y=0.98,
                                 yanchor="top"),
                      height=600, margin=dict(t=230, l=60, r=60))
    return fig


def _hv_figure(data: dict[str, Any]):  # noqa: ANN202
    import plotly.graph_objects as go

    hv = data["hypervolume"]
    fig = go.Figure(go.Scatter(x=list(range(1, len(hv) + 1)), y=hv, mode="lines+markers",
                               name="hypervolume"))
    fig.update_layout(title=f"Hypervolume of the feasible front over trials (objectives as ratios "
                            f"to the reference, reference point {data['hv_reference_point']})",
                      xaxis_title="completed trials", yaxis_title="hypervolume", height=400)
    return fig


# At most this many front models in the disparity view (the smallest first), so bars stay legible.
DISPARITY_MODELS = 12
GROUP_COLORS = ("#9467bd", "#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def disparity_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The feasible front's models with a per-group record, smallest first (the view's bars)."""
    rows = [t for t in data["trials"] if t["group"] == "front" and t.get("disparity")]
    return sorted(rows, key=lambda t: (t["values"][0], t["number"]))[:DISPARITY_MODELS]


def _disparity_figure(data: dict[str, Any]):  # noqa: ANN202
    """Hooker et al.'s question, per group: whose test examples did compression change?"""
    import plotly.graph_objects as go

    rows = disparity_rows(data)
    if not rows:
        return None
    x = [f"trial {t['number']}" for t in rows]
    groups = sorted({g for t in rows for g in t["disparity"]})
    fig = go.Figure()
    for i, g in enumerate(groups):
        color = GROUP_COLORS[i % len(GROUP_COLORS)]
        cells = [t["disparity"].get(g) or {} for t in rows]
        hover = [f"group {g} (n={c.get('n', 0)})<br>changed: {100 * c.get('flipped', 0):.1f}%"
                 f"<br>right to wrong: {100 * c.get('newly_wrong', 0):.1f}%"
                 f"<br>wrong to right: {100 * c.get('newly_right', 0):.1f}%" for c in cells]
        fig.add_trace(go.Bar(x=x, y=[100 * c.get("newly_wrong", 0) for c in cells],
                             name=f"{g}: right to wrong", offsetgroup=g, marker_color=color,
                             hovertext=hover, hoverinfo="text"))
        fig.add_trace(go.Bar(x=x, y=[-100 * c.get("newly_right", 0) for c in cells],
                             name=f"{g}: wrong to right", offsetgroup=g, marker_color=color,
                             marker_pattern_shape="/", opacity=0.6, hovertext=hover,
                             hoverinfo="text"))
    fig.update_layout(
        title="Who paid for compression (Hooker et al.): % of each group's test examples that "
              "went right to wrong (up) or wrong to right (down) against the reference; "
              "feasible Pareto models, smallest first",
        barmode="group", height=450, yaxis_title="% of the group's examples",
        title_font_size=13)
    return fig


def class_rate_models(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, per-class rates) of the reference and the feasible front's models, smallest
    first (at most DISPARITY_MODELS of them): what the per-class views draw."""
    out = []
    if data.get("reference_class_rates"):
        out.append(("reference", data["reference_class_rates"]))
    rows = [t for t in data["trials"] if t["group"] == "front" and t.get("class_rates")]
    rows = sorted(rows, key=lambda t: (t["values"][0], t["number"]))[:DISPARITY_MODELS]
    return out + [(f"trial {t['number']}", t["class_rates"]) for t in rows]


def _model_color(i: int, label: str) -> str:
    return REFERENCE_STYLE["color"] if label == "reference" else GROUP_COLORS[i % len(GROUP_COLORS)]


def _class_gap_figure(data: dict[str, Any]):  # noqa: ANN202
    """Where the gap lies: each class's TPR gap between groups, front models against the
    reference, with 95% bootstrap intervals."""
    import plotly.graph_objects as go

    models = class_rate_models(data)
    if not models:
        return None
    fig = go.Figure()
    for i, (label, rates) in enumerate(models):
        rows = rates["classes"]
        gap = [r["gap"] for r in rows]
        lo = [r["gap_ci"][0] for r in rows]
        hi = [r["gap_ci"][1] for r in rows]
        hover = [f"{label}, {r['name']}<br>gap {_fmt(r['gap']) if r['gap'] is not None else 'n/a'}"
                 + "".join(f"<br>TPR {g}: {_fmt(v) if v is not None else 'n/a'} "
                           f"(n={r['n'].get(g, 0)})" for g, v in r["tpr"].items())
                 for r in rows]
        fig.add_trace(go.Bar(
            x=[r["name"] for r in rows], y=gap, name=label, hovertext=hover, hoverinfo="text",
            marker_color=_model_color(i, label),
            error_y=dict(type="data", symmetric=False,
                         array=[None if h is None or g is None else h - g
                                for g, h in zip(gap, hi)],
                         arrayminus=[None if v is None or g is None else g - v
                                     for g, v in zip(gap, lo)])))
    fig.update_layout(
        title=f"Per-class TPR gap ({models[0][1]['gap_definition']}) with 95% bootstrap "
              "intervals: the reference and the feasible Pareto models, smallest first",
        barmode="group", height=450, yaxis_title="TPR gap", title_font_size=13)
    return fig


def _share_figure(data: dict[str, Any]):  # noqa: ANN202
    """De-Arteaga et al. 2019: each class's gap against the group's share of that class in the
    training split, with Pearson's r per model."""
    import plotly.graph_objects as go

    models = [(label, rates) for label, rates in class_rate_models(data)
              if (rates.get("training_share") or {}).get("points")]
    if not models:
        return None
    fig = go.Figure()
    for i, (label, rates) in enumerate(models):
        view = rates["training_share"]
        r, ci = view.get("r"), view.get("r_ci") or [None, None]
        r_text = "n/a" if r is None else _fmt(r) + (
            f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci[0] is not None else "")
        pts = view["points"]
        fig.add_trace(go.Scatter(
            x=[p["share"] for p in pts], y=[p["gap"] for p in pts], mode="markers",
            name=f"{label}: r = {r_text}", text=[p["name"] for p in pts],
            hovertemplate="%{text}<br>share %{x:.3f}<br>gap %{y:.3f}",
            marker=dict(color=_model_color(i, label), size=12 if label == "reference" else 8,
                        symbol="star" if label == "reference" else "circle")))
    group = models[0][1]["training_share"]["group"]
    fig.update_layout(
        title=f"Per-class TPR gap against the share of group {group} among the class's "
              "training examples (De-Arteaga et al. 2019); r: Pearson over classes, "
              "Fisher-z 95% interval",
        xaxis_title=f"share of {group} in the class's training examples",
        yaxis_title="TPR gap", height=450, title_font_size=13)
    return fig


def draw(data: dict[str, Any], audit: dict[str, Any] | None = None) -> str:
    figs = [_matrix(data), _parcoords(data), _hv_figure(data), _disparity_figure(data),
            _class_gap_figure(data), _share_figure(data)]
    figs = [f for f in figs if f is not None]
    config = {"displaylogo": False}  # the logo is a link to plotly.com
    parts = [f.to_html(include_plotlyjs=(i == 0), full_html=False, config=config)
             for i, f in enumerate(figs)]
    if audit is not None:
        parts = [audit_lead(audit), *parts, audit_details(audit)]
    return _page(data, parts)


def _summary(data: dict[str, Any]) -> str:
    trials = data["trials"]
    count = {g: sum(t["group"] == g for t in trials) for g in GROUPS}
    collapsed = sum(t["collapsed"] for t in trials)
    needs = sum(bool(t.get("needs_group")) for t in trials)
    return (f"{len(trials)} completed trials: {count['front']} on the feasible Pareto front, "
            f"{count['dominated']} dominated, {count['infeasible']} infeasible "
            f"({collapsed} collapsed)"
            + (f", {count['lower rung']} scored at a lower rung (provisional: a shorter "
               "recovery)" if count["lower rung"] else "")
            + ". Infeasible and lower-rung trials never count for the front or the "
            "hypervolume; the table lists feasible trials first."
            + (f" {needs} marked '{NEEDS_GROUP_NOTE}': {DISPARATE_TREATMENT}." if needs else ""))


def _page(data: dict[str, Any], parts: list[str]) -> str:
    names = data["names"]
    ref = data["reference"]
    cols = ["trial", *names, f"{names[-1]} 95% CI", "status", "params"]
    head = "".join(f"<th onclick='sortBy({i})'>{html.escape(h)}</th>" for i, h in enumerate(cols))

    def ci_cell(ci: list[float | None] | None) -> str:
        if not ci or ci[0] is None:
            return "<td></td>"
        return f"<td data-v='{ci[1]}'>[{_fmt(ci[0])}, {_fmt(ci[1])}]</td>"

    def value_cells(values: list[float]) -> str:
        return "".join(f"<td data-v='{v}'>{_fmt(v)}"
                       + (f" <span class='r'>({v / r:.2f}x)</span>" if r else "") + "</td>"
                       for v, r in zip(values, ref))

    ref_row = (f"<tr class='ref'><td>ref</td>{value_cells(ref)}"
               f"{ci_cell(data.get('reference_bias_ci'))}<td>reference (uncompressed)</td>"
               "<td></td></tr>")
    rank = {g: i for i, g in enumerate(GROUPS)}
    rows = []
    for t in table_order(data["trials"]):
        status = {"front": "Pareto front", "dominated": "dominated",
                  "lower rung": f"rung {t.get('rung')} (provisional)"}.get(t["group"], t["note"])
        if t.get("needs_group"):
            status += f"; {NEEDS_GROUP_NOTE}"
        params = html.escape(json.dumps(t["params"]))
        rows.append(f"<tr class='{t['group']}'><td data-v='{t['number']}'>{t['number']}</td>"
                    f"{value_cells(t['values'])}{ci_cell(t['bias_ci'])}"
                    f"<td data-v='{rank[t['group']]}'>{html.escape(status)}</td>"
                    f"<td class='p'>{params}</td></tr>")
    title = html.escape(f"nas-fair report: {data['study']}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}}th{{cursor:pointer}}
tr.ref{{background:#fde0dc}}tr.front{{background:#e3eefa}}tr.infeasible{{background:#fff0e0;
color:#8a5a2b}}.r{{color:#777}}td.p{{font-family:monospace;font-size:11px}}</style>
</head><body><h1>{title}</h1>
<p id="summary">{html.escape(_summary(data))}</p>
{''.join(parts)}
<h2>Trials (click a header to sort; feasible first)</h2>
<table id="trials"><thead><tr>{head}</tr></thead><tbody class="refrow">{ref_row}</tbody>
<tbody class="rows">{''.join(rows)}</tbody></table>
<script>
function sortBy(col){{const tb=document.querySelector('#trials tbody.rows');
const rows=[...tb.rows];const asc=!(tb.dataset.col==String(col)&&tb.dataset.dir=='asc');
const key=r=>{{const c=r.cells[col];const v=c.dataset.v;
return v===undefined||v===''?c.textContent:parseFloat(v)}};
rows.sort((a,b)=>{{const x=key(a),y=key(b);
const c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
return asc?c:-c}});rows.forEach(r=>tb.appendChild(r));tb.dataset.col=col;
tb.dataset.dir=asc?'asc':'desc'}}
</script></body></html>"""


def write_report(study: optuna.Study, dirs: list[str], names: list[str], out: Path, *,
                 audit: dict[str, Any] | None = None) -> Path:
    from nas_fair.io import atomic_write_text

    if audit is not None and audit["cie"].get("examples") is not None:
        from nas_fair.search.audit import cie_csv

        atomic_write_text(cie_file(out), cie_csv(audit["cie"]))
    elif audit is not None and cie_file(out).is_file() and not cie_file(out).is_symlink():
        cie_file(out).unlink()  # an earlier report's examples must not pass for this one's
    # a unique temporary name: a fixed "<out>.tmp" could be a planted symlink
    return atomic_write_text(out, draw(report_data(study, dirs, names), audit))


# --------------------------------------------------------------------------- the bias audit

# The examples table in the page stops here (the CSV beside the report has them all).
CIE_ROWS_SHOWN = 2000


def cie_file(report: Path) -> Path:
    """The compression-identified examples' CSV, beside the report."""
    return report.with_name(f"{report.stem}-compression-identified.csv")


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(v: Any, fmt: str = ".3g") -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def _interval(lo: Any, hi: Any, fmt: str = ".3g") -> str:
    return f"[{_num(lo, fmt)}, {_num(hi, fmt)}]"


def _table(head: list[str], rows: list[list[str]], table_id: str = "") -> str:
    """A table of pre-escaped cells."""
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    ident = f" id='{table_id}'" if table_id else ""
    return (f"<table class='audit'{ident}><thead><tr>{h}</tr></thead><tbody>{body}</tbody>"
            "</table>")


def audit_lead(audit: dict[str, Any]) -> str:
    """The answer first: the headline, then each front model's paired bias difference to the
    reference, its accuracy interval and the command that exports it."""
    s = audit["summary"]
    rows = []
    for m in s["models"]:
        p = m["paired"]
        paired = "not recorded" if p is None else (
            f"{_num(p['diff'], '+.3g')} {_e(_interval(p['low'], p['high'], '+.3g'))}")
        verdict = {True: "not worse", False: "worse", None: "unknown"}[m["not_worse"]]
        acc_ci = m["accuracy_ci"] or [None, None]
        rows.append([
            _e(m["trial"]), _e(_num(m["size_mb"])), _e(_num(m["latency_ms"])),
            f"{_e(_num(m['accuracy']))} {_e(_interval(*acc_ci[:2]))}",
            f"{_e(_num(m['bias']))} {_e(_interval(*m['bias_ci']))}", paired, _e(verdict),
            f"<code>{_e(m['export'])}</code>" if m["export"] else ""])
    ref_ci = s.get("reference_accuracy_ci") or [None, None]
    head = ["trial", "size_mb", "latency_ms", "accuracy [95% CI]", f"{s['metric']} [95% CI]",
            "paired difference to the reference [95% CI]", "bias vs reference", "export"]
    sign = (" The metric is signed, so 'worse' means farther from 0 on the reference's side."
            if s["signed"] else "")
    return (f"<section id='answer'><h2>The answer</h2><p id='headline'><b>{_e(s['headline'])}"
            f"</b></p><p>Reference accuracy {_e(_num(s['reference_accuracy']))} "
            f"{_e(_interval(*ref_ci[:2]))}. 'Not worse': the paired 95% bootstrap interval of "
            f"the model's {_e(s['metric'])} minus the reference's (same resampled rows) reaches "
            f"0 or the better side.{_e(sign)} Feasible Pareto front, smallest first.</p>"
            + _table(head, rows) + "</section>")


def _metrics_section(audit: dict[str, Any]) -> str:
    """Every recorded bias metric of each front model, or why it does not apply."""
    names = audit["bias_metrics"]
    if not names or not audit["metric_rows"]:
        return ""
    ref = audit["reference_bias"]
    notes = audit["notes"]

    def cell(row: dict[str, Any] | None, note: str | None, paired: bool) -> str:
        if note:
            return f"<span class='na'>{_e(note)}</span>"
        if not row:
            return ""
        out = f"{_e(_num(row.get('value')))} {_e(_interval(row.get('ci_low'), row.get('ci_high')))}"
        if paired and row.get("diff") is not None:
            out += (f"<br><span class='r'>vs ref {_e(_num(row['diff'], '+.3g'))} "
                    f"{_e(_interval(row.get('diff_low'), row.get('diff_high'), '+.3g'))}</span>")
        return out

    rows = [["reference", *[cell(ref.get(n), notes["reference"].get(n), False) for n in names]]]
    for r in audit["metric_rows"]:
        rows.append([_e(f"trial {r['trial']}"),
                     *[cell(r["bias"].get(n), notes[r["trial"]].get(n), True) for n in names]])
    return ("<section id='metrics'><h2>Every recorded bias metric (value [95% CI]; paired "
            "difference to the reference [95% CI])</h2>" + _table(["model", *names], rows)
            + "</section>")


def _disparity_section(audit: dict[str, Any]) -> str:
    """Who paid, with Wilson intervals and the between-group test the trial stored."""
    rows = []
    for d in audit["disparity"]:
        stats = d.get("stats") or {}
        tests = stats.get("tests") or {}
        for g, share in sorted(d["shares"].items()):
            ci = (stats.get("groups") or {}).get(g) or {}
            cells = [_e(d["trial"]), _e(g), _e(share.get("n"))]
            for key in ("flipped", "newly_wrong", "newly_right"):
                lo, hi = (ci.get(key) or [None, None])[:2]
                v = share.get(key)
                cells.append(f"{_e(_num(None if v is None else 100 * v, '.1f'))}% "
                             f"{_e(_interval(None if lo is None else 100 * lo, None if hi is None else 100 * hi, '.1f'))}")
            cells += [_e(_num((tests.get(k) or {}).get("p_value"))) for k in
                      ("newly_wrong", "newly_right")]
            rows.append(cells)
    if not rows:
        return ""
    head = ["trial", "group", "n", "changed % [Wilson 95%]", "right to wrong %",
            "wrong to right %", "p (groups differ: right to wrong)",
            "p (groups differ: wrong to right)"]
    return ("<section id='disparity'><h2>Who paid for compression, with intervals</h2><p>Shares "
            "of each group's test rows whose prediction changed against the reference. p: "
            "permutation chi-square test (outcomes shuffled across rows, seeded) of equal shares "
            "in every group; a trial without intervals was scored by an older nas-fair.</p>"
            + _table(head, rows) + "</section>")


def _cie_section(audit: dict[str, Any]) -> str:
    """Compression-identified examples (Hooker et al. 2019): rates per group and the rows."""
    cie = audit["cie"]
    intro = ("<section id='cie'><h2>Compression-identified examples (Hooker et al. 2019)</h2>"
             "<p>Test rows where the modal prediction of the feasible Pareto front's models "
             "differs from the reference's (a tie that includes the reference's class is not "
             "counted).</p>")
    if "unavailable" in cie:
        return intro + f"<p class='na'>Not available: {_e(cie['unavailable'])}.</p></section>"
    rows = [[_e(g), _e(v["n"]), _e(v["cie"]), f"{_e(_num(100 * v['rate'], '.1f'))}% "
             f"{_e(_interval(100 * v['ci'][0], 100 * v['ci'][1], '.1f'))}",
             _e(v["reference_right"]), _e(v["modal_right"])]
            for g, v in cie["groups"].items()]
    t = cie["test"]
    test = ("<p>One group only: no between-group test.</p>" if t is None else
            f"<p id='cie-test'>Do the groups' CIE rates differ? Permutation chi-square "
            f"{_e(_num(t['chi2']))}, p = {_e(_num(t['p_value']))} ({t['n_permutations']} "
            f"permutations, seed {t['seed']}).</p>")
    missing = (f"<p>Left out (no stored predictions): trials {_e(', '.join(map(str, cie['missing'])))}"
               ".</p>" if cie.get("missing") else "")
    shown = cie["examples"][:CIE_ROWS_SHOWN]
    ex = [[_e(e["row"]), _e(e["group"]), _e(e["label"]), _e(e["reference"]), _e(e["modal"]),
           _e(f"{e['disagree']} of {e['models']}"), _e(e["text"] or "")] for e in shown]
    table = ("<p><input id='cie-filter' placeholder='filter rows (any text)' "
             "oninput=\"const q=this.value.toLowerCase();document.querySelectorAll("
             "'#cie-examples tbody tr').forEach(r=>r.style.display="
             "r.textContent.toLowerCase().includes(q)?'':'none')\"></p>"
             + _table(["row", "group", "label", "reference", "modal",
                       "front models disagreeing", "text"], ex, table_id="cie-examples"))
    more = (f"<p>First {CIE_ROWS_SHOWN} of {len(cie['examples'])} shown; the CSV beside this "
            "report has them all.</p>" if len(cie["examples"]) > CIE_ROWS_SHOWN else "")
    return (intro + f"<p>{cie['cie']} of {cie['rows']} test rows over {cie['n_models']} front "
            f"models (trials {_e(', '.join(map(str, cie['models'])))}).</p>" + missing
            + _table(["group", "rows", "CIEs", "CIE rate [Wilson 95%]",
                      "CIEs the reference had right", "CIEs the modal prediction has right"],
                     rows) + test
            + (table if cie["examples"] else "<p>No compression-identified example: the "
               "front's modal prediction is the reference's on every test row.</p>")
            + more + "</section>")


def _importance_section(audit: dict[str, Any]) -> str:
    imp = audit["importance"]
    head = (f"<section id='importance'><h2>What drives each objective: parameter importance "
            f"({_e(imp['evaluator'])})</h2>")
    if "unavailable" in imp:
        return head + f"<p class='na'>{_e(imp['unavailable'])}.</p></section>"
    const = (f" Left out (one value in every trial): {_e(', '.join(imp['constant']))}."
             if imp.get("constant") else "")
    parts = [head, f"<p><b>{_e(imp['note'])}</b>; scored, non-collapsed trials only.{const}</p>"]
    for name, obj in imp["objectives"].items():
        if "unavailable" in obj:
            parts.append(f"<h3>{_e(name)}</h3><p class='na'>not computed: "
                         f"{_e(obj['unavailable'])}</p>")
            continue
        rows = [[_e(k), _e(f"{v:.3f}"),
                 f"<span class='bar' style='width:{round(300 * v)}px'></span>"]
                for k, v in obj["importance"].items()]
        parts.append(f"<h3>{_e(name)}</h3>" + _table(["parameter", "importance", ""], rows))
    return "".join(parts) + "</section>"


def audit_details(audit: dict[str, Any]) -> str:
    """The audit's detail sections, after the plots."""
    style = ("<style>table.audit{border-collapse:collapse;margin:0.5em 0}.na{color:#8a5a2b}"
             "span.bar{display:inline-block;height:10px;background:#1f77b4}</style>")
    return style + "".join([_metrics_section(audit), _disparity_section(audit),
                            _cie_section(audit), _importance_section(audit)])
