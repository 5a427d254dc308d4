"""End-to-end pretraining with ``pretrain/run.py`` on tiny synthetic datasets (CPU, tiny model): learning, outputs,
exact resume, faults (vocabulary mismatches, corrupt checkpoints, NaN loss) and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pretrain.args import parse_args
from pretrain.checkpoints import CheckpointError, verify_checkpoint
from pretrain.data import VocabularyMismatchError
from pretrain.run import NonFiniteLossError, PretrainArgs, main
from test_pretrain_data import make_tokenized_dataset, make_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, per_device_batch_size=8,
            report_to="none", progress_bar=False, logging_steps=2)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    vocab = make_vocab(60)
    a = make_tokenized_dataset(root / "a", n_cells=64, vocab=vocab, seed=1, top_k=16, n_zeros=4)
    b = make_tokenized_dataset(root / "b", n_cells=40, vocab=vocab, seed=2, top_k=12, n_zeros=6)
    other = make_tokenized_dataset(root / "other_vocab", n_cells=40, vocab=make_vocab(60, prefix="ENSG"), seed=3)
    return {"a": str(a), "b": str(b), "other": str(other)}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "model.safetensors"))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_pretraining_learns_and_writes_a_loadable_model(corpus_dir, tmp_path):
    out = tmp_path / "run"
    result = main(PretrainArgs(dataset=[corpus_dir["a"], corpus_dir["b"]], output_dir=str(out), max_steps=60,
                               eval_steps=10, save_steps=25, save_total_limit=2, learning_rate=3e-3,
                               objectives="mlm,mcv,count", eval_fraction=0.15,
                               **{**TINY, "report_to": "tensorboard"}))
    history = json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval/mlm_loss" in h]
    assert [h["step"] for h in evals] == [10, 20, 30, 40, 50, 60]
    first, last = evals[0], evals[-1]
    # a real decrease of every held-out loss (not noise: these are fixed cells with fixed masks and splits)
    assert last["eval/mlm_loss"] < math.log(60) - 0.1  # uniform guessing among the 60 genes: log(60)
    assert last["eval/mlm_loss"] < first["eval/mlm_loss"]
    assert last["eval/mcv_nll"] < first["eval/mcv_nll"] - 0.01
    assert last["eval/count_nll"] < first["eval/count_nll"]
    # the diagnostic reference: the same held-out counts under each dataset's mean profile, a fixed profile, so it
    # moves only through the model's dispersions
    assert 0 < last["eval/mcv_nll_mean_profile"] < math.log(60) + 5
    # (accuracy over the ~40 masked held-out genes moves in steps of 1/40: too coarse to test after 60 steps)
    assert 0.0 <= last["eval/mlm_accuracy"] <= 1.0
    assert result["metrics"] == {k: v for k, v in last.items() if k != "step"}
    train = [h for h in history if "train/loss" in h]
    assert all(h["train/tokens_per_s"] > 0 and h["train/cells_per_s"] > 0 for h in train)

    # checkpoints: every 25 steps and at the end, the newest two kept, each complete and verified
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-50", "checkpoint-60"]
    assert verify_checkpoint(out / "checkpoint-60")["step"] == 60
    # final/: from_pretrained folder + vocabulary + model card; logs and the loss curve
    final = Path(result["final_dir"])
    import modeling
    from tokenizer import GeneVocab
    from transformers import AutoModel

    model = modeling.ExpressForMaskedModeling.from_pretrained(final)
    encoder = AutoModel.from_pretrained(final)
    assert type(encoder).__name__ == "ExpressModel" and bool(encoder.embeddings.gene_statistics_set)
    assert GeneVocab.load(final).fingerprint() == GeneVocab.load(corpus_dir["a"]).fingerprint()
    saved = _weights(out / "checkpoint-60")
    state = model.state_dict()
    assert len(saved) > 20 and all(torch.equal(state[k], v) for k, v in saved.items())
    card = (final / "README.md").read_text()
    assert "eval/mlm_accuracy" in card and '"max_steps": 60' in card and "mlm + mcv + count" in card
    assert json.loads((final / "metrics.json").read_text())["step"] == 60
    # the two datasets were tokenized differently (top_k 16 / 12): no single tokenization to record
    assert not (final / "tokenization.json").exists()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(corpus_dir, tmp_path):
    # dropout, gradient accumulation, MCV splits, masking and an epoch boundary all have to resume exactly
    common = dict(dataset=[corpus_dir["a"], corpus_dir["b"]], max_steps=8, save_steps=3, eval_steps=4, dropout=0.1,
                  gradient_accumulation_steps=2, objectives="mlm,mcv", dataset_weights=[1.0, 2.0], **TINY)
    whole_result = main(PretrainArgs(output_dir=str(tmp_path / "whole"), **common))
    cut = tmp_path / "cut"
    stopped = main(PretrainArgs(output_dir=str(cut), stop_at_step=5, **common))
    assert stopped["step"] == 5 and "final_dir" not in stopped and not (cut / "final").exists()
    resumed = main(PretrainArgs(output_dir=str(cut), resume=True, **common))
    assert resumed["step"] == 8
    whole, again = _weights(tmp_path / "whole" / "final"), _weights(cut / "final")
    assert whole.keys() == again.keys()
    for name in whole:
        assert torch.equal(whole[name], again[name]), name  # bitwise
    assert resumed["metrics"] == whole_result["metrics"]


def test_vocabulary_mismatch_with_a_checkpoint_or_init_model(corpus_dir, tmp_path):
    out = tmp_path / "run"
    main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(out), max_steps=2, stop_at_step=2, **TINY))
    with pytest.raises(VocabularyMismatchError, match=r"checkpoint-2 was trained with vocabulary .* the datasets use"):
        main(PretrainArgs(dataset=[corpus_dir["other"]], output_dir=str(out), max_steps=2, resume=True, **TINY))
    with pytest.raises(VocabularyMismatchError, match="--stats"):
        main(PretrainArgs(dataset=[corpus_dir["other"]], output_dir=str(tmp_path / "b"), max_steps=1,
                          init_from=str(out / "checkpoint-2"), **TINY))
    with pytest.raises(VocabularyMismatchError, match="vocabularies differ"):
        main(PretrainArgs(dataset=[corpus_dir["a"], corpus_dir["other"]], output_dir=str(tmp_path / "c"),
                          max_steps=1, **TINY))
    bare = tmp_path / "bare_model"
    from modeling import ExpressForMaskedModeling

    ExpressForMaskedModeling.from_pretrained(out / "checkpoint-2").save_pretrained(bare)  # no vocabulary files
    with pytest.raises(VocabularyMismatchError, match="has no vocabulary files"):
        main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(tmp_path / "d"), max_steps=1,
                          init_from=str(bare), **TINY))


def test_init_from_a_pretrained_model_starts_from_its_weights(corpus_dir, tmp_path):
    first = main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(tmp_path / "one"), max_steps=3, **TINY))
    second = main(PretrainArgs(dataset=[corpus_dir["b"]], output_dir=str(tmp_path / "two"), max_steps=1,
                               learning_rate=1e-9, warmup_steps=0, init_from=first["final_dir"], **TINY))
    a, b = _weights(Path(first["final_dir"])), _weights(Path(second["final_dir"]))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6


def test_corrupt_checkpoint_on_resume_is_refused_and_nothing_is_overwritten(corpus_dir, tmp_path):
    out = tmp_path / "run"
    main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(out), max_steps=6, save_steps=2, stop_at_step=4,
                      **TINY))
    optimizer_file = out / "checkpoint-4" / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-10])  # truncated
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 is corrupt: optimizer.pt has \d+ bytes"):
        main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(out), max_steps=6, save_steps=2, resume=True,
                          **TINY))
    assert _snapshot(out) == before


def test_output_dir_of_an_earlier_run_is_not_overwritten(corpus_dir, tmp_path):
    out = tmp_path / "run"
    main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(out), max_steps=1, **TINY))
    with pytest.raises(FileExistsError, match="--resume"):
        main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(out), max_steps=1, **TINY))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus_dir, tmp_path, monkeypatch):
    from modeling import ExpressForMaskedModeling

    original = ExpressForMaskedModeling.forward
    calls = {"train": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 5:  # the fifth optimizer step
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ExpressForMaskedModeling, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 5.*checkpoint-4"):
        main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(out), max_steps=10, save_steps=2, **TINY))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert verify_checkpoint(out / "checkpoint-4")["step"] == 4
    weights = _weights(out / "checkpoint-4")
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    assert not (out / "final").exists()


def test_command_line_and_config_file(tmp_path):
    config = tmp_path / "args.yaml"
    config.write_text("objectives: mlm\nmax_steps: 7\ndataset: [x, y]\nlearning_rate: 0.01\n")
    args = parse_args(PretrainArgs, ["--config", str(config), "--max-steps", "9", "--output_dir", "o", "--resume"])
    assert (args.objectives, args.max_steps, args.dataset, args.learning_rate, args.resume) == \
        ("mlm", 9, ["x", "y"], 0.01, True)
    args = parse_args(PretrainArgs, ["--dataset", "a", "--dataset", "b", "--objectives", "mlm,mcv,count",
                                     "--save_steps", "5", "--seed", "3"])
    assert args.dataset == ["a", "b"] and args.objective_list == ["mlm", "mcv", "count"] and args.seed == 3
    with pytest.raises(ValueError, match="subset of"):
        parse_args(PretrainArgs, ["--objectives", "mlm,simclr"])
    with pytest.raises(ValueError, match="one --dataset_weights value per --dataset"):
        PretrainArgs(dataset=["a"], dataset_weights=[1.0, 2.0])


def test_default_data_run_uses_the_tokenizers_encoding_for_mcv(tmp_path):
    """No --dataset: the built-in data is tokenized with the tokenizer's Python API (kept counts, library sizes from
    obs['n_counts']), and the MCV re-tokenization's encoder reproduces the stored tokens from the kept counts."""
    import numpy as np

    from pretrain.data import load_corpus
    from tokenizer import encode_count_rows

    out = tmp_path / "default"
    result = main(PretrainArgs(output_dir=str(out), max_steps=2, eval_steps=0, max_eval_cells=16, **TINY))
    assert result["step"] == 2 and "eval/mcv_nll" in result["metrics"]
    tokens = out / "default_data" / "tokens"
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["params"]["keep_counts"] and manifest["params"]["total_counts_key"] == "n_counts"
    corpus = load_corpus([tokens], eval_fraction=0.0, require_counts=True)
    assert len(corpus.train) == 700
    spec, vocab = corpus.specs[0], corpus.vocab
    for i in range(0, 700, 35):
        row = corpus.train[i]
        again = encode_count_rows([row["counts_ids"]], [row["counts"]], np.array([row["total_counts"]]),
                                  vocab.token_medians, top_k=spec.top_k, cls_id=vocab.cls_id,
                                  target_sum=spec.target_sum)
        detected = row["is_zero"] == 0
        assert row["input_ids"][detected].tolist() == again.input_ids.tolist()
        np.testing.assert_array_equal(row["values"][detected], again.values)
        assert set(row["input_ids"][~detected].tolist()) <= set(spec.zero_candidates(row["source"]).tolist())
    # how the corpus was tokenized travels with the model, for fine-tuning to tokenize new cells alike: the dataset
    # manifest's JSON, cut to the genes and zeros the model was trained on (the defaults: at most 128 and 25)
    from tokenizer import TokenizationSpec

    saved = json.loads((out / "final" / "tokenization.json").read_text())
    assert manifest["tokenization"]["top_k"] == 256 and manifest["tokenization"]["n_zeros"] == 50
    assert saved == {**manifest["tokenization"], "top_k": 128, "n_zeros": 25}
    assert TokenizationSpec.load(out / "final").top_k == PretrainArgs().top_k == 128


