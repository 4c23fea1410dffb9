"""Draw a study's Pareto front as a static SVG (the picture at the top of the README).

    python docs/make_front_picture.py --storage sqlite:///studies/bios/study.db --study bios \
        --caption "nas-fair search --budget 8, 2026-12-01, 2 CPU cores" --out docs/front.svg

Two steps: ``front_data`` reads the study through optuna and returns plain data (the same
front ``nas-fair pareto`` prints), ``draw_svg`` turns that data into hand-written SVG, so the
picture needs nothing beyond the project's own dependencies (no browser, no kaleido).
Three panels: macro-F1 (the accuracy objective) against size and against latency, and the bias
objective against size; size and latency are ratios to the reference. The front is the one in
all four objectives, so a front point can look dominated in one panel's two.
"""

from __future__ import annotations

import argparse
import html
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from nas_fair.search.table import pareto_rows, trial_constraints, trial_row, violated


def front_data(storage: str, study_name: str) -> dict[str, Any]:
    """The study's completed trials, its feasible front and its reference, as plain data."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    names = list(study.metric_names or ["size_mb", "latency_ms", "accuracy", "bias"])
    dirs = [d.name.lower() for d in study.directions]
    if "reference" not in study.user_attrs:
        raise SystemExit(f"study {study_name!r} has no reference scores yet (still preparing?)")
    table = pareto_rows(study, dirs, names)
    front = {row["trial"] for row in table["pareto"] if row["on_front"]}
    reference = study.user_attrs["reference"]
    trials = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.values is None:
            continue
        row = trial_row(list(t.values), t.user_attrs, reference, names, trial_constraints(t))
        trials.append({
            "number": t.number,
            "size_ratio": row["size_mb"]["ratio"],
            "latency_ratio": row["latency_ms"]["ratio"],
            "accuracy": row["accuracy"]["value"],
            "bias": row["bias"]["value"],
            "feasible": not violated(trial_constraints(t)),
            "on_front": t.number in front,
        })
    ref = table["reference"]
    return {
        "study": study_name,
        "names": names,
        "reference": {"size_mb": ref["size_mb"]["value"], "latency_ms": ref["latency_ms"]["value"],
                      "accuracy": ref["accuracy"]["value"], "bias": ref["bias"]["value"]},
        "trials": sorted(trials, key=lambda r: r["number"]),
    }


W, H = 330, 300  # one panel
PAD_L, PAD_R, PAD_T, PAD_B = 52, 14, 30, 44
FRONT, OTHER, INFEASIBLE, REF = "#1f5fbf", "#9a9a9a", "#e07b00", "#c8102e"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / n or 1e-9))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 0.05
    return lo - pad, hi + pad


def _panel(data: dict[str, Any], x_key: str, y_key: str, x_label: str, y_label: str,
           x0: float) -> list[str]:
    trials = data["trials"]
    ref_x = 1.0
    ref_y = data["reference"][y_key]
    xs = [t[x_key] for t in trials if t[x_key] is not None] + [ref_x]
    ys = [t[y_key] for t in trials] + [ref_y]
    (xlo, xhi), (ylo, yhi) = _range(xs), _range(ys)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def px(v: float) -> float:
        return x0 + PAD_L + (v - xlo) / (xhi - xlo) * pw

    def py(v: float) -> float:
        return PAD_T + (yhi - v) / (yhi - ylo) * ph

    out = [f'<rect x="{x0 + PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="white" '
           'stroke="#444"/>']
    for v in _ticks(xlo, xhi):
        out.append(f'<line x1="{px(v):.1f}" y1="{PAD_T + ph}" x2="{px(v):.1f}" '
                   f'y2="{PAD_T + ph + 4}" stroke="#444"/>')
        out.append(f'<text x="{px(v):.1f}" y="{PAD_T + ph + 16}" text-anchor="middle">{v:g}</text>')
    for v in _ticks(ylo, yhi):
        out.append(f'<line x1="{x0 + PAD_L - 4}" y1="{py(v):.1f}" x2="{x0 + PAD_L}" '
                   f'y2="{py(v):.1f}" stroke="#444"/>')
        out.append(f'<text x="{x0 + PAD_L - 7}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{x0 + PAD_L + pw / 2}" y="{H - 8}" text-anchor="middle">'
               f'{html.escape(x_label)}</text>')
    out.append(f'<text transform="translate({x0 + 14},{PAD_T + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{html.escape(y_label)}</text>')
    front = sorted((t for t in trials if t["on_front"] and t[x_key] is not None),
                   key=lambda t: t[x_key])
    for t in trials:  # dominated and infeasible trials first, so the front is drawn on top
        if t["on_front"] or t[x_key] is None:
            continue
        x, y = px(t[x_key]), py(t[y_key])
        if t["feasible"]:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{OTHER}"/>')
        else:
            out.append(f'<path d="M{x - 4:.1f},{y - 4:.1f}L{x + 4:.1f},{y + 4:.1f}'
                       f'M{x - 4:.1f},{y + 4:.1f}L{x + 4:.1f},{y - 4:.1f}" '
                       f'stroke="{INFEASIBLE}" stroke-width="2"/>')
    for t in front:
        x, y = px(t[x_key]), py(t[y_key])
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{FRONT}"/>')
        out.append(f'<text x="{x + 6:.1f}" y="{y - 5:.1f}" font-size="9" fill="{FRONT}">'
                   f'{t["number"]}</text>')
    x, y = px(ref_x), py(ref_y)
    star = " ".join(
        f"{x + (7 if i % 2 == 0 else 3) * math.sin(i * math.pi / 5):.1f},"
        f"{y - (7 if i % 2 == 0 else 3) * math.cos(i * math.pi / 5):.1f}" for i in range(10))
    out.append(f'<polygon points="{star}" fill="{REF}"/>')
    return out


def draw_svg(data: dict[str, Any], caption: str = "") -> str:
    """Hand-written SVG of ``front_data``'s result: three panels and a legend."""
    acc, bias = data["names"][2], data["names"][3]
    panels = [("size_ratio", "accuracy", "size (x reference)", acc),
              ("latency_ratio", "accuracy", "latency (x reference)", acc),
              ("size_ratio", "bias", "size (x reference)", f"{bias} (lower is better)")]
    width, height = W * len(panels), H + 40
    body: list[str] = []
    for i, (xk, yk, xl, yl) in enumerate(panels):
        body += _panel(data, xk, yk, xl, yl, i * W)
    n_front = sum(t["on_front"] for t in data["trials"])
    n_bad = sum(not t["feasible"] for t in data["trials"])
    legend_y = H + 14
    legend = [
        f'<circle cx="60" cy="{legend_y - 4}" r="4.5" fill="{FRONT}"/>',
        f'<text x="70" y="{legend_y}">feasible Pareto front ({n_front}; number = trial)</text>',
        f'<circle cx="330" cy="{legend_y - 4}" r="3.5" fill="{OTHER}"/>',
        f'<text x="340" y="{legend_y}">dominated</text>',
        f'<path d="M426,{legend_y - 8}l8,8m-8,0l8,-8" stroke="{INFEASIBLE}" stroke-width="2"/>',
        f'<text x="440" y="{legend_y}">infeasible or collapsed ({n_bad})</text>',
        f'<polygon points="640,{legend_y - 11} 642,{legend_y - 5} 648,{legend_y - 5} 643,'
        f'{legend_y - 1} 645,{legend_y + 5} 640,{legend_y + 1} 635,{legend_y + 5} 637,'
        f'{legend_y - 1} 632,{legend_y - 5} 638,{legend_y - 5}" fill="{REF}"/>',
        f'<text x="652" y="{legend_y}">reference (uncompressed)</text>',
    ]
    title = (f'study {data["study"]}: Pareto front in all four objectives, '
             f'{len(data["trials"])} completed trials'
             + (f" ({caption})" if caption else ""))
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#fafafa"/>',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">'
        f"{html.escape(title)}</text>",
        *body, *legend, "</svg>", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", required=True, help="the study's Optuna storage URL")
    ap.add_argument("--study", default="bios", help="study name (default: bios)")
    ap.add_argument("--caption", default="", help="command, date and machine, shown in the title")
    ap.add_argument("--out", default=str(Path(__file__).with_name("front.svg")))
    args = ap.parse_args()
    data = front_data(args.storage, args.study)
    if not data["trials"]:
        raise SystemExit(f"study {args.study!r} has no completed trials yet")
    Path(args.out).write_text(draw_svg(data, args.caption), encoding="utf-8")
    print(f"wrote {args.out}: {len(data['trials'])} trials, "
          f"{sum(t['on_front'] for t in data['trials'])} on the front")


if __name__ == "__main__":
    main()
