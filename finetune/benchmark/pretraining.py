"""Pretraining units: ``pretrain/run.py`` with its defaults on the benchmark corpus, one run per seed.

The budget sets only the training length, in optimizer steps (``--max_steps``; a busy machine makes a run slower,
never a different model), with evaluation at the end only and no checkpoint before the final one. Everything else is
``PretrainArgs()``.

- ``default``: the default recipe for ``pretrain_steps``; beside it the unit saves the same architecture,
  vocabulary and tokenization at random weights (``models/random``), the arm that tells what pretraining adds;
- ``default_ablation_budget``: the default recipe for ``ablation_steps``, what every ablation is compared with;
- :data:`VARIANTS`: one change from the default recipe each, for ``ablation_steps``. A variant whose change is
  what the defaults already are is not run (the report says so).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

from .suite import Bench, note, register

# name -> PretrainArgs overrides (one change from the default recipe each); "model_config" entries are ExpressConfig
# fields merged into the default's own model_config
VARIANTS: dict[str, dict] = {
    "objective_mlm": {"objectives": "mlm"},
    "objective_mcv": {"objectives": "mcv"},
    "objective_contrastive": {"objectives": "contrastive"},
    "objective_mlm_mcv": {"objectives": "mlm,mcv"},
    "input_random_genes": {"gene_selection": "random"},
    "input_hvg_panel": {"gene_selection": "hvg"},
    "tokens_256_50_zeros": {"top_k": 256, "n_zeros": 50},
    "no_sampled_zeros": {"n_zeros": 0},
    "no_gene_hierarchy": {"model_config": {"group_level_sizes": [], "group_embedding_dims": []}},
    "no_gene_embedding_norm": {"gene_embedding_norm": False},
    "no_rank_embedding": {"model_config": {"position_embedding_type": "none"}},
    "no_value_embedding": {"model_config": {"value_embedding_dim": 0}},
}
ABLATION_REFERENCE = "default_ablation_budget"
NO_CHECKPOINT = 10**7  # save_steps beyond any run: only the final checkpoint is written


def _default_model_config() -> dict:
    from pretrain.pretraining import model_overrides
    from pretrain.run import PretrainArgs

    return model_overrides(PretrainArgs().model_config)


def overrides(variant: str) -> dict:
    """``variant``'s PretrainArgs overrides, with ``model_config`` merged into the default's and serialised."""
    change = dict(VARIANTS.get(variant, {}))
    if "model_config" in change:
        change["model_config"] = json.dumps({**_default_model_config(), **change["model_config"]})
    return change


def is_default(variant: str) -> bool:
    """Whether ``variant`` changes nothing: its overrides are the default recipe's own values."""
    from pretrain.run import PretrainArgs

    defaults = PretrainArgs()
    for name, value in VARIANTS[variant].items():
        current = getattr(defaults, name)
        if name == "model_config":
            merged = {**_default_model_config(), **value}
            if merged != _default_model_config():
                return False
        elif name == "objectives":
            if sorted(value.split(",")) != sorted(defaults.objective_list):
                return False
        elif current != value:
            return False
    return True


def variants(bench: Bench) -> list[str]:
    """The pretraining runs the selected tasks need."""
    names = ["default"]
    if "ablations" in bench.selected:
        if bench.budget.ablation_steps != bench.budget.pretrain_steps:
            names.append(ABLATION_REFERENCE)
        names += [v for v in VARIANTS if not is_default(v)]
    return names


def ablation_reference(bench: Bench) -> str:
    """The run every ablation is compared with: the default recipe on the ablations' budget."""
    return ABLATION_REFERENCE if bench.budget.ablation_steps != bench.budget.pretrain_steps else "default"


def pretrain_args(bench: Bench, variant: str, seed: int):
    from pretrain.run import PretrainArgs

    steps = bench.budget.pretrain_steps if variant == "default" else bench.budget.ablation_steps
    budget = {"max_steps": steps, "eval_steps": 0, "save_steps": NO_CHECKPOINT,
              "save_total_limit": 1}
    run = {"dataset": [str(p) for p in bench.corpus.pretraining], "seed": seed,
           "output_dir": str(bench.out / "models" / variant / f"seed{seed}"), "overwrite_output_dir": True,
           "report_to": "none", "progress_bar": False}
    fields = {f.name for f in dataclasses.fields(PretrainArgs)}
    change = overrides(variant)
    unknown = sorted(set(change) - fields)
    if unknown:
        raise ValueError(f"pretraining variant {variant!r} sets {unknown}, which are not PretrainArgs fields")
    return PretrainArgs(**run, **budget, **change)


def save_random_twin(final_dir, out_dir, seed: int) -> None:
    """``final_dir``'s model folder (vocabulary, tokenization, config) with freshly initialised weights."""
    import torch

    from modeling import ExpressForMaskedModeling
    from tokenizer import GeneVocab

    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(final_dir, out_dir, ignore=shutil.ignore_patterns("model.safetensors", "*.png"))
    trained = ExpressForMaskedModeling.from_pretrained(final_dir)
    torch.manual_seed(seed)
    model = ExpressForMaskedModeling(trained.config)
    vocab = GeneVocab.load(final_dir)
    model.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids)
    model.save_pretrained(out_dir)


@register("pretraining", variants, primary="mlm_accuracy", description="pretraining runs (held-out metrics)")
def pretraining(bench: Bench, variant: str, seed: int) -> dict:
    """Pretrain ``variant`` on the benchmark corpus; its held-out metrics at the end of training."""
    from pretrain.run import main

    from .zeroshot import embedding_norms

    args = pretrain_args(bench, variant, seed)
    result = main(args)
    final = bench.model_dir(variant, seed)
    for folder in (final.parent).glob("checkpoint-*"):  # only final/ is read; checkpoints are large
        shutil.rmtree(folder, ignore_errors=True)
    out = {"steps": result["step"], "train_minutes": result["train_seconds"] / 60,
           "n_parameters": result["n_parameters"], **{k.split("/")[-1]: v for k, v in result["metrics"].items()}}
    if variant != "default":
        return {"pretraining": {variant: out}}
    from modeling import ExpressForMaskedModeling

    twin = bench.model_dir("random", seed)
    save_random_twin(final, twin, seed)
    note(f"pretraining: {args.objectives} for {args.max_steps} steps per run")
    norms = {"express_pretrained": embedding_norms(ExpressForMaskedModeling.from_pretrained(final)),
             "express_random_init": embedding_norms(ExpressForMaskedModeling.from_pretrained(twin))}
    return {"pretraining": {"default": out}, "embedding_norms": norms}
