"""The benchmark's report: every unit's numbers summarised over seeds, the verdicts, the figures, the README block.

- :func:`aggregate`: ``{task: {dataset: {setting: {arm: {metric: {"mean", "sd", "n", "values"}}}}}}`` from the
  units (``values`` in seed order; ``sd`` is the sample standard deviation over seeds, 0 with one seed);
- :func:`verdicts`: for every task, dataset and setting, on the task's primary metric: the winner and the runner-up,
  the best express arm against the best other method, and (ablations) every variant against the default; a gap
  *exceeds the spread* when it is larger than the two standard deviations added (their mean ± sd intervals do not
  overlap);
- :func:`write_report`: ``OUT/results.json`` (all of the above, the budget, versions, timings, notes, failures),
  ``OUT/report.md`` and ``OUT/figures/*.png``;
- :func:`headline_markdown` / :func:`update_readme`: the README's ``<!-- results:headline -->`` block, generated
  from a ``results.json`` (``python scripts/benchmark.py --readme scripts/results/benchmark/results.json``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .common import EXPRESS_PREFIX

logger = logging.getLogger(__name__)

HEADLINE_BEGIN, HEADLINE_END = "<!-- results:headline -->", "<!-- /results:headline -->"
LOWER_IS_BETTER = ("rmse", "seconds", "loss", "nll", "train_minutes")
# arms that are references rather than methods: they never win a verdict
REFERENCES = ("majority", "mean_protein")
# settings that are diagnostics: tabulated, no verdict
DIAGNOSTICS = ("poolings (diagnostic)", "embedding_norms")
NO_VERDICT_TASKS = ("pretraining",)
LIFT_METRICS = ("macro_f1", "accuracy", "label_silhouette", "nmi_kmeans", "ari_kmeans", "nmi_leiden", "ari_leiden")
# the headline: task -> the settings it shows (None: every setting)
HEADLINE = {"celltypes": ("100% labels",), "zeroshot": ("embeddings",), "integration": None,
            "proteins": None, "probabilistic": None, "stimulation": ("mean over types",)}


def lower_is_better(metric: str) -> bool:
    return any(metric == k or metric.endswith(f"_{k}") or metric.startswith(f"{k}_") for k in LOWER_IS_BETTER)


def is_express(arm: str) -> bool:
    return arm.startswith(EXPRESS_PREFIX)


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else float("nan")
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(finite), "values": values}


def aggregate(units: dict[str, dict], seeds: list[int]) -> dict:
    """Every metric of every arm over the seeds (see the module docstring); failed units are left out."""
    collected: dict = {}
    for result in units.values():
        if "results" not in result:
            continue
        unit = result["unit"]
        position = seeds.index(unit["seed"]) if unit["seed"] in seeds else None
        if position is None:
            continue
        # the pretraining units (one per variant) fill one table over the corpus
        dataset = "corpus" if unit["task"] == "pretraining" else unit["dataset"]
        for setting, arms in result["results"].items():
            for arm, metrics in arms.items():
                for metric, value in metrics.items():
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        continue
                    slot = collected.setdefault(unit["task"], {}).setdefault(dataset, {}) \
                        .setdefault(setting, {}).setdefault(arm, {}).setdefault(metric, [None] * len(seeds))
                    slot[position] = float(value)
    return {task: {dataset: {setting: {arm: {metric: _stats(values) for metric, values in metrics.items()}
                                       for arm, metrics in arms.items()}
                             for setting, arms in settings.items()}
                   for dataset, settings in datasets.items()}
            for task, datasets in collected.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------------------------------
def primary_metric(arms: dict, preferred: str | dict | None, setting: str | None = None) -> str | None:
    """The metric a setting's verdict compares: the task's ``primary`` (per setting when it is a dict) when the
    arms report it, else the first metric they report."""
    if isinstance(preferred, dict):
        preferred = preferred.get(setting)
    metrics = [m for stats in arms.values() for m in stats]
    if preferred in metrics:
        return preferred
    return next((m for m in metrics if m != "seconds"), None)


def compare(a: str, b: str, arms: dict, metric: str) -> dict:
    """``a`` against ``b`` on ``metric``: the gap in the better direction (positive: ``a`` is better) and whether it
    exceeds the spread (larger than the two standard deviations added)."""
    sa, sb = arms[a][metric], arms[b][metric]
    sign = -1.0 if lower_is_better(metric) else 1.0
    gap = sign * (sa["mean"] - sb["mean"])
    return {"a": a, "b": b, "a_mean": sa["mean"], "a_sd": sa["sd"], "b_mean": sb["mean"], "b_sd": sb["sd"],
            "gap": gap, "exceeds_spread": bool(abs(gap) > sa["sd"] + sb["sd"])}


def setting_verdict(task: str, dataset: str, setting: str, arms: dict, preferred: str | None) -> dict | None:
    metric = primary_metric(arms, preferred, setting)
    if metric is None or task in NO_VERDICT_TASKS or setting in DIAGNOSTICS:
        return None
    scored = {arm: stats for arm, stats in arms.items() if metric in stats and math.isfinite(stats[metric]["mean"])}
    methods = [a for a in scored if a not in REFERENCES]
    if not methods:
        return None
    sign = -1.0 if lower_is_better(metric) else 1.0
    ranked = sorted(methods, key=lambda a: -sign * scored[a][metric]["mean"])
    verdict = {"task": task, "dataset": dataset, "setting": setting, "metric": metric,
               "higher_is_better": not lower_is_better(metric), "ranking": ranked}
    if len(ranked) > 1:
        verdict["winner"] = compare(ranked[0], ranked[1], scored, metric)
    else:
        verdict["winner"] = {"a": ranked[0], "a_mean": scored[ranked[0]][metric]["mean"],
                             "a_sd": scored[ranked[0]][metric]["sd"]}
    express = [a for a in ranked if is_express(a)]
    others = [a for a in ranked if not is_express(a)]
    if express and others:
        verdict["express_vs_other"] = compare(express[0], others[0], scored, metric)
    if "default" in scored:  # ablations: each variant against the default
        verdict["vs_default"] = [compare(a, "default", scored, metric) for a in ranked if a != "default"]
    if task == "zeroshot" and "pca" in scored:  # the lift over the original data, stated per metric
        verdict["lift_over_pca"] = {arm: {m: compare(arm, "pca", scored, m) for m in LIFT_METRICS
                                          if m in scored[arm] and m in scored["pca"]}
                                    for arm in ("express_pretrained", "express_random_init") if arm in scored}
    return verdict


def verdicts(summary: dict, primaries: dict[str, str | None]) -> list[dict]:
    out = []
    for task, datasets in summary.items():
        for dataset, settings in datasets.items():
            for setting, arms in settings.items():
                verdict = setting_verdict(task, dataset, setting, arms, primaries.get(task))
                if verdict is not None:
                    out.append(verdict)
    return out


def _decimals(value: float) -> int:
    magnitude = abs(value) if value is not None and math.isfinite(value) else 0.0
    return 0 if magnitude >= 1000 else 1 if magnitude >= 100 else 3


def _num(value: float, decimals: int | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.{_decimals(value) if decimals is None else decimals}f}"


def _pm(stats: dict) -> str:
    """``mean ± sd``, both with the decimals the mean's size calls for."""
    if stats["n"] == 0:
        return "—"
    decimals = _decimals(stats["mean"])
    return f"{_num(stats['mean'], decimals)} ± {_num(stats['sd'], decimals)}"


