"""A self-contained HTML report of a study. Computed as plain data first, then drawn (plotly).

The page embeds plotly.js, so it opens offline: no script is fetched from the network.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from nas_fair.search.study import pareto_front


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume (minimization) dominated by ``points`` and bounded by ``ref``.

    Optuna's exact WFG implementation; points outside the reference box contribute nothing.
    """
    from optuna._hypervolume import compute_hypervolume

    pts = points[np.all(points < ref, axis=1)]
    return float(compute_hypervolume(pts, ref)) if len(pts) else 0.0


def normalized(values: np.ndarray, reference: list[float], dirs: list[str]) -> np.ndarray:
    """Objectives as ratios to the reference model, all turned into 'lower is better'."""
    out = np.empty_like(values, dtype=float)
    for j, d in enumerate(dirs):
        ref = reference[j] if reference[j] else 1.0
        out[:, j] = values[:, j] / ref if d == "minimize" else 2.0 - values[:, j] / ref
    return out


HV_REFERENCE_POINT = 2.0  # every normalized objective: twice the reference model's (or half)


def report_data(study: optuna.Study, dirs: list[str], names: list[str]) -> dict[str, Any]:
    reference = study.user_attrs["reference"]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in pareto_front(complete, dirs)}
    trials = []
    for t in complete:
        trials.append({
            "number": t.number,
            "values": list(t.values),
            "params": t.params,
            "feasible": all(c <= 0 for c in t.user_attrs.get("constraints", [0])),
            "collapsed": bool((t.user_attrs.get("collapse") or {}).get("collapsed", False)),
            "on_front": t.number in front,
            "bias_ci": t.user_attrs.get("bias_ci"),
        })
    hv = []
    if complete:
        vals = np.array([t["values"] for t in trials], dtype=float)
        norm = normalized(vals, reference["values"], dirs)
        ref_pt = np.full(len(dirs), HV_REFERENCE_POINT)
        feasible = np.array([t["feasible"] for t in trials])
        for k in range(1, len(trials) + 1):
            pts = norm[:k][feasible[:k]]
            hv.append(hypervolume(pts, ref_pt) if len(pts) else 0.0)
    return {"study": study.study_name, "names": names, "directions": dirs,
            "reference": reference["values"], "trials": trials, "hypervolume": hv,
            "hv_reference_point": HV_REFERENCE_POINT}


def draw(data: dict[str, Any]) -> str:
    import plotly.graph_objects as go

    names = data["names"]
    trials = data["trials"]
    figs = []
    colors = ["#1f77b4" if t["on_front"] else "#c7c7c7" for t in trials] + ["#d62728"]
    symbols = ["circle" if t["feasible"] else "x" for t in trials] + ["star"]
    text = [f"trial {t['number']}" for t in trials] + ["reference"]
    dims = [dict(label=n, values=[t["values"][j] for t in trials] + [data["reference"][j]])
            for j, n in enumerate(names)]
    splom = go.Figure(go.Splom(dimensions=dims, text=text, diagonal_visible=False,
                               marker=dict(color=colors, symbol=symbols, size=8,
                                           line=dict(width=0.5, color="#333"))))
    splom.update_layout(title="Objectives: Pareto front (blue), dominated (grey), "
                              "reference (red star), infeasible (x)", height=750)
    figs.append(splom)
    param_names = sorted({k for t in trials for k in t["params"]})
    if trials and param_names:
        pdims = []
        for p in param_names:
            vals = [t["params"].get(p) for t in trials]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                pdims.append(dict(label=p, values=vals))
            else:
                cats = sorted({str(v) for v in vals})
                pdims.append(dict(label=p, values=[cats.index(str(v)) for v in vals],
                                  tickvals=list(range(len(cats))), ticktext=cats))
        for j, n in enumerate(names):
            pdims.append(dict(label=n, values=[t["values"][j] for t in trials]))
        par = go.Figure(go.Parcoords(
            dimensions=pdims,
            line=dict(color=[1 if t["on_front"] else 0 for t in trials],
                      colorscale=[[0, "#c7c7c7"], [1, "#1f77b4"]]),
        ))
        par.update_layout(title="Search parameters and objectives (Pareto trials in blue)",
                          height=500)
        figs.append(par)
    hv = go.Figure(go.Scatter(x=list(range(1, len(data["hypervolume"]) + 1)),
                              y=data["hypervolume"], mode="lines+markers"))
    hv.update_layout(title=f"Hypervolume of the feasible front over trials (objectives as ratios "
                           f"to the reference, reference point {data['hv_reference_point']})",
                     xaxis_title="completed trials", yaxis_title="hypervolume", height=400)
    figs.append(hv)
    parts = [f.to_html(include_plotlyjs=(i == 0), full_html=False) for i, f in enumerate(figs)]
    return _page(data, parts)


def _page(data: dict[str, Any], parts: list[str]) -> str:
    names = data["names"]
    head = "".join(f"<th onclick='sortBy({i})'>{html.escape(h)}</th>"
                   for i, h in enumerate(["trial", *names, "front", "feasible", "params"]))
    rows = [
        "<tr><td>ref</td>" + "".join(f"<td>{v:.4g}</td>" for v in data["reference"])
        + "<td></td><td></td><td>reference</td></tr>"
    ]
    for t in data["trials"]:
        cells = "".join(f"<td>{v:.4g}</td>" for v in t["values"])
        params = html.escape(json.dumps(t["params"]))
        rows.append(f"<tr><td>{t['number']}</td>{cells}<td>{'yes' if t['on_front'] else ''}</td>"
                    f"<td>{'yes' if t['feasible'] else 'no'}</td><td>{params}</td></tr>")
    title = html.escape(f"nas-fair report: {data['study']}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}}th{{cursor:pointer}}</style>
</head><body><h1>{title}</h1>
{''.join(parts)}
<h2>Trials (click a header to sort)</h2>
<table id="trials"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>
<script>
function sortBy(col){{const tb=document.querySelector('#trials tbody');
const rows=[...tb.rows];const asc=tb.dataset.col==String(col)&&tb.dataset.dir!='asc';
rows.sort((a,b)=>{{const x=a.cells[col].innerText,y=b.cells[col].innerText;
const fx=parseFloat(x),fy=parseFloat(y);const c=(isNaN(fx)||isNaN(fy))?x.localeCompare(y):fx-fy;
return asc?c:-c}});rows.forEach(r=>tb.appendChild(r));tb.dataset.col=col;
tb.dataset.dir=asc?'asc':'desc'}}
</script></body></html>"""


def write_report(study: optuna.Study, dirs: list[str], names: list[str], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(draw(report_data(study, dirs, names)), encoding="utf-8")
    tmp.replace(out)
    return out
