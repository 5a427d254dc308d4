"""``express-embed``: cell and gene embeddings from an express checkpoint and from a Geneformer-format BERT checkpoint,
checked against plain forward passes of the same models on the same tokens; outputs and bad input."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from finetune.embed import cli, embed_cells, load_encoder
from tokenizer import TokenizationSpec, fit_statistics, tokenize_adata

pytestmark = pytest.mark.usefixtures("one_thread")

N_GENES = 48


def toy_adata(n_cells: int = 30, seed: int = 0, *, empty_cell: bool = False) -> ad.AnnData:
    """Poisson counts with three gene programs; genes named G0.., Ensembl-like ids in var['ensembl_id']."""
    rng = np.random.default_rng(seed)
    programs = rng.integers(0, 3, n_cells)
    rate = rng.gamma(0.8, 1.0, (3, N_GENES))
    for p in range(3):
        rate[p, p::3] *= 5
    counts = rng.poisson(rate[programs] * rng.uniform(0.5, 2.0, (n_cells, 1))).astype(np.float32)
    if empty_cell:
        counts[3] = 0
    var = pd.DataFrame({"ensembl_id": [f"ENSG{j:011d}" for j in range(N_GENES)],
                        "gene_symbol": [f"SYM{j}" for j in range(N_GENES)]}, index=[f"G{j}" for j in range(N_GENES)])
    obs = pd.DataFrame({"program": programs.astype(str),
                        "n_counts": counts.sum(1) + rng.integers(1, 50, n_cells)},  # counts outside the matrix too
                       index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


def save_express_model(path, adata, *, pooling: str = "cls", top_k: int = 16, n_zeros: int = 4):
    """A tiny pretraining checkpoint as pretrain/run.py's final/ holds it: weights, vocabulary, tokenization.json."""
    from modeling import ExpressConfig, ExpressForMaskedModeling

    torch.manual_seed(0)
    vocab = fit_statistics([adata], None, progress=False)
    config = ExpressConfig.from_vocab(vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, classifier_pooling=pooling)
    model = ExpressForMaskedModeling(config)
    model.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids)
    model.save_pretrained(path)
    vocab.save(path)
    TokenizationSpec(top_k=top_k, n_zeros=n_zeros).save(path)
    return path


def write_geneformer_dicts(path, *, v2: bool = True, n_genes: int = N_GENES - 6):
    """A small token dictionary (the first genes of toy_adata) and gene medians, as Geneformer's JSON files."""
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if v2 else ["<pad>", "<mask>"]
    genes = [f"ENSG{j:011d}" for j in range(n_genes)]
    tokens = {t: i for i, t in enumerate(specials + genes)}
    rng = np.random.default_rng(1)
    (path / "token_dictionary.json").write_text(json.dumps(tokens))
    (path / "gene_median_dictionary.json").write_text(json.dumps({g: float(rng.uniform(0.5, 3.0)) for g in genes}))
    (path / "gene_name_id_dict.json").write_text(json.dumps({f"SYM{j}": g for j, g in enumerate(genes)}))
    return path


def save_geneformer_model(path, dicts_dir, *, v2: bool = True):
    """A randomly initialised tiny BertForMaskedLM in Geneformer's layout (V2: 4,096 positions; V1: 2,048)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    n_tokens = len(json.loads((dicts_dir / "token_dictionary.json").read_text()))
    config = BertConfig(vocab_size=n_tokens, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=4096 if v2 else 2048, pad_token_id=0,
                        hidden_act="relu")
    BertForMaskedLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def express_dir(tmp_path_factory):
    return save_express_model(tmp_path_factory.mktemp("express_model"), toy_adata())


@pytest.fixture(scope="module", params=[True, False], ids=["V2", "V1"])
def geneformer(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("geneformer")
    dicts = write_geneformer_dicts(root / "dicts", v2=request.param)
    return save_geneformer_model(root / "model", dicts, v2=request.param), dicts, request.param


def _express_reference(model_dir, adata, **forward):
    """The plain path: tokenize with the model's vocabulary and spec, collate, run the encoder."""
    from transformers import AutoModel

    from pretrain.data import ExpressCollator
    from tokenizer import GeneVocab

    vocab = GeneVocab.load(model_dir)
    cells = tokenize_adata(adata, vocab, spec=TokenizationSpec.load(model_dir).replace(measured_genes={}),
                           source_name="adata")
    batch = ExpressCollator(vocab, mlm_probability=0.0)([cells.dataset[i] for i in range(len(cells))])
    encoder = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = encoder(**{k: batch[k] for k in ("input_ids", "values", "is_zero", "attention_mask")}, **forward)
    return cells, batch, out


