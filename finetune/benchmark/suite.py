"""The benchmark suite: budgets, the units of work, running them (in parallel, cached), and the whole run.

A run is a list of **units** (:class:`Unit`): one task on one dataset with one seed (``celltypes/kang/seed1``).
Each unit is a function of the shared :class:`Bench` context that returns ``{setting: {arm: {metric: value}}}``;
its result is written to ``OUT/units/<task>/<dataset>/seed<seed>.json`` as soon as it finishes, so a rerun with the
same ``--out`` skips finished units (``--rerun`` recomputes them; a unit is recomputed too when a budget field it
read has changed, see :class:`BudgetReads`; the record does not cover the library's own defaults, so after changing
one delete the affected ``OUT/units/<task>`` folders).
Pretraining units come first (the other tasks read the pretrained models); the rest run ``--jobs`` at a time, each
in a worker process with one torch thread.

Budgets (:data:`BUDGETS`) set only how long things train and how many cells they read: every model is trained with
the library's defaults (``pretrain.run.PretrainArgs()``, ``finetune.api``), so the suite measures whatever those
defaults are.
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
        name: ``quick`` or ``full``.
        max_cells: each file is first cut to this many random cells (None: all cells).
        pretrain_steps: optimizer steps of each pretraining run of the default recipe (``--max_steps``: a length
            in steps, not minutes, so that a busy machine makes a run slower, never a different model).
            ablation_steps: the same for every ablation run and for the default recipe they are compared with.
        eval_cells: labelled cells per dataset that the zero-shot and ablation scores read (a seeded subsample).
        train_cells, test_cells: at most this many training / held-out cells per fine-tuning split (a seeded,
            stratified subsample shared by every arm; None: all).
        integration_cells: at most this many cells per dataset in the integration task.
        transformer_steps: optimizer steps of each transformer cell-type fine-tune (``max_steps``; None: the
            library's default length, ``epochs`` with its ``min_steps`` floor); the library's defaults otherwise
            (batch size, learning rates, validation).
        protein_transformer_steps: the same for the transformer protein fine-tunes.
        mlp_epochs, vae_epochs: epochs of the express MLP-encoder heads and VAE heads (None: the library default).
        min_steps: the fewest optimizer steps of every express head (None: the library's floor; the quick budget
            sets 0 so its few epochs stay few).
        scvi_epochs, scanvi_epochs, totalvi_epochs: ``max_epochs`` of scVI, scANVI and totalVI (their documented
            defaults otherwise).
        mll_samples: importance samples of the marginal log-likelihood (express and scVI alike).
        stimulation_types: held-out cell types of the stimulation task, the largest first (None: every eligible
            one; ``python -m finetune.benchmark.stimulation`` runs them all).
        label_fractions: shares of the training labels the cell-type task trains with.
        tokens: ``TokenizationSpec`` fields of the corpus (None: the tokenizer's defaults); the quick budget
            tokenizes fewer genes per cell so that every transformer runs on short cells.
    """

    name: str
    max_cells: int | None
    pretrain_steps: int
    ablation_steps: int
    eval_cells: int
    train_cells: int | None
    test_cells: int | None
    integration_cells: int | None
    transformer_steps: int | None
    protein_transformer_steps: int | None
    mlp_epochs: int | None
    vae_epochs: int | None
    scvi_epochs: int
    scanvi_epochs: int
    totalvi_epochs: int
    mll_samples: int
    label_fractions: tuple[float, ...] = (0.1, 0.25, 1.0)
    tokens: dict | None = None
    min_steps: int | None = None
    stimulation_types: int | None = None