def _pair(mean: float, sd: float) -> str:
    return _pm({"mean": mean, "sd": sd, "n": 1})


def verdict_sentence(verdict: dict) -> str:
    """``winner`` beats ``runner-up`` by ``gap`` (beyond / within the spread), and express against the rest."""
    metric = verdict["metric"]
    w = verdict["winner"]
    direction = "higher" if verdict["higher_is_better"] else "lower"
    parts = []
    if "b" in w:
        spread = "exceeds the spread" if w["exceeds_spread"] else "within the spread"
        parts.append(f"**{w['a']}** wins on {metric} ({direction} is better): {_pair(w['a_mean'], w['a_sd'])} "
                     f"against {w['b']} {_pair(w['b_mean'], w['b_sd'])}, by {_num(w['gap'], _decimals(w['a_mean']))} "
                     f"({spread})")
    else:
        parts.append(f"only **{w['a']}** was scored on {metric}: {_pair(w['a_mean'], w['a_sd'])}")
    e = verdict.get("express_vs_other")
    if e:
        word = "ahead of" if e["gap"] >= 0 else "behind"
        spread = "exceeds the spread" if e["exceeds_spread"] else "within the spread"
        parts.append(f"best express arm {e['a']} is {_num(abs(e['gap']), _decimals(e['a_mean']))} {word} the best "
                     f"other method {e['b']} "
                     f"({spread})")
    return "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------
