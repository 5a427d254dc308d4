"""The pieces ``pretrain/run.py`` puts together: the default data, the accelerator, the model and the output folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tokenizer import GeneVocab, VocabularyMismatchError
from tokenizer.output import staged_file
from tokenizer.tokenize import MANIFEST_FILE

from .checkpoints import latest_checkpoint, list_checkpoints
from .data import Corpus

logger = logging.getLogger(__name__)


def prepare_default_data(cache_dir: Path) -> Path:
    """Tokenize the built-in default data (raw counts of pbmc68k_reduced) into ``cache_dir`` once, with kept counts
    for MCV, through the tokenizer's Python API; return the tokenized dataset folder."""
    import tokenizer
    from tokenizer.data import pbmc68k_counts

    tokens = cache_dir / "tokens"
    if (tokens / MANIFEST_FILE).is_file():
        return tokens
    cache_dir.mkdir(parents=True, exist_ok=True)
    h5ad = cache_dir / "pbmc68k_counts.h5ad"
    if not h5ad.is_file():
        with staged_file(h5ad, overwrite=True) as tmp:
            pbmc68k_counts().write_h5ad(tmp)
    logger.info("tokenizing the default data into %s", tokens)
    tokenizer.fit_statistics([h5ad], cache_dir / "stats", total_counts_key="n_counts", overwrite=True)
    tokenizer.tokenize_files([h5ad], cache_dir / "stats", tokens, total_counts_key="n_counts",
                             obs_keys=["cell_type"], keep_counts=True, overwrite=True)
    return tokens


def make_accelerator(*, cpu: bool, mixed_precision: str, gradient_accumulation_steps: int, report_to: str,
                     output_dir: Path):
    """An ``Accelerator`` for the run: CPU when asked or without a GPU; ``mixed_precision="auto"`` defers to
    ``accelerate launch --mixed_precision`` and otherwise picks bf16 on a GPU that supports it."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    use_cpu = cpu or not torch.cuda.is_available()
    precision: str | None = mixed_precision
    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            precision = None  # as `accelerate launch --mixed_precision` / `accelerate config` set it
        else:
            precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "no"
    trackers = [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]
    if "wandb" in trackers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ImportError("--report_to wandb needs the wandb package: pip install 'express[wandb]'") from None
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,
    )


def model_overrides(text: str | None) -> dict[str, Any]:
    """``--model_config``: a JSON file or inline JSON object of further ``ExpressConfig`` fields."""
    if not text:
        return {}
    path = Path(text)
    data = json.loads(path.read_text() if path.is_file() else text)
    if not isinstance(data, dict):
        raise ValueError("--model_config must be a JSON object of ExpressConfig fields")
    return data


def check_vocabulary(source: Path, vocab: GeneVocab) -> None:
    """Refuse a checkpoint or model folder whose vocabulary is not the corpus's (token ids would mean other genes)."""
    try:
        source_vocab = GeneVocab.load(source)
    except FileNotFoundError:
        raise VocabularyMismatchError(
            f"{source} has no vocabulary files (vocab.json, gene_stats.parquet), so its genes cannot be matched "
            "to the datasets; use a folder written by pretrain/run.py"
        ) from None
    if source_vocab.fingerprint() != vocab.fingerprint():
        raise VocabularyMismatchError(
            f"{source} was trained with vocabulary {source_vocab.fingerprint()} ({source_vocab.n_genes} genes) "
            f"but the datasets use {vocab.fingerprint()} ({vocab.n_genes} genes); token ids would mean different "
            "genes. Tokenize the datasets with the statistics folder the model was trained on "
            f"(`express-tokenize tokenize --stats {source}`)"
        )


def build_model(corpus: Corpus, objectives: list[str], *, resume_dir: Path | None = None,
                init_from: str | None = None, attn_implementation: str = "sdpa", gradient_checkpointing: bool = False,
                **fields: Any):
    """A new ``ExpressForMaskedModeling`` sized for the corpus (``fields``: further ``ExpressConfig`` fields), the
    ``init_from`` model, or the architecture of the resumed checkpoint (its weights are loaded later)."""
    from modeling import ExpressConfig, ExpressForMaskedModeling

    vocab = corpus.vocab
    weights = {k: fields.pop(k) for k in ("mlm_weight", "mcv_weight", "count_weight", "contrastive_weight",
                                          "celltype_weight") if k in fields}
    source = resume_dir or (Path(init_from) if init_from else None)
    if source is not None:
        check_vocabulary(source, vocab)
    if resume_dir is not None:
        model = ExpressForMaskedModeling(ExpressConfig.from_pretrained(resume_dir, **weights))
    elif init_from:
        model = ExpressForMaskedModeling.from_pretrained(init_from, attn_implementation=attn_implementation,
                                                         **weights)
    else:
        longest = max(int(corpus.train.lengths.max(initial=0)), int(corpus.eval.lengths.max(initial=0)),
                      *[s.max_length for s in corpus.specs])
        config = {"max_position_embeddings": max(512, -(-longest // 64) * 64), "use_mcv_head": "mcv" in objectives,
                  "use_count_head": "count" in objectives, **weights, **fields}
        model = ExpressForMaskedModeling(ExpressConfig.from_vocab(vocab, **config))
        model.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids)
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    heads = {"mcv": model.mcv_head, "count": model.count_head, "contrastive": model.contrastive_head,
             "celltype": model.celltype_head}
    missing = [o for o, head in heads.items() if o in objectives and head is None]
    if missing:
        raise ValueError(f"the model has no head for {missing}; start a new model or drop them from --objectives")
    # heads of objectives not trained now get no gradient: freeze them so DDP does not wait for one
    for objective, head in (("mlm", model.mlm_head), ("mcv", model.mcv_head), ("count", model.count_head),
                            ("contrastive", model.contrastive_head), ("celltype", model.celltype_head)):
        if head is not None and objective not in objectives:
            head.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_output_dir(output_dir: Path, *, resume: bool, resume_from: str | None, overwrite: bool) -> Path | None:
    """Decide where to resume from; refuse to overwrite an earlier run unless asked."""
    if resume_from:
        return Path(resume_from)
    if resume:
        found = latest_checkpoint(output_dir)
        if found is None:
            logger.info("--resume: no complete checkpoint in %s, starting from scratch", output_dir)
        return found
    previous = list_checkpoints(output_dir) or (output_dir / "final").exists()
    if previous and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a run (checkpoints or final/); pass --resume to continue it, "
            "--overwrite_output_dir to start afresh there, or another --output_dir"
        )
    return None


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the model's state (to check that processes hold the same weights)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