BUDGETS = {
    "quick": Budget("quick", max_cells=200, pretrain_steps=3, ablation_steps=2, eval_cells=100,
                    train_cells=100, test_cells=50, integration_cells=120, transformer_steps=2,
                    protein_transformer_steps=2, mlp_epochs=2,
                    vae_epochs=2, scvi_epochs=2, scanvi_epochs=1, totalvi_epochs=2, mll_samples=4,
                    label_fractions=(0.5, 1.0), tokens={"top_k": 32, "n_zeros": 8}, min_steps=0),
    # the reported run (the report states its measured length). Its two cuts below the library's defaults are
    # the transformer cell-type fine-tunes (54 of them; 200 steps instead of the 500-step floor) and the
    # stimulation task's three largest held-out types instead of all seven. The six protein fine-tunes keep the
    # library's length: at 200 steps they scored 0.282 per-protein Pearson instead of 0.486
    "full": Budget("full", max_cells=None, pretrain_steps=800, ablation_steps=150, eval_cells=800,
                   train_cells=1000, test_cells=1000, integration_cells=2000, transformer_steps=200,
                   protein_transformer_steps=None,
                   mlp_epochs=None, vae_epochs=None, scvi_epochs=100, scanvi_epochs=20, totalvi_epochs=100,
                   mll_samples=100, stimulation_types=3),
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
    only: list[str] | None = None  # run the tasks on these datasets only (None: every dataset a task reads)
    corpus: Any = None  # finetune.benchmark.corpus.BenchmarkCorpus, built before the units run

    def model_dir(self, name: str, seed: int) -> Path:
        """Folder of the pretrained model ``name`` ("default", "random" or an ablation variant) for ``seed``."""
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
# The task registry
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A registered task: ``fn(bench, dataset, seed) -> {setting: {arm: {metric: value}}}`` run on each of
    ``datasets(bench)``; ``primary``: the metric its verdicts compare, or ``{setting: metric}`` (default: the
    first one an arm reports);
    ``needs_models``: whether it reads the pretrained models (so pretraining runs first)."""

    name: str
    fn: Callable[[Bench, str, int], dict]
    datasets: Callable[[Bench], list[str]]
    primary: str | dict[str, str] | None = None
    needs_models: bool = True
    description: str = ""


_TASKS: dict[str, Task] = {}
_NOTES: list[str] = []


def register(name: str, datasets: Callable[[Bench], list[str]], *, primary: str | dict[str, str] | None = None,
             needs_models: bool = True, description: str = ""):
    """Declare a task (a decorator): ``fn(bench, dataset, seed) -> {setting: {arm: {metric: value}}}``."""
    def wrap(fn):
        _TASKS[name] = Task(name, fn, datasets, primary, needs_models, description or (fn.__doc__ or "").strip())
        return fn
    return wrap


def note(text: str) -> None:
    """Record a remark about the running unit (an arm skipped, a budget cut); the report lists them."""
    if text not in _NOTES:
        _NOTES.append(text)


TASK_ORDER = ("zeroshot", "celltypes", "integration", "proteins", "probabilistic", "stimulation", "ablations")
OPTIONAL_TASKS = ("stimulation",)  # written separately; the run notes its absence instead of failing


def tasks() -> dict[str, Task]:
    """Every task module imported (they register themselves); a missing optional one is left out."""
    import importlib

    for module in ("pretraining", "zeroshot", "celltypes", "integration", "proteins", "probabilistic", "ablations",
                   *OPTIONAL_TASKS):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as err:
            if module not in OPTIONAL_TASKS or err.name != f"{__package__}.{module}":
                raise
    return _TASKS


# ---------------------------------------------------------------------------------------------------------------------
# Running units
# ---------------------------------------------------------------------------------------------------------------------
def _limit_threads(threads: int, cache: Path | None = None) -> None:
    """One thread for torch, BLAS, numba and XLA; with ``cache``, jax keeps its compiled kernels there (the
    scib-metrics kernels are compiled once per shape, not once per unit)."""
    if cache is not None:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache / "jax"))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from the training loops inside units
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


class BudgetReads:
    """The budget as a unit sees it, noting every field the unit reads: its cached result depends on those fields
    only (a new fine-tuning length does not recompute the pretraining runs). The corpus's fields and the budget's
    name always count."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self.read = {"name", "max_cells", "tokens"}

    def __getattr__(self, name: str):  # only called for what the instance itself lacks: the budget's fields
        value = getattr(self.budget, name)
        self.read.add(name)
        return value


def budget_record(bench: Bench, fields: set[str] | None = None) -> dict:
    """What a unit's result depends on besides its task, dataset and seed: the budget's ``fields`` it read (all
    of them when None) and the corpus files. A cached result is reused while these still hold."""
    budget = dataclasses.asdict(bench.budget)
    corpus = {k: str(v) for k, v in bench.corpus.files.items()} if bench.corpus is not None else None
    chosen = {k: v for k, v in budget.items() if fields is None or k in fields}
    return json.loads(json.dumps({"budget": chosen, "corpus": corpus}))


def _still_holds(saved: dict | None, bench: Bench) -> bool:
    """Whether a unit's saved record matches the current budget on every field it read, and the same corpus."""
    if not saved:
        return False
    current = budget_record(bench)
    return saved.get("corpus") == current["corpus"] and all(
        k in current["budget"] and current["budget"][k] == v for k, v in saved.get("budget", {}).items())


def run_unit(bench: Bench, unit: Unit, threads: int = 1) -> dict:
    """Run one unit (in this process) and write its result; failures are recorded, not raised, so one broken arm
    does not lose a two-hour run (the report lists them)."""
    _limit_threads(threads, cache=bench.out / "cache")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    from accelerate.utils import set_seed

    task = tasks()[unit.task]
    set_seed(unit.seed)
    _NOTES.clear()
    reads = BudgetReads(bench.budget)
    start = time.perf_counter()
    try:
        result = {"results": task.fn(dataclasses.replace(bench, budget=reads), unit.dataset, unit.seed)}
    except Exception as err:  # noqa: BLE001 -- recorded in the report with its traceback
        logger.error("%s failed: %s", unit.key, err)
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result.update(unit=dataclasses.asdict(unit), seconds=time.perf_counter() - start, notes=list(_NOTES),
                  record=budget_record(bench, reads.read))
    path = unit.path(bench.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_jsonable))
    tmp.replace(path)
    return result


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _done(bench: Bench, unit: Unit) -> bool:
    path = unit.path(bench.out)
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    return "error" not in saved and _still_holds(saved.get("record"), bench)