def test_express_embedding_is_the_encoders_pooled_output(express_dir):
    adata = toy_adata(empty_cell=True)
    result = embed_cells(adata, express_dir, device="cpu", batch_size=7, progress=False)
    cells, _, out = _express_reference(express_dir, adata)
    got = adata.obsm["X_express"]
    assert got.shape == (adata.n_obs, 32) and result.cells is got
    assert np.isnan(got[3]).all()  # the cell without counts
    rows = [adata.obs_names.get_loc(c) for c in cells.dataset["cell_id"]]
    assert 3 not in rows and len(rows) == adata.n_obs - 1
    np.testing.assert_allclose(got[rows], out.pooler_output.numpy(), atol=1e-5)


def test_pooling_layer_override_and_gene_embeddings(express_dir):
    adata = toy_adata()
    result = embed_cells(adata, express_dir, device="cpu", pooling="mean", hidden_layer=1, gene_embeddings=True,
                         batch_size=8, progress=False)
    _, batch, out = _express_reference(express_dir, adata, output_hidden_states=True)
    states = out.hidden_states[1]  # (B, T, H): the first layer's output
    genes = (batch["attention_mask"].bool() & (batch["input_ids"] >= 4) & ~batch["is_zero"].bool())
    mean = (states * genes[..., None]).sum(1) / genes.sum(1, keepdim=True)
    np.testing.assert_allclose(adata.obsm["X_express"], mean.numpy(), atol=1e-5)
    # a gene's contextual embedding: its token's state averaged over the cells where it is detected (not as a zero)
    table = result.genes.set_index("gene_id")
    for gene in ("G0", "G7"):
        token = int(table.loc[gene, "token_id"])
        where = genes & (batch["input_ids"] == token)
        expected = states[where].mean(0).numpy()
        assert table.loc[gene, "n_cells"] == int(where.sum())
        np.testing.assert_allclose(table.loc[gene, [f"emb_{j}" for j in range(32)]].to_numpy(float), expected,
                                   atol=1e-5)


def test_geneformer_embedding_equals_a_plain_transformers_forward(geneformer):
    from transformers import BertForMaskedLM

    model_dir, dicts, v2 = geneformer
    adata = toy_adata()
    adata.var_names = [f"SYM{j}" for j in range(N_GENES)]  # ids only in var['ensembl_id'], as in Geneformer's data
    result = embed_cells(adata, model_dir, geneformer_dicts=dicts, device="cpu", batch_size=4, gene_embeddings=True,
                         progress=False)
    cells = tokenize_adata(adata, geneformer_dicts=dicts, model_input_size=4096 if v2 else 2048,
                           gene_id_key="ensembl_id", total_counts_key="n_counts")
    reference = BertForMaskedLM.from_pretrained(model_dir).eval()
    first = {}
    for i, ids in enumerate(cells.dataset["input_ids"]):
        with torch.no_grad():
            hidden = reference(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        genes = slice(1, -1) if v2 else slice(None)
        assert (ids[0] == 2 and ids[-1] == 3) if v2 else min(ids) >= 2  # <cls> ... <eos> for V2 only
        np.testing.assert_allclose(result.cells[i], hidden[-2][0, genes].mean(0).numpy(), atol=1e-5)
        for position, token in enumerate(ids[genes], start=1 if v2 else 0):
            first.setdefault(token, hidden[-2][0, position].numpy())
    assert len(result.genes) == len({t for ids in cells.dataset["input_ids"] for t in ids if t >= (4 if v2 else 2)})
    if v2:  # <cls> pooling from another layer
        other = embed_cells(adata, model_dir, geneformer_dicts=dicts, device="cpu", pooling="cls", hidden_layer=-1,
                            key_added=None, progress=False)
        with torch.no_grad():
            hidden = reference(input_ids=torch.tensor([cells.dataset["input_ids"][0]]),
                               output_hidden_states=True).hidden_states
        np.testing.assert_allclose(other.cells[0], hidden[-1][0, 0].numpy(), atol=1e-5)
    else:
        from finetune.embed import InputError

        with pytest.raises(InputError, match="<cls>"):
            load_encoder(model_dir, geneformer_dicts=dicts, pooling="cls", device="cpu")


def test_cli_writes_a_new_h5ad_or_in_place_and_refuses_to_overwrite(express_dir, tmp_path, capsys):
    adata = toy_adata()
    source = tmp_path / "cells.h5ad"
    adata.write_h5ad(source)
    out, genes = tmp_path / "embedded.h5ad", tmp_path / "genes.parquet"
    args = [str(express_dir), str(source), "--out", str(out), "--device", "cpu", "--gene_embeddings", str(genes),
            "--no_progress"]
    assert cli(args) == 0
    written = ad.read_h5ad(out)
    embed_cells(adata, express_dir, device="cpu", progress=False)
    np.testing.assert_allclose(written.obsm["X_express"], adata.obsm["X_express"], atol=1e-6)
    assert written.uns["X_express_params"]["pooling"] == "cls"
    assert set(pd.read_parquet(genes)["gene_id"]) <= set(adata.var_names)
    assert "X_express" not in ad.read_h5ad(source).obsm  # the input is untouched
    capsys.readouterr()
    assert cli(args) == 2  # outputs exist
    assert "already exists" in capsys.readouterr().err
    assert cli([*args, "--overwrite"]) == 0
    assert cli(["--inplace", str(express_dir), str(source), "--key_added", "X_e", "--device", "cpu",
                "--no_progress"]) == 0
    assert "X_e" in ad.read_h5ad(source).obsm
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "embedded.h5ad", "genes.parquet"]