def test_an_hvg_panel_input_is_recorded_with_the_model(corpus_dir, tmp_path):
    """--gene_selection hvg: the corpus's most variable genes become every part's gene panel; the model's
    tokenization.json records it, so new cells are read through it."""
    import numpy as np

    from pretrain.data import counted_training_cells, highly_variable_tokens, load_corpus
    from tokenizer import TokenizationSpec

    out = tmp_path / "hvg"
    result = main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(out), max_steps=3,
                               eval_steps=0, gene_selection="hvg", panel_genes=20, objectives="mlm,contrastive",
                               contrastive_view="noise", **TINY))
    assert result["step"] == 3 and np.isfinite(result["metrics"]["eval/mlm_loss"])
    saved = TokenizationSpec.load(out / "final")
    defaults = PretrainArgs()
    corpus = load_corpus([corpus_dir["a"]], eval_fraction=defaults.eval_fraction, seed=defaults.seed,
                         max_eval_cells=defaults.max_eval_cells, require_counts=True)
    expected = highly_variable_tokens(corpus, 20, items=counted_training_cells(corpus, seed=defaults.seed))
    assert len(saved.input_genes) == 20
    np.testing.assert_array_equal(saved.input_genes, expected)
    with pytest.raises(ValueError, match="panel_genes"):
        PretrainArgs(panel_genes=0)


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from pretrain.pretraining import make_accelerator

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'express\[wandb\]'"):
        make_accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=1, report_to="wandb",
                         output_dir=tmp_path)


