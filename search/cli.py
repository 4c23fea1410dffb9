"""The ``nas-fair`` command line. Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from nas_fair.errors import UserError, disk_full, one_of

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"nas-fair: error: {message} (see nas-fair {self.prog.split()[-1]} --help)",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_study_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--study", metavar="NAME",
                   help="a study by name: ./studies/NAME.toml or a shipped one (default: bios)")
    g.add_argument("--config", metavar="FILE", help="a study definition (TOML)")
    p.add_argument("--storage", metavar="URL",
                   help="any Optuna storage URL (default: SQLite in the study's run folder)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="the study's run folder (default: ./studies/<name>/)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nas-fair", description=(
        "Search compression settings of a BERT-family classifier on size, latency, accuracy "
        "and bias together (Optuna NSGA-II)."))
    from nas_fair import __version__

    parser.add_argument("--version", action="version", version=f"nas-fair {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="run or resume a study")
    _add_study_args(s)
    s.add_argument("--budget", required=True, metavar="N|DURATION",
                   help="completed trials for the study in total (e.g. 8; re-running finishes "
                        "the rest, a larger N continues) or a duration for this run (45m, 2h)")
    s.add_argument("--device", help="cpu (default); cuda is refused until it is tested")
    s.add_argument("--sampler", help="nsga2 (default), random or tpe")
    s.add_argument("--max-bias-increase", type=float, metavar="X",
                   help="trials whose bias CI upper end exceeds the reference's by more than X "
                        "are infeasible")
    s.add_argument("--min-accuracy", type=float, metavar="X",
                   help="trials below this accuracy metric are infeasible")
    s.add_argument("--jobs", type=int, default=1, metavar="K",
                   help="worker processes on this machine, the cores split between them "
                        "(default 1); machines join with the same --storage and --run-dir")
    s.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    s.add_argument("--json", action="store_true", help="print the Pareto table as JSON on stdout")

    p = sub.add_parser("pareto", help="show the Pareto-optimal trials of a study (feasible "
                                      "first, then the infeasible ones no trial dominates)")
    _add_study_args(p)
    p.add_argument("--sort", default="size", metavar="OBJECTIVE",
                   help="size, latency, accuracy or bias (or the study's objective names); best "
                        "first (default: size)")
    p.add_argument("--max-bias-increase", metavar="X",
                   help="keep trials whose bias CI upper end is at most the reference's + X")
    p.add_argument("--min-accuracy", metavar="X",
                   help="keep trials whose accuracy metric is at least X (0 to 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    r = sub.add_parser("report", help="write a self-contained HTML report (plotly)")
    _add_study_args(r)
    r.add_argument("--out", metavar="FILE", help="default: <run folder>/report.html")

    e = sub.add_parser("export", help="write trials as model folders (safetensors, tokenizer, "
                                      "recipe, metrics, model card)")
    _add_study_args(e)
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--trials", metavar="N,M", help="trial numbers, e.g. 3,17")
    which.add_argument("--all-pareto", action="store_true",
                       help="every trial on the feasible Pareto front")
    e.add_argument("--out", required=True, metavar="DIR", help="one folder DIR/trial-<n> each")
    e.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    e.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (int8 where the recipe quantizes linears to 8 bits)")
    return parser


def load_config(args: argparse.Namespace):  # noqa: ANN201
    from nas_fair.config import DEFAULT_STUDY, find_study, load_study

    path = args.config or find_study(args.study or DEFAULT_STUDY)
    return load_study(path)


def cmd_search(args: argparse.Namespace) -> int:
    from nas_fair.config import DEVICES, SAMPLERS
    from nas_fair.search.run import Budget, run_search

    budget = Budget.parse(args.budget)
    cfg = load_config(args)
    if args.sampler is not None:
        if args.sampler not in SAMPLERS:
            raise one_of("--sampler", args.sampler, SAMPLERS)
        cfg.search.sampler = args.sampler
    if args.device is not None and args.device not in DEVICES:
        raise one_of("--device", args.device, DEVICES)
    if args.max_bias_increase is not None:
        if not 0 <= args.max_bias_increase < float("inf"):  # also rejects nan
            raise UserError(f"--max-bias-increase must be >= 0, got {args.max_bias_increase}")
        cfg.objectives.max_bias_increase = args.max_bias_increase
    if args.min_accuracy is not None:
        if not 0 <= args.min_accuracy <= 1:
            raise UserError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
        cfg.objectives.min_accuracy = args.min_accuracy
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    run_search(cfg, budget, storage=args.storage, run_dir=args.run_dir, device=args.device,
               quiet=args.quiet, as_json=args.json, jobs=args.jobs)
    return 0


def _existing_study(args: argparse.Namespace):  # noqa: ANN202
    from nas_fair.search.run import open_study, run_dir_for
    from nas_fair.search.study import default_storage

    cfg = load_config(args)
    run_dir = run_dir_for(cfg, args.run_dir)
    if args.storage is None and not (run_dir / "study.db").is_file():
        raise UserError(f"study {cfg.name!r} has not been run yet (no {run_dir / 'study.db'}); "
                        f"run nas-fair search --study {cfg.name} --budget N first")
    url = args.storage or default_storage(run_dir.resolve())
    return cfg, run_dir, open_study(cfg, url, create=False, budget=None)


def cmd_pareto(args: argparse.Namespace) -> int:
    import json

    from nas_fair.search.study import directions, objective_names
    from nas_fair.search.table import check_limits, pareto_rows, render_table, sort_index

    # Every flag is checked before the study is opened.
    max_bias = _number("--max-bias-increase", args.max_bias_increase)
    min_acc = _number("--min-accuracy", args.min_accuracy)
    check_limits(max_bias, min_acc)
    sort_index(args.sort, objective_names(load_config(args)))
    cfg, _, study = _existing_study(args)
    result = pareto_rows(study, directions(cfg), objective_names(cfg), sort=args.sort, cfg=cfg,
                         max_bias_increase=max_bias, min_accuracy=min_acc)
    print(json.dumps(result, indent=2) if args.json else render_table(result))
    return 0


def _number(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag} must be a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {text!r}")
    return value


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas_fair.search.report import write_report
    from nas_fair.search.run import ensure_writable_dir
    from nas_fair.search.study import directions, objective_names

    cfg, run_dir, study = _existing_study(args)
    out = Path(args.out) if args.out else run_dir / "report.html"
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; give a file, e.g. {out / 'report.html'}")
    ensure_writable_dir(out.parent, "the folder of --out")
    write_report(study, directions(cfg), objective_names(cfg), out)
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas_fair.search.export import (
        check_onnx_available,
        check_out,
        clean_debris,
        export_trials,
        parse_trials,
        study_args_for,
    )

    numbers = None if args.all_pareto else parse_trials(args.trials)
    out = Path(args.out)
    # A previous export killed while replacing --out is put back first, so the check sees it.
    clean_debris(out, lambda msg: print(msg, file=sys.stderr))
    check_out(out, force=args.force)  # every check that needs no study comes first
    if args.onnx:
        check_onnx_available()
    cfg, run_dir, study = _existing_study(args)
    done = export_trials(cfg, run_dir, study, numbers, out, force=args.force, onnx=args.onnx,
                         study_args=study_args_for(args),
                         log=lambda msg: print(msg, file=sys.stderr))
    for item in done:
        print(item.path)
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, with a "did you mean" for a mistyped option of the subcommand."""
    from nas_fair.errors import did_you_mean

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub = subs.choices.get(args.command, parser)
        flags = [a.split("=")[0] for a in extra if a.startswith("-")]
        hint = did_you_mean(flags[0], sub._option_string_actions) if flags else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # Offline by design: nothing may reach a model or data hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = _parse(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars are noise here
    try:
        import warnings

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Heartbeats and metric names are marked experimental; they are used on purpose.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        for key, value in vars(args).items():  # `--run-dir ""` must not mean "here"
            if isinstance(value, str) and not value.strip():
                raise UserError(f"--{key.replace('_', '-')} must not be empty")
        return {"search": cmd_search, "pareto": cmd_pareto, "report": cmd_report,
                "export": cmd_export}[args.command](args)
    except UserError as exc:
        print(f"nas-fair: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or getattr(args, "out", None) or \
            getattr(args, "run_dir", None) or "the run folder"
        folder = where if os.path.isdir(str(where)) else os.path.dirname(str(where)) or where
        print(f"nas-fair: error: no space left on the device of {folder}: free space and "
              "re-run; the study resumes", file=sys.stderr)
        return EXIT_USAGE



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
