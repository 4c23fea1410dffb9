"""The ``nas-fair`` command line. Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from nas_fair.errors import UserError, one_of

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
    s.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    s.add_argument("--json", action="store_true", help="print the Pareto table as JSON on stdout")

    p = sub.add_parser("pareto", help="show the Pareto-optimal trials of a study")
    _add_study_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    r = sub.add_parser("report", help="write a self-contained HTML report (plotly)")
    _add_study_args(r)
    r.add_argument("--out", metavar="FILE", help="default: <run folder>/report.html")
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
        if args.max_bias_increase < 0:
            raise UserError(f"--max-bias-increase must be >= 0, got {args.max_bias_increase}")
        cfg.objectives.max_bias_increase = args.max_bias_increase
    if args.min_accuracy is not None:
        if not 0 <= args.min_accuracy <= 1:
            raise UserError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
        cfg.objectives.min_accuracy = args.min_accuracy
    run_search(cfg, budget, storage=args.storage, run_dir=args.run_dir, device=args.device,
               quiet=args.quiet, as_json=args.json)
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
    from nas_fair.search.table import pareto_rows, render_table

    cfg, _, study = _existing_study(args)
    result = pareto_rows(study, directions(cfg), objective_names(cfg))
    print(json.dumps(result, indent=2) if args.json else render_table(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas_fair.search.report import write_report
    from nas_fair.search.study import directions, objective_names

    cfg, run_dir, study = _existing_study(args)
    out = Path(args.out) if args.out else run_dir / "report.html"
    write_report(study, directions(cfg), objective_names(cfg), out)
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Offline by design: nothing may reach a model or data hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars are noise here
    try:
        import warnings

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Heartbeats and metric names are marked experimental; they are used on purpose.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return {"search": cmd_search, "pareto": cmd_pareto, "report": cmd_report}[args.command](args)
    except UserError as exc:
        print(f"nas-fair: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