def run_units(bench: Bench, phases: list[list[Unit]], *, jobs: int = 1, rerun: bool = False,
              progress: bool = True) -> dict[str, dict]:
    """Run the units not already done (all with ``rerun``; failed ones again), ``jobs`` at a time, one phase
    after the other (a phase starts when the one before has finished); returns every unit's result."""
    from tqdm.auto import tqdm

    todo = [[u for u in phase if rerun or not _done(bench, u)] for phase in phases]
    count = sum(len(phase) for phase in todo)
    if count:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        bar = tqdm(total=count, desc="benchmark units", disable=not progress, dynamic_ncols=True)
        # worker processes even for one job: spawned interpreters whose thread settings are made before torch,
        # numba or jax start, kept for every phase; the longest units first, so the last minutes are not one
        # long unit running alone
        with ProcessPoolExecutor(max_workers=min(jobs, count), mp_context=mp.get_context("spawn")) as pool:
            for phase in todo:
                chains = [[u] for u in phase if u.task not in ONE_WORKER]
                chains += [c for c in ([u for u in phase if u.task == t] for t in ONE_WORKER) if c]
                chains.sort(key=lambda c: sum(UNIT_WEIGHT.get(u.task, 1.0) for u in c), reverse=True)
                futures = {pool.submit(run_chain, bench, chain): chain for chain in chains}
                for future in as_completed(futures):
                    future.result()
                    bar.set_postfix_str(futures[future][-1].key)
                    bar.update(len(futures[future]))
        bar.close()
    return {u.key: json.loads(u.path(bench.out).read_text()) for phase in phases for u in phase}


