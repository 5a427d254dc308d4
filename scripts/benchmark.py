"""The express benchmark: one command, every task, a report.

Runs end to end on ``../shared/data`` (and any raw-count h5ad given with ``--data``) and writes ``OUT/report.md``,
``OUT/results.json`` (every number, per seed and summarised) and ``OUT/figures/*.png``. Tasks: ``zeroshot``,
``celltypes``, ``integration``, ``proteins``, ``probabilistic``, ``stimulation``, ``ablations`` (see
``finetune/benchmark/``). Units of work are cached in ``OUT/units/``: an interrupted run continues where it stopped.

    python scripts/benchmark.py --out runs/bench                  # the full run: ~2 h with --jobs 2 on 2 cores
    python scripts/benchmark.py --out runs/bench_quick --quick    # every code path in a few minutes (CI runs it)
    python scripts/benchmark.py --out runs/bench --tasks celltypes proteins --seeds 0 1 2 3 4
    python scripts/benchmark.py --out runs/bench --data my.h5ad:label=cell_type,batch=sample,test=sample:s7|s8
    python scripts/benchmark.py --out runs/bench --publish        # then copy the report to scripts/results/benchmark
                                                                  # and regenerate the README's results block
    python scripts/benchmark.py --readme scripts/results/benchmark/results.json   # only regenerate the README block

``--data FILE:key=value,...`` keys: ``label``, ``batch``, ``donor``, ``test=COLUMN:V1|V2`` (the held-out cells of the
fine-tuning tasks), ``proteins`` (obsm key of protein counts), ``total_counts`` (obs column of library sizes).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "scripts" / "results" / "benchmark"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from finetune.benchmark.suite import TASK_ORDER

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (report.md, results.json, figures/, units/, models/, corpus/)")
    p.add_argument("--quick", action="store_true", help="the quick budget: every code path, tiny training")
    p.add_argument("--tasks", nargs="+", choices=TASK_ORDER, default=None, help="default: all")
    p.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                   help="run the tasks on these datasets only (e.g. kang cite); default: every dataset")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: write the report from the units already finished in OUT (lists the rest)")
    p.add_argument("--data", action="append", default=[], metavar="FILE[:KEYS]",
                   help="another raw-count h5ad and its obs keys (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="at least 3 for reported numbers")
    p.add_argument("--jobs", type=int, default=2, help="units run at once (one CPU thread each)")
    p.add_argument("--rerun", action="store_true", help="recompute units already in OUT/units")
    p.add_argument("--data_dir", default=None, help="the shared data folder (default: ../shared/data)")
    p.add_argument("--publish", action="store_true",
                   help=f"copy the report to {RESULTS.relative_to(REPO)} and rewrite the README's results block")
    p.add_argument("--readme", metavar="RESULTS_JSON", default=None,
                   help="only rewrite the README's results block from this results.json, run nothing")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.readme is None and args.out is None:
        p.error("--out is required (or --readme RESULTS_JSON)")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from finetune.benchmark.report import publish, update_readme

    if args.readme is not None:
        results = json.loads(Path(args.readme).read_text())
        link = Path(args.readme).resolve().parent / "report.md"
        block = update_readme(REPO / "README.md", results, report_link=str(link.relative_to(REPO)))
        print(block)
        return results
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from finetune.benchmark.splits import parse_extra
    from finetune.benchmark.suite import run_benchmark

    extra = [parse_extra(text) for text in args.data]
    command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    results = run_benchmark(Path(args.out), budget="quick" if args.quick else "full", selected=args.tasks,
                            extra=extra, seeds=args.seeds, jobs=args.jobs, rerun=args.rerun,
                            data_dir=Path(args.data_dir) if args.data_dir else None, command=command,
                            only=args.datasets, report_only=args.report_only)
    print(f"report: {Path(args.out) / 'report.md'}")
    if results["failures"]:
        print(f"{len(results['failures'])} unit(s) failed: " + ", ".join(results["failures"]), file=sys.stderr)
    if args.publish:
        dest = publish(Path(args.out), RESULTS, readme=REPO / "README.md")
        print(f"published to {dest} and rewrote the README's results block")
    return results


def cli() -> int:
    argv = sys.argv[1:]
    try:
        results = main(argv)
    except (ValueError, FileNotFoundError) as err:
        if "--debug" in argv:
            raise
        print(f"benchmark: error: {err}", file=sys.stderr)
        return 2
    return 1 if results.get("failures") else 0


if __name__ == "__main__":
    sys.exit(cli())