def _metric_order(arms: dict, primary: str | None) -> list[str]:
    seen: list[str] = []
    for stats in arms.values():
        for metric in stats:
            if metric not in seen:
                seen.append(metric)
    first = {m: i for i, m in enumerate(seen)}
    return sorted(seen, key=lambda m: (m != primary, m == "seconds", "_zscore" in m or "_cosine" in m, first[m]))


def setting_table(arms: dict, primary: str | None, max_columns: int = 8) -> list[str]:
    columns = _metric_order(arms, primary)[:max_columns]
    sign = -1.0 if primary and lower_is_better(primary) else 1.0
    order = sorted(arms, key=lambda a: (primary not in arms[a], -sign * arms[a].get(primary, {"mean": 0})["mean"]
                                        if primary in arms[a] and math.isfinite(arms[a][primary]["mean"]) else 0))
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm in order:
        cells = [_pm(arms[arm][c]) if c in arms[arm] else "" for c in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _timing(results: dict) -> str:
    """The run's cost: the units' summed time, and this invocation's wall time (units reused from an earlier one
    are said)."""
    text = f"{results.get('unit_minutes', 0.0):.1f} min of unit time"
    if results.get("cached_units"):
        return text + (f" ({results['cached_units']} of {results['n_units']} units computed by an earlier "
                       f"invocation; this one {results['wall_minutes']:.1f} min wall)")
    return text + f", {results['wall_minutes']:.1f} min wall"


def headline_rows(results: dict) -> list[dict]:
    rows = []
    for verdict in results["verdicts"]:
        shown = HEADLINE.get(verdict["task"], ())
        if verdict["task"] not in HEADLINE or (shown is not None and verdict["setting"] not in shown):
            continue
        rows.append(verdict)
    return rows


def headline_markdown(results: dict, *, report_link: str = "scripts/results/benchmark/report.md") -> str:
    """The README's results block (between the markers, exclusive), from a ``results.json``."""
    budget = results["budget"]
    lines = [f"Mean ± sd over seeds {results['seeds']} (`{results['command']}`, budget `{budget['name']}`, "
             f"{results['machine']}, {_timing(results)}; express "
             f"{results['versions'].get('express_commit', '?')}). For each task and dataset: the best express arm, "
             "the best other method and the gap between them on the task's main metric; \"yes\" when the gap is "
             "larger than the two standard deviations added.", ""]
    if budget["name"] != "full":
        lines += [f"**These numbers come from the `{budget['name']}` budget, which only checks that every path "
                  "runs: they say nothing about the methods. The full run replaces them.**", ""]
    lines += ["| task | data | setting | metric | best express arm | best other method | gap | beyond spread |",
              "|---|---|---|---|---|---|---|---|"]
    for v in headline_rows(results):
        e = v.get("express_vs_other")
        if e is None:
            continue
        lines.append(f"| {v['task']} | {v['dataset']} | {v['setting']} | {v['metric']} | {e['a']} "
                     f"{_pair(e['a_mean'], e['a_sd'])} | {e['b']} {_pair(e['b_mean'], e['b_sd'])} | "
                     f"{'+' if e['gap'] >= 0 else '−'}{_num(abs(e['gap']), _decimals(e['a_mean']))} | "
                     f"{'yes' if e['exceeds_spread'] else 'no'} |")
    lines += ["", f"Gap: positive when express is better. Full report, every arm and the figures: "
                  f"[`{report_link}`]({report_link})."]
    return "\n".join(lines)


def update_readme(readme: Path, results: dict, *, report_link: str = "scripts/results/benchmark/report.md") -> str:
    """Rewrite the block between ``<!-- results:headline -->`` and ``<!-- /results:headline -->`` of ``readme``
    from ``results``; returns the new block."""
    text = Path(readme).read_text()
    if text.count(HEADLINE_BEGIN) != 1 or text.count(HEADLINE_END) != 1:
        raise ValueError(f"{readme} must hold exactly one {HEADLINE_BEGIN} ... {HEADLINE_END} block")
    start = text.index(HEADLINE_BEGIN) + len(HEADLINE_BEGIN)
    end = text.index(HEADLINE_END)
    block = headline_markdown(results, report_link=report_link)
    Path(readme).write_text(text[:start] + "\n" + block + "\n" + text[end:])
    return block


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for package in ("torch", "transformers", "scikit-learn", "scanpy", "scvi-tools", "scib-metrics", "jax"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    try:
        repo = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["express_commit"] = commit + ("+changes" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["express_commit"] = "unknown"
    return out


def machine() -> str:
    import os

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}"


def render(results: dict, descriptions: dict[str, str]) -> str:
    budget = results["budget"]
    lines = ["# express benchmark", "",
             f"`{results['command']}` — {results['date']}, {results['machine']}, {results['jobs']} jobs, "
             f"{_timing(results)}. Seeds {results['seeds']}; every number is the mean ± sample sd "
             "over them. Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".", ""]
    if budget["name"] != "full":
        lines += [f"**Budget `{budget['name']}`: a smoke test of every code path; the numbers are not evidence.**",
                  ""]
    lines += ["## Budget", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in budget.items()]
    lines += ["", "Models train with the library's defaults (`pretrain.run.PretrainArgs()`, `finetune.api`); the "
                  "budget sets only training time, steps or epochs, and how many cells each task reads.", ""]
    lines += ["## Summary", "", headline_markdown(results, report_link="report.md"), ""]
    for task, datasets in results["tasks"].items():
        lines += [f"## {task}", ""]
        if descriptions.get(task):
            lines += [descriptions[task], ""]
        for figure in results["figures"].get(task, []):
            lines += [f"![{task}](figures/{figure})", ""]
        for dataset, settings in datasets.items():
            for setting, arms in settings.items():
                primary = primary_metric(arms, results["primary"].get(task), setting)
                lines += [f"### {task} · {dataset} · {setting}", ""]
                lines += setting_table(arms, primary)
                lines.append("")
                verdict = next((v for v in results["verdicts"] if (v["task"], v["dataset"], v["setting"]) ==
                                (task, dataset, setting)), None)
                if verdict is not None:
                    lines += [verdict_sentence(verdict), ""]
                    for c in verdict.get("vs_default", []):
                        spread = "exceeds the spread" if c["exceeds_spread"] else "within the spread"
                        word = "better" if c["gap"] > 0 else "worse"
                        lines.append(f"- {c['a']} vs default: {_num(abs(c['gap']), _decimals(c['b_mean']))} {word} on "
                                     f"{verdict['metric']} "
                                     f"({spread})")
                    for arm, lifts in verdict.get("lift_over_pca", {}).items():
                        text = ", ".join(f"{m} {'+' if c['gap'] >= 0 else '−'}{_num(abs(c['gap']), 3)}"
                                         f"{'' if c['exceeds_spread'] else ' (within spread)'}"
                                         for m, c in lifts.items())
                        lines.append(f"- lift of {arm} over PCA: {text}")
                    lines.append("")
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if results["failures"]:
        lines += ["## Failures", ""] + [f"- `{k}`: {v}" for k, v in results["failures"].items()] + [""]
    lines += ["## Time per task (unit seconds, summed)", "", "| task | units | seconds |", "|---|---|---|"]
    lines += [f"| {t} | {n} | {s:.0f} |" for t, (n, s) in results["unit_seconds"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------
def bar_figure(task: str, datasets: dict, primary: str | None, path: Path) -> Path | None:
    """One panel per dataset and setting: the primary metric of every arm, mean with sd error bars."""
    from finetune.plots import _pyplot, _save

    panels = [(d, s, arms) for d, settings in datasets.items() for s, arms in settings.items()
              if s not in DIAGNOSTICS]
    panels = [(d, s, arms, primary_metric(arms, primary, s)) for d, s, arms in panels]
    panels = [p for p in panels if p[3] is not None]
    if not panels:
        return None
    plt = _pyplot()
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 0.28 * max(len(p[2]) for p in panels) * n_rows
                                                      + 1.4 * n_rows), squeeze=False)
    for ax, (dataset, setting, arms, metric) in zip(axes.ravel(), panels):
        names = [a for a in arms if metric in arms[a] and math.isfinite(arms[a][metric]["mean"])]
        means = [arms[a][metric]["mean"] for a in names]
        sds = [arms[a][metric]["sd"] for a in names]
        colours = ["tab:red" if is_express(a) else "tab:grey" for a in names]
        ax.barh(range(len(names)), means, xerr=sds, color=colours, capsize=2)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{dataset} · {setting}", fontsize=8)
        ax.set_xlabel(metric, fontsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{task} (express in red; mean ± sd over seeds)", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------
def write_report(bench, units: dict[str, dict], selected: list[str], *, seconds: float, jobs: int = 1,
                 missing_tasks: list[str] | None = None, command: str | None = None, cached_units: int = 0,
                 not_run: list[str] | None = None) -> dict:
    """Write ``OUT/results.json``, ``OUT/report.md`` and the figures; returns the results. ``not_run``: planned
    units left out of a report-only run (named in the notes)."""
    from .suite import tasks

    registry = tasks()
    summary = aggregate(units, bench.seeds)
    order = ["pretraining", *selected]
    summary = {t: summary[t] for t in order if t in summary}
    primaries = {name: task.primary for name, task in registry.items()}
    notes: list[str] = []
    for result in units.values():
        for text in result.get("notes", []):
            if text not in notes:
                notes.append(text)
    if len(bench.seeds) < 3:
        notes.append(f"only {len(bench.seeds)} seed(s): reported numbers need at least 3 (the spreads say little)")
    for task in missing_tasks or []:
        notes.append(f"task {task} is not available (its module is missing): not run")
    if not_run:
        notes.append(f"report only: {len(not_run)} planned unit(s) not run and not in this report: "
                     + ", ".join(not_run))
    failures = {key: r["error"] for key, r in units.items() if "error" in r}
    unit_seconds: dict[str, list] = {}
    for result in units.values():
        entry = unit_seconds.setdefault(result["unit"]["task"], [0, 0.0])
        entry[0] += 1
        entry[1] += result.get("seconds", 0.0)
    figures: dict[str, list[str]] = {}
    for task, datasets in summary.items():
        if task in NO_VERDICT_TASKS:
            continue
        path = bar_figure(task, datasets, primaries.get(task), bench.figure(f"{task}.png"))
        if path is not None:
            figures.setdefault(task, []).append(path.name)
    for path in sorted((bench.out / "figures").glob("integration_*.png")):
        figures.setdefault("integration", []).append(path.name)
    results = {
        "command": command or f"run_benchmark(budget={bench.budget.name!r})",
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": machine(), "jobs": jobs, "wall_minutes": seconds / 60, "seeds": bench.seeds,
        "unit_minutes": sum(r.get("seconds", 0.0) for r in units.values()) / 60, "cached_units": cached_units,
        "n_units": len(units),
        "budget": dataclasses.asdict(bench.budget), "versions": versions(),
        "primary": primaries, "tasks": summary, "verdicts": verdicts(summary, primaries), "notes": notes,
        "failures": failures, "figures": figures,
        "unit_seconds": {t: (n, s) for t, (n, s) in unit_seconds.items()},
        "units": {key: {"seconds": r.get("seconds"), "error": r.get("error")} for key, r in units.items()},
    }
    descriptions = {name: task.description for name, task in registry.items()}
    (bench.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (bench.out / "report.md").write_text(render(results, descriptions))
    return results


def publish(out: Path, dest: Path, *, readme: Path | None = None) -> Path:
    """Copy ``OUT/report.md``, ``OUT/results.json`` and ``OUT/figures/`` to ``dest`` (replacing what was there)
    and, given ``readme``, rewrite its results block from them."""
    out, dest = Path(out), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "figures").mkdir(parents=True)
    for name in ("report.md", "results.json"):
        shutil.copy2(out / name, dest / name)
    for figure in sorted((out / "figures").glob("*.png")):
        shutil.copy2(figure, dest / "figures" / figure.name)
    if readme is not None:
        repo = Path(readme).resolve().parent
        link = str((dest / "report.md").resolve().relative_to(repo))
        update_readme(readme, json.loads((dest / "results.json").read_text()), report_link=link)
    return dest
