"""The benchmark suite: budgets, the units of work, running them (in parallel, cached), and the report.

A run is a list of **units** (:class:`Unit`): one task on one dataset with one seed (``celltypes/kang/seed1``).
Each unit is a function of the shared :class:`Bench` context that returns ``{setting: {arm: {metric: value}}}``;
its result is written to ``OUT/units/<task>/<dataset>/seed<seed>.json`` as soon as it finishes, so a rerun with the
same ``--out`` skips finished units (``--rerun`` recomputes them). Pretraining units come first (the other tasks
read the pretrained models); the rest run ``--jobs`` at a time, each in its own process with one torch thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .splits import DATASETS, BenchmarkData, shared_data_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """How much work each task does. ``quick`` keeps every code path (CI); ``full`` is the reported run.

    Args:
        max_cells: cells read per dataset (a stratified subsample; None: all).
        pretrain_minutes: training time of each pretraining run (``pretrain/run.py --max_train_minutes``; the
            defaults of ``pretrain/run.py`` otherwise). ablation_minutes: the same for each ablation run.
        knn_cells: cells the zero-shot k-NN scores use per dataset.
        mlp_epochs, transformer_epochs, min_steps: fine-tuning length (MLP encoder, transformer; the step floor).
        scvi_epochs, scanvi_epochs, totalvi_epochs: scvi-tools training budgets (epochs over the training cells).
        vae_epochs: express's VAE heads (MLP encoder).
        mll_samples: importance samples of the marginal log-likelihood.
        label_fractions: shares of the training labels the cell-type task trains with.
    """

    name: str
    max_cells: int | None
    pretrain_minutes: float
    ablation_minutes: float
    knn_cells: int
    mlp_epochs: int
    transformer_epochs: int
    min_steps: int
    scvi_epochs: int
    scanvi_epochs: int
    totalvi_epochs: int
    vae_epochs: int
    mll_samples: int
    label_fractions: tuple[float, ...] = (0.1, 0.25, 1.0)


BUDGETS = {
    "quick": Budget("quick", max_cells=400, pretrain_minutes=0.25, ablation_minutes=0.15, knn_cells=300,
                    mlp_epochs=3, transformer_epochs=1, min_steps=10, scvi_epochs=3, scanvi_epochs=2,
                    totalvi_epochs=5, vae_epochs=3, mll_samples=5, label_fractions=(0.25, 1.0)),
    "full": Budget("full", max_cells=None, pretrain_minutes=20.0, ablation_minutes=8.0, knn_cells=2000,
                   mlp_epochs=20, transformer_epochs=10, min_steps=600, scvi_epochs=100, scanvi_epochs=20,
                   totalvi_epochs=200, vae_epochs=100, mll_samples=100),
}


@dataclass
class Bench:
    """Everything a unit reads: where things go, the budget, the datasets, the corpus and the pretrained models."""

    out: Path
    budget: Budget
    datasets: dict[str, BenchmarkData]
    data_dir: Path
    seeds: list[int]
    selected: list[str] = field(default_factory=list)
    corpus: Any = None  # finetune.benchmark.corpus.BenchmarkCorpus, built before the units run
    notes: list[str] = field(default_factory=list)

    def model_dir(self, name: str, seed: int) -> Path:
        """Folder of the pretrained model ``name`` ("default" or an ablation) for ``seed``."""
        return self.out / "models" / name / f"seed{seed}" / "final"

    def figure(self, name: str) -> Path:
        path = self.out / "figures" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Unit:
    task: str
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.dataset}/seed{self.seed}"

    def path(self, out: Path) -> Path:
        return out / "units" / self.task / self.dataset / f"seed{self.seed}.json"


# ---------------------------------------------------------------------------------------------------------------------
# Running units
# ---------------------------------------------------------------------------------------------------------------------
_TASKS: dict[str, tuple[Callable[[Bench, str, int], dict], Callable[[Bench], list[str]]]] = {}


def register(name: str, datasets: Callable[[Bench], list[str]]):
    """Declare a task: ``fn(bench, dataset, seed) -> {setting: {arm: {metric: value}}}`` run on ``datasets(bench)``."""
    def wrap(fn):
        _TASKS[name] = (fn, datasets)
        return fn
    return wrap


def tasks() -> dict[str, tuple[Callable, Callable]]:
    from . import (  # noqa: F401
        ablations,
        celltypes,
        integration,
        pretraining,
        probabilistic,
        proteins,
        stimulation,
        zeroshot,
    )

    return _TASKS


def _limit_threads(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import torch

    torch.set_num_threads(threads)


def run_unit(bench: Bench, unit: Unit, threads: int = 1) -> dict:
    """Run one unit (in this process) and write its result; failures are recorded, not raised, so one broken arm
    does not lose a two-hour run (the report lists them)."""
    _limit_threads(threads)
    from accelerate.utils import set_seed

    fn = tasks()[unit.task][0]
    set_seed(unit.seed)
    start = time.perf_counter()
    try:
        result = {"results": fn(bench, unit.dataset, unit.seed)}
    except Exception as err:  # noqa: BLE001 -- recorded in the report with its traceback
        logger.error("%s failed: %s", unit.key, err)
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result.update(unit=dataclasses.asdict(unit), seconds=time.perf_counter() - start)
    path = unit.path(bench.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_jsonable))
    tmp.replace(path)
    return result


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def run_units(bench: Bench, units: list[Unit], *, jobs: int = 1, rerun: bool = False,
              progress: bool = True) -> dict[str, dict]:
    """Run the units not already done (all with ``rerun``), ``jobs`` at a time; returns every unit's result."""
    from tqdm.auto import tqdm

    todo = [u for u in units if rerun or not u.path(bench.out).is_file()]
    if todo:
        bar = tqdm(total=len(todo), desc="benchmark units", disable=not progress, dynamic_ncols=True)
        if jobs <= 1 or len(todo) == 1:
            for unit in todo:
                bar.set_postfix_str(unit.key)
                run_unit(bench, unit)
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: a fresh interpreter per worker (no inherited torch threads or forked locks)
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(run_unit, bench, unit): unit for unit in todo}
                for future in as_completed(futures):
                    future.result()
                    bar.set_postfix_str(futures[future].key)
                    bar.update(1)
        bar.close()
    return {u.key: json.loads(u.path(bench.out).read_text()) for u in units}


