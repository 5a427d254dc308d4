"""Pretraining units: ``pretrain/run.py`` with its defaults on the benchmark corpus, for the budget's training time,
one run per seed; the ablations' variants change one thing each on the same budget. Beside every default model the
unit saves the same architecture, vocabulary and tokenization at random weights (``models/random``), the arm that
tells what pretraining adds. Diagnostics of both: embedding norms and the MCV NLL of a per-dataset mean profile."""

from __future__ import annotations

import json
import shutil

from .suite import Bench, register

# name -> PretrainArgs overrides (one change from the default recipe each)
VARIANTS: dict[str, dict] = {
    "objective_mlm": {"objectives": "mlm"},
    "objective_mcv": {"objectives": "mcv"},
    "objective_contrastive": {"objectives": "contrastive"},
    "objective_mlm_mcv": {"objectives": "mlm,mcv"},
    "objective_mlm_mcv_contrastive": {"objectives": "mlm,mcv,contrastive"},
    "no_sampled_zeros": {"n_zeros": 0},
    "no_gene_groups": {"gene_groups": False},
    "no_value_gating": {"value_gating": False},
    "no_rank_embedding": {"rank_embedding": False},
    "input_random_genes": {"gene_selection": "random"},
}


def variants(bench: Bench) -> list[str]:
    return ["default", *(VARIANTS if "ablations" in bench.selected else [])]


def pretrain_args(bench: Bench, variant: str, seed: int):
    from pretrain.run import PretrainArgs

    minutes = bench.budget.pretrain_minutes if variant == "default" else bench.budget.ablation_minutes
    return PretrainArgs(dataset=[str(p) for p in bench.corpus.pretraining],
                        output_dir=str(bench.out / "models" / variant / f"seed{seed}"), overwrite_output_dir=True,
                        max_train_minutes=minutes, seed=seed, report_to="none", progress_bar=False,
                        save_steps=10**9, **VARIANTS.get(variant, {}))


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


@register("pretraining", variants)
def pretraining(bench: Bench, variant: str, seed: int) -> dict:
    from pretrain.run import main

    from .zeroshot import embedding_norms

    args = pretrain_args(bench, variant, seed)
    result = main(args)
    final = bench.model_dir(variant, seed)
    out = {"steps": result["step"], "train_minutes": result["train_seconds"] / 60,
           "n_parameters": result["n_parameters"], **{k.split("/")[-1]: v for k, v in result["metrics"].items()}}
    if variant != "default":
        return {"pretraining": {variant: out}}
    from modeling import ExpressForMaskedModeling

    twin = bench.model_dir("random", seed)
    save_random_twin(final, twin, seed)
    norms = {"express_pretrained": embedding_norms(ExpressForMaskedModeling.from_pretrained(final)),
             "express_random_init": embedding_norms(ExpressForMaskedModeling.from_pretrained(twin))}
    (final.parent.parent / "norms.json").write_text(json.dumps(norms, indent=1))
    return {"pretraining": {"default": out}, "embedding_norms": norms}