def test_console_scripts_and_the_script_form_exit_like_the_tokenizer(tmp_path):
    """`express-pretrain` and `python pretrain/run.py` (what `accelerate launch pretrain/run.py` runs): --help exits 0,
    bad flags 2 with one line, from any working directory (the project is installed, nothing edits sys.path)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    script = REPO_ROOT / "pretrain" / "run.py"
    for command in ([str(Path(sys.executable).with_name("express-pretrain"))], [sys.executable, str(script)]):
        done = subprocess.run([*command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "--objectives" in done.stdout, done.stderr[-2000:]
        done = subprocess.run([*command, "--objectives", "mlm,telepathy"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("express-pretrain: error:")
        assert "Traceback" not in done.stderr
    finetune = Path(sys.executable).with_name("express-finetune")
    done = subprocess.run([str(finetune), "--task", "cell-type", "--data", "x.h5ad", "--output_dir", "o"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--label_key" in done.stderr and "Traceback" not in done.stderr


def _view_similarity(model, cells, collator) -> tuple[float, float, float]:
    """Mean cosine similarity of the pooled embeddings of two views of the same cell, and of two different cells,
    and the contrastive loss of the cells in batches of 8 (as trained)."""
    batch = collator([cells[i] for i in range(len(cells))])
    with torch.no_grad():
        one = model.express(batch["input_ids"], values=batch["values"], is_zero=batch["is_zero"],
                            attention_mask=batch["attention_mask"], return_dict=True).pooler_output
        two = model.express(batch["pair_input_ids"], values=batch["pair_values"], is_zero=batch["pair_is_zero"],
                            attention_mask=batch["pair_attention_mask"], return_dict=True).pooler_output
    sim = torch.nn.functional.normalize(one, dim=-1) @ torch.nn.functional.normalize(two, dim=-1).T
    own = sim.diagonal().mean().item()
    others = (sim.sum() - sim.diagonal().sum()).item() / (sim.numel() - len(sim))
    with torch.no_grad():
        losses = [model(**collator([cells[i] for i in range(start, start + 8)])).contrastive_loss.item()
                  for start in range(0, len(cells) - 7, 8)]
    return own, others, sum(losses) / len(losses)


def test_contrastive_pretraining_brings_two_views_of_a_cell_together(corpus_dir, tmp_path):
    from modeling import ExpressForMaskedModeling
    from pretrain.data import CellDataset
    from pretrain.objectives import make_collator
    from tokenizer import TokenizedCells

    result = main(PretrainArgs(dataset=[corpus_dir["a"]], output_dir=str(tmp_path / "run"), max_steps=80,
                               eval_steps=0, save_steps=1000, learning_rate=3e-3, objectives="contrastive",
                               pooling="mean", **TINY))
    trained = ExpressForMaskedModeling.from_pretrained(result["final_dir"]).eval()
    torch.manual_seed(0)
    untrained = ExpressForMaskedModeling(trained.config).eval()
    cells = TokenizedCells.load(corpus_dir["a"])
    collator = make_collator(cells.vocab, [cells.spec], ["contrastive"], seed=5)
    data = CellDataset([cells.dataset])
    own, others, loss = _view_similarity(trained, data, collator)
    own0, others0, loss0 = _view_similarity(untrained, data, collator)
    # after training the two binomial halves of a cell agree far better than two different cells do, and the
    # contrastive loss over the cells is a fraction of what the same architecture gives at random weights
    assert own > others + 0.2, (own, others)
    assert loss < 0.5 * loss0, (loss, loss0)
    assert result["metrics"]["eval/contrastive_loss"] < math.log(8)


def test_celltype_objective_learns_the_labels_of_the_corpus(corpus_dir, tmp_path):
    """The supervised term reads the datasets' cell_type column (union of labels over datasets, sorted) and learns
    it: held-out cell-type accuracy far above the 1/4 of chance after a short run."""
    from modeling import ExpressForMaskedModeling

    with pytest.raises(ValueError, match="--label_column"):
        PretrainArgs(objectives="mcv,celltype")
    result = main(PretrainArgs(dataset=[corpus_dir["a"], corpus_dir["b"]], output_dir=str(tmp_path / "run"),
                               max_steps=300, eval_steps=0, save_steps=1000, learning_rate=3e-3,
                               objectives="mcv,celltype", label_column="cell_type", pooling="mean",
                               eval_fraction=0.25, **TINY))
    model = ExpressForMaskedModeling.from_pretrained(result["final_dir"])
    assert model.config.cell_type_names == ["B", "Mono", "NK", "T"]
    assert result["metrics"]["eval/celltype_accuracy"] > 0.8, result["metrics"]
    assert result["metrics"]["eval/celltype_loss"] < 0.5, result["metrics"]


def test_mixing_weights():
    from pretrain.run import mixing_weights

    assert mixing_weights([100, 25], "size") is None
    assert mixing_weights([100, 25], "sqrt") == [10.0, 5.0]
    assert mixing_weights([100, 25, 0], "equal") == [1.0, 1.0, 0.0]
    assert mixing_weights([100], "sqrt") is None


def test_mcv_over_the_most_variable_genes_with_sqrt_mixing(corpus_dir, tmp_path):
    """--mcv_output_genes N scores N genes: the held-out library the model is scored on is theirs alone, so the
    NLL per held-out count differs from the all-genes run on the same cells and steps."""
    common = dict(dataset=[corpus_dir["a"], corpus_dir["b"]], max_steps=20, eval_steps=0, save_steps=1000,
                  objectives="mcv", mcv_input="pooled", pooling="mean", dataset_mixing="sqrt", **TINY)
    some = main(PretrainArgs(output_dir=str(tmp_path / "some"), mcv_output_genes=15, **common))["metrics"]
    every = main(PretrainArgs(output_dir=str(tmp_path / "every"), **common))["metrics"]
    assert math.isfinite(some["eval/mcv_nll"]) and some["eval/mcv_nll"] != every["eval/mcv_nll"]
