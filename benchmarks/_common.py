"""Shared by the benchmark scripts: open a study's prepared Session, shrink it, write results.

Every benchmark scores models with nas-fair's own ``Session`` (the objectives a search uses),
never with a re-implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path("benchmarks/results")


def bits(n: int) -> dict[str, int]:
    """Trial params storing attention, FFN and embedding weights in ``n`` bits."""
    return {f"quantization.{g}_bits": n for g in ("attention", "ffn", "embedding")}


def add_study_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--study", default="bios", help="study name (default: bios)")
    ap.add_argument("--config", help="a study TOML file instead of --study")
    ap.add_argument("--run-dir", help="the study's run folder (default: ./studies/<name>)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")


def load_cfg(args: argparse.Namespace) -> Any:
    from nas_fair.config import find_study, load_study

    return load_study(args.config) if args.config else load_study(find_study(args.study))


def run_dir(args: argparse.Namespace, cfg: Any) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("studies") / cfg.name


def reduce_search(cfg: Any, *, steps: int | None = None, bootstrap: int | None = None,
                  latency_repeats: int | None = None) -> dict[str, Any]:
    """Lower the study's per-trial settings in place; returns what was changed (from -> to)."""
    changed: dict[str, Any] = {}
    for key, value in (("recovery_steps", steps), ("bootstrap", bootstrap),
                       ("latency_repeats", latency_repeats)):
        if value is not None and value != getattr(cfg.search, key):
            changed[key] = [getattr(cfg.search, key), value]
            setattr(cfg.search, key, value)
    cfg.validate()
    return changed


def open_session(cfg: Any, folder: Path, threads: int) -> Any:
    """A prepared Session (fine-tuned reference and caches reused from the run folder)."""
    import torch

    from nas_fair.search.session import Session

    torch.set_num_threads(threads)
    cfg.search.threads = threads
    session = Session(cfg, folder, quiet=True, log=lambda msg: print(msg, flush=True))
    t = time.perf_counter()
    session.prepare()
    print(f"prepared {cfg.name!r} in {time.perf_counter() - t:.1f}s ({folder})", flush=True)
    return session


def machine() -> dict[str, Any]:
    """The CPU a timing ran on: wall-clock figures from different machines are not compared."""
    import torch

    from nas_fair.modeling import bf16_native

    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "bf16_native": bf16_native(torch.device("cpu"))}


def shrink_test(session: Any, rows: int, seed: int = 0) -> int:
    """Keep ``rows`` test rows (stratified by label, seeded) everywhere the Session reads the
    test split: texts, tensors, reference logits, counterfactual rows. Returns the rows kept."""
    import numpy as np
    import torch

    from nas_fair.modeling import predictions

    test = session.data.test
    n = len(test)
    if rows <= 0 or rows >= n:
        return n
    rng = np.random.default_rng(seed)
    keep_parts = []
    for label in np.unique(test.labels):
        idx = np.flatnonzero(test.labels == label)
        take = max(1, round(rows * len(idx) / n))
        keep_parts.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    keep = np.sort(np.concatenate(keep_parts))
    sub = dataclasses.replace(
        test, texts=[test.texts[i] for i in keep], labels=test.labels[keep],
        groups=None if test.groups is None else test.groups[keep],
        stereotype=None if test.stereotype is None else test.stereotype[keep])
    cf = session.data.test_counterfactual
    session.data = dataclasses.replace(
        session.data, test=sub,
        test_counterfactual=None if cf is None else [cf[i] for i in keep])
    t = dict(session.tensors)
    k = torch.from_numpy(keep)
    for name in ("test_ids", "test_mask", "test_logits"):
        t[name] = t[name][k]
    if "cf_rows" in t:
        new_pos = {int(old): new for new, old in enumerate(keep)}
        sel = [j for j, r in enumerate(t["cf_rows"].tolist()) if r in new_pos]
        idx = torch.tensor(sel, dtype=torch.long)
        t["cf_rows"] = torch.tensor([new_pos[t["cf_rows"][j].item()] for j in sel],
                                    dtype=torch.long)
        t["cf_ids"], t["cf_mask"] = t["cf_ids"][idx], t["cf_mask"][idx]
    session.tensors = t
    session.ref_pred = predictions(t["test_logits"])
    session.ref_record = session._record(
        session.ref_pred, session._cf_pred(t["test_logits"], session.reference),
        reference=session.ref_pred, probe=session.ref_record.probe)  # the encoder's, unchanged
    return len(keep)


