"""The ``nas-fair`` command line. Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nas_fair.errors import UserError, disk_full

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"nas-fair: error: {message} (see nas-fair {self.prog.split()[-1]} --help)",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse_trials(text: str) -> list[int]:
    """``"3,17"`` -> [3, 17]: comma-separated trial numbers, each once."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise UserError(f"--trials must be comma-separated trial numbers like 3,17, got {text!r}")
    return list(dict.fromkeys(int(p) for p in parts))


def reproduce_base(args: Any) -> Path:
    """Where the card's reproduce commands run from: the study file's folder, else here."""
    return Path(args.config).resolve().parent if args.config else Path.cwd()


def study_args_for(args: Any) -> list[str]:
    """The CLI arguments naming the study as the user gave them, paths relative to
    ``reproduce_base(args)`` and the storage password masked."""
    from nas_fair.search.card import relative
    from nas_fair.search.storage import shown_url

    base = reproduce_base(args)
    out: list[str] = []
    if args.config:
        out += ["--config", relative(args.config, base)]
    elif args.study:
        out += ["--study", args.study]
    if args.run_dir:
        out += ["--run-dir", relative(args.run_dir, base)]
    if args.storage:
        out += ["--storage", shown_url(args.storage)]
    return out


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
                   help="a duration for this run (45m, 2h: recommended), or N completed "
                        "evaluations for the study in total, a multi-fidelity promotion counting "
                        "as one (re-running finishes the rest, a larger N continues)")
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

    i = sub.add_parser("importance", help="which search parameters drive each objective "
                                          "(Optuna's fANOVA or PED-ANOVA)")
    _add_study_args(i)
    i.add_argument("--objective", default="bias,accuracy", metavar="NAMES",
                   help="comma-separated: size, latency, accuracy, bias or the study's objective "
                        "names (default: bias,accuracy)")
    i.add_argument("--evaluator", default="fanova", metavar="NAME",
                   help="fanova (default; share of variance explained, seeded) or ped-anova")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")

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

    c = sub.add_parser("compress", help="apply a recipe (an export's recipe.json, or one trial's "
                                        "parameters) to the study's reference and export the "
                                        "model folder")
    _add_study_args(c)
    c.add_argument("--recipe", required=True, metavar="FILE",
                   help="a JSON file: the recipe.json nas-fair export wrote (or its folder), or "
                        "one object of a trial's flat parameters like {\"pruning.ffn\": 0.25}")
    c.add_argument("--out", required=True, metavar="DIR",
                   help="the model folder to write (what export writes as DIR/trial-<n>)")
    c.add_argument("--steps", type=int, metavar="N",
                   help="recovery (distillation) steps instead of the recipe's")
    c.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    c.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (int8 where the recipe quantizes linears to 8 bits)")
    return parser


def load_config(args: argparse.Namespace):  # noqa: ANN201
    from nas_fair.api import load_config as load

    return load(study=args.study, config=args.config)


def cmd_search(args: argparse.Namespace) -> int:
    from nas_fair.api import run_search_checked

    run_search_checked(lambda: load_config(args), args.budget, storage=args.storage,
                       run_dir=args.run_dir, device=args.device, sampler=args.sampler,
                       max_bias_increase=args.max_bias_increase, min_accuracy=args.min_accuracy,
                       jobs=args.jobs, quiet=args.quiet, as_json=args.json, show=True,
                       on_message=None)
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    import json

    from nas_fair.api import pareto_table
    from nas_fair.search.table import render_table

    result = pareto_table(lambda: load_config(args), storage=args.storage, run_dir=args.run_dir,
                          sort=args.sort, max_bias_increase=args.max_bias_increase,
                          min_accuracy=args.min_accuracy)
    print(json.dumps(result, indent=2) if args.json else render_table(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from nas_fair.api import report_checked

    print(report_checked(load_config(args), args.out, storage=args.storage, run_dir=args.run_dir))
    return 0


def cmd_importance(args: argparse.Namespace) -> int:
    import json

    from nas_fair.api import importance_checked
    from nas_fair.search.audit import render_importance

    result = importance_checked(lambda: load_config(args), storage=args.storage,
                                run_dir=args.run_dir, objective=args.objective,
                                evaluator=args.evaluator)
    print(json.dumps(result, indent=2) if args.json else render_importance(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas_fair.api import export_checked

    numbers = None if args.all_pareto else parse_trials(args.trials)
    done = export_checked(lambda: load_config(args), numbers, Path(args.out), storage=args.storage,
                          run_dir=args.run_dir, onnx=args.onnx, force=args.force,
                          study_args=study_args_for(args), reproduce_base=reproduce_base(args),
                          log=lambda msg: print(msg, file=sys.stderr))
    for item in done:
        print(item.path)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from nas_fair.api import compress_checked

    done = compress_checked(lambda: load_config(args), args.recipe, Path(args.out),
                            storage=args.storage, run_dir=args.run_dir, steps=args.steps,
                            onnx=args.onnx, force=args.force, study_args=study_args_for(args),
                            reproduce_base=reproduce_base(args),
                            log=lambda msg: print(msg, file=sys.stderr))
    print(done)
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
    # Offline by design (quiet_libraries sets the same): before anything imports the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = _parse(argv)
    from nas_fair.api import check_not_empty, quiet_libraries

    try:
        with quiet_libraries():
            check_not_empty(vars(args))
            return {"search": cmd_search, "pareto": cmd_pareto, "report": cmd_report,
                    "importance": cmd_importance, "export": cmd_export,
                    "compress": cmd_compress}[args.command](args)
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