def run_chain(bench: Bench, units: list[Unit]) -> list[dict]:
    """Run ``units`` one after the other in this process (see :data:`ONE_WORKER`)."""
    return [run_unit(bench, unit) for unit in units]


# tasks whose units run one after the other in a single worker: scib-metrics' kBET and UMAP compile numba kernels
# that cannot be cached on disk, about a minute per process
ONE_WORKER = ("integration",)
# rough relative cost of a task's units (longest first keeps both workers busy to the end)
UNIT_WEIGHT = {"pretraining": 10.0, "celltypes": 5.0, "ablations": 3.0, "proteins": 2.0, "integration": 2.0,
               "probabilistic": 1.5, "zeroshot": 1.0}


# ---------------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------------
def plan(bench: Bench) -> tuple[list[Unit], list[Unit]]:
    """The pretraining units the selected tasks need (the default recipe per seed, and with ``ablations`` each
    variant's), and the selected tasks' units."""
    registry = tasks()
    selected = [t for t in bench.selected if t in registry]
    units = [Unit(t, d, s) for t in selected for d in registry[t].datasets(bench) for s in bench.seeds
             if bench.only is None or d in bench.only]
    needs_models = any(registry[t].needs_models for t in selected)
    pretrain = [Unit("pretraining", v, s) for v in registry["pretraining"].datasets(bench) for s in bench.seeds]
    return (pretrain if needs_models else []), units


def run_benchmark(out: Path, *, budget: str = "full", selected: list[str] | None = None,
                  extra: list[BenchmarkData] | None = None, seeds: list[int] | None = None, jobs: int = 2,
                  rerun: bool = False, data_dir: Path | None = None, progress: bool = True,
                  command: str | None = None, only: list[str] | None = None, report_only: bool = False) -> dict:
    """Build the corpus, run the units, write ``OUT/report.md``, ``OUT/results.json`` and ``OUT/figures/``;
    returns the results (what ``results.json`` holds). ``report_only``: run nothing, report the units already
    finished (the report lists the planned units that are not)."""
    from .corpus import build_corpus
    from .report import write_report

    selected = list(selected or TASK_ORDER)
    unknown = sorted(set(selected) - set(TASK_ORDER))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {', '.join(TASK_ORDER)}")
    seeds = list(seeds if seeds is not None else (0, 1, 2))
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = dict(DATASETS)
    for data in extra or []:
        if data.name in datasets:
            raise ValueError(f"--data {data.file}: the name {data.name!r} is already a benchmark dataset")
        datasets[data.name] = data
    if only is not None and set(only) - set(datasets):
        raise ValueError(f"unknown dataset(s) {sorted(set(only) - set(datasets))}; datasets: {', '.join(datasets)}")
    bench = Bench(out=out, budget=BUDGETS[budget], datasets=datasets, data_dir=Path(data_dir or shared_data_dir()),
                  seeds=seeds, selected=selected, only=only)
    start = time.perf_counter()
    from tokenizer import TokenizationSpec

    bench.corpus = build_corpus(datasets, bench.data_dir, out / "corpus",
                                spec=TokenizationSpec(**(bench.budget.tokens or {})), max_cells=bench.budget.max_cells)
    first, rest = plan(bench)
    not_run = []
    if report_only:
        not_run = [u.key for u in first + rest if not _done(bench, u)]
        first, rest = ([u for u in phase if _done(bench, u)] for phase in (first, rest))
    cached = sum(not rerun and _done(bench, u) for u in first + rest)
    results = run_units(bench, [first, rest], jobs=jobs, rerun=rerun and not report_only, progress=progress)
    missing = [t for t in selected if t not in tasks()]
    return write_report(bench, results, selected, seconds=time.perf_counter() - start, jobs=jobs,
                        missing_tasks=missing, command=command, cached_units=cached, not_run=not_run)