def test_bad_input_is_one_line_and_writes_nothing(express_dir, geneformer, tmp_path, capsys):
    adata = toy_adata()
    good = tmp_path / "cells.h5ad"
    adata.write_h5ad(good)
    lognorm = adata.copy()
    lognorm.X = sp.csr_matrix(np.log1p(lognorm.X.toarray()))
    bad = tmp_path / "lognorm.h5ad"
    lognorm.write_h5ad(bad)
    (tmp_path / "not_a_model").mkdir()
    out = tmp_path / "out.h5ad"
    cases = [
        ([str(express_dir), str(tmp_path / "missing.h5ad")], "no such h5ad file"),
        ([str(tmp_path / "not_a_model"), str(good)], "not a model folder"),
        ([str(geneformer[0]), str(good)], "--geneformer_dicts"),
        ([str(express_dir), str(bad)], "lognorm.h5ad"),
        ([str(express_dir), str(good), "--layer", "7"], "layer 7"),
        ([str(express_dir)], "INPUT"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli([*argv, "--out", str(out), "--device", "cpu", "--no_progress"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("express-embed: error:") and message in err[-1], err
        assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "lognorm.h5ad", "not_a_model"]


def test_cuda_falls_back_to_the_cpu_without_a_gpu(express_dir, monkeypatch, caplog):
    import logging

    from finetune.embed import InputError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="finetune.embed"):
        assert resolve_device("cuda").type == "cpu"
    assert "no CUDA device" in caplog.text
    assert resolve_device(None).type == "cpu"  # the default: cuda only when there is one
    with pytest.raises(InputError, match="cpu or cuda"):
        resolve_device("meta")
    adata = toy_adata()
    on_cuda = embed_cells(adata, express_dir, device="cuda", key_added=None, progress=False).cells
    on_cpu = embed_cells(adata, express_dir, device="cpu", key_added=None, progress=False).cells
    np.testing.assert_array_equal(on_cuda, on_cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_the_gpu_is_close_to_float32_on_the_cpu(express_dir):
    adata = toy_adata()
    cpu = embed_cells(adata, express_dir, device="cpu", key_added=None, progress=False).cells
    gpu = embed_cells(adata, express_dir, device="cuda", key_added=None, progress=False, gene_embeddings=True)
    assert gpu.cells.dtype == np.float32 and np.isfinite(gpu.cells).all()
    cosine = (cpu * gpu.cells).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu.cells, axis=1)
    assert cosine.min() > 0.99  # bf16 autocast: close, not equal
    exact = embed_cells(adata, express_dir, device="cuda", bf16=False, key_added=None, progress=False).cells
    np.testing.assert_allclose(exact, cpu, atol=1e-4)