# ---------------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------------
TASK_ORDER = ("zeroshot", "celltypes", "integration", "proteins", "probabilistic", "stimulation", "ablations")


def plan(bench: Bench) -> tuple[list[Unit], list[Unit]]:
    """The pretraining units the selected tasks need (the default recipe per seed, and each ablation's variant),
    and the selected tasks' units."""
    registry = tasks()
    units = [Unit(t, d, s) for t in bench.selected for d in registry[t][1](bench) for s in bench.seeds]
    needs_models = any(t in ("zeroshot", "celltypes", "integration", "proteins", "ablations") for t in bench.selected)
    pretrain = [Unit("pretraining", v, s) for v in registry["pretraining"][1](bench) for s in bench.seeds]
    return (pretrain if needs_models else []), units


def run_benchmark(out: Path, *, budget: str = "full", selected: list[str] | None = None,
                  extra: list[BenchmarkData] | None = None, seeds: list[int] | None = None, jobs: int = 2,
                  rerun: bool = False, data_dir: Path | None = None, progress: bool = True) -> dict:
    """Build the corpus, run the units, write ``OUT/report.md``, ``OUT/results.json`` and ``OUT/figures/``."""
    from .corpus import build_corpus
    from .report import write_report

    selected = list(selected or TASK_ORDER)
    unknown = sorted(set(selected) - set(TASK_ORDER))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {', '.join(TASK_ORDER)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = dict(DATASETS)
    for data in extra or []:
        if data.name in datasets:
            raise ValueError(f"--data {data.file}: the name {data.name!r} is already a benchmark dataset")
        datasets[data.name] = data
    bench = Bench(out=out, budget=BUDGETS[budget], datasets=datasets, data_dir=Path(data_dir or shared_data_dir()),
                  seeds=list(seeds if seeds is not None else (0, 1, 2)), selected=selected)
    start = time.perf_counter()
    from tokenizer import TokenizationSpec

    bench.corpus = build_corpus(datasets, bench.data_dir, out / "corpus", spec=TokenizationSpec(),
                                max_cells=bench.budget.max_cells)
    first, rest = plan(bench)
    # pretraining units share the two cores the same way (one thread each, `jobs` at once)
    results = run_units(bench, first, jobs=jobs, rerun=rerun, progress=progress)
    results.update(run_units(bench, rest, jobs=jobs, rerun=rerun, progress=progress))
    report = write_report(bench, results, selected, seconds=time.perf_counter() - start)
    return report