def scores_along_recovery(session: Any, configs: dict[str, Any], steps: tuple[int, ...],
                          work: Path, predictions: list[Any] | None = None,
                          ) -> list[dict[str, Any]] | None:
    """Accuracy and primary bias (with intervals) of one set of family configs after each of
    ``steps`` recovery steps, or None if its student recovers nothing.

    One recovery schedule of ``steps[-1]`` steps, scored at each budget: every budget continues
    from the previous one's checkpoint (under ``work``), as the search's rungs do, so the
    budgets are points of one run, not separate runs. ``predictions``, when given, receives
    each budget's test predictions (for re-scoring on row subsets afterwards)."""
    from nas_fair.objectives.scores import bias_objective
    from nas_fair.spaces import compress
    from nas_fair.spaces.base import RecoveryRun
    from nas_fair.spaces.recovery import recovery_logs

    cfg = session.cfg
    out = []
    for r, budget in enumerate(steps):
        configs = dict(configs)
        configs["distillation"] = dataclasses.replace(configs["distillation"], steps=budget)
        run = RecoveryRun(schedule_steps=steps[-1],
                          resume_from=work / f"rung-{r - 1}" if r else None,
                          save_state_to=work / f"rung-{r}" if r < len(steps) - 1 else None)
        t = time.perf_counter()
        model = compress(session.reference, configs, dataclasses.replace(session.ctx,
                                                                         recovery_run=run))
        recover_s = time.perf_counter() - t
        if r == 0 and not any(log["steps_run"] for log in recovery_logs(model)):
            return None
        # the objectives only (as a lower rung scores them), on every test row
        record = session.evaluate(model, full=session.lower_rows is not None)
        if predictions is not None:
            predictions.append(record.y_pred)
        (acc, lo, hi), bias, collapse = session.metrics(record, paired=True,
                                                        metrics=[cfg.objectives.bias])
        primary = bias[cfg.objectives.bias]
        out.append({"rung": r, "steps": budget, "accuracy": float(acc),
                    "accuracy_ci": [float(lo), float(hi)],
                    "bias": bias_objective(cfg, float(primary["value"])),
                    "bias_ci": [primary.get("ci_low"), primary.get("ci_high")],
                    "collapsed": bool(collapse["collapsed"]), "recover_s": round(recover_s, 1)})
        del model
    return out


def reference_dict(session: Any) -> dict[str, Any]:
    """The reference model scored as ``nas-fair search`` stores it on the study."""
    ref = session.score_reference()
    return {"values": ref.values(), "size_mb": ref.size_mb, "latency_ms": ref.latency_ms,
            "accuracy": ref.accuracy, "bias": ref.bias, **ref.attrs}


def paired_objectives(cfg: Any, record: Any, other: Any) -> dict[str, list[float]]:
    """(diff, low, high) of the study's accuracy and primary bias, ``record`` - ``other``, on the
    same resampled test rows (the study's bootstrap count and seed)."""
    from nas_fair.objectives.base import ACCURACY
    from nas_fair.objectives.stats import paired_difference

    opts = {"n": cfg.search.bootstrap, "seed": cfg.seed}
    return {"accuracy": list(paired_difference(ACCURACY[cfg.objectives.accuracy], record,
                                               other, **opts)),
            "bias": list(paired_difference(cfg.objectives.bias, record, other, **opts))}


def shown_storage(url: str) -> str:
    """A storage URL as results record it: no machine paths (SQLite under the working folder
    is made relative, elsewhere only its file name is kept) and no password (``shown_url``)."""
    from nas_fair.search.storage import shown_url

    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        try:
            return f"sqlite:///{path.relative_to(Path.cwd())}"
        except ValueError:
            return f"sqlite:///.../{path.name}"
    return shown_url(url)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_default))
    tmp.replace(path)
    print(f"wrote {path}")


def write_html(path: Path, figures: list[Any], title: str) -> None:
    """One page of plotly figures; plotly.js sits once beside it (opens offline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="directory" if i == 0
                                 else False))
    js = path.parent / "plotly.min.js"
    if not js.is_file():
        from plotly.offline import get_plotlyjs

        js.write_text(get_plotlyjs(), encoding="utf-8")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                    f"</head><body><h2>{title}</h2>{''.join(parts)}</body></html>",
                    encoding="utf-8")
    print(f"wrote {path}")


def _default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-able: {type(obj).__name__}")


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain text table (right-aligned numbers)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
