"""Geneformer mode on real data: input_ids equal a straightforward per-cell reference of Geneformer's encoding."""

import json

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_path

from tokenizer.errors import InputError
from tokenizer.geneformer import load_geneformer_dicts
from tokenizer.tokenize import tokenize_adata, tokenize_files

pytestmark = pytest.mark.shared_data


def geneformer_reference(adata, gene_ids, dict_dir, model_input_size):
    """Geneformer's rank value encoding, cell by cell, written plainly from its description:

    map ids (upper-cased) through ensembl_mapping_dict onto token-dictionary genes, summing genes that collapse onto
    one id; normalise by the cell's total count over all genes x 10,000 and by the gene's median; rank the detected
    genes by that value, descending (ties: smaller token id first); truncate; V2 adds <cls> ... <eos>.
    """
    tokens = json.loads((dict_dir / "token_dictionary.json").read_text())
    medians = json.loads((dict_dir / "gene_median_dictionary.json").read_text())
    mapping = json.loads((dict_dir / "ensembl_mapping_dict.json").read_text())
    mapped = [mapping.get(str(g).upper()) for g in gene_ids]
    mapped = [g if g in tokens and not g.startswith("<") else None for g in mapped]
    columns = [j for j, g in enumerate(mapped) if g is not None]
    genes = sorted({mapped[j] for j in columns}, key=tokens.get)
    token_ids = np.array([tokens[g] for g in genes])
    gene_medians = np.array([medians[g] for g in genes])
    # (n_vars, n_genes) 0/1 matrix: X @ collapse sums the columns that map onto one dictionary gene
    position = {g: k for k, g in enumerate(genes)}
    collapse = sp.csr_matrix((np.ones(len(columns)), (columns, [position[mapped[j]] for j in columns])),
                             shape=(len(gene_ids), len(genes)))
    X = sp.csr_matrix(adata.X).astype(np.float64)
    n_counts = np.asarray(X.sum(1)).ravel()
    Y = (X @ collapse).tocsr()
    v2 = model_input_size == 4096
    out = []
    for i in range(adata.n_obs):
        k, x = Y.indices[Y.indptr[i]:Y.indptr[i + 1]], Y.data[Y.indptr[i]:Y.indptr[i + 1]]
        if n_counts[i] == 0 or not np.any(x > 0):
            out.append(None)  # Geneformer drops cells without dictionary genes
            continue
        k, x = k[x > 0], x[x > 0]
        value = x / n_counts[i] * 10_000 / gene_medians[k]  # float64, as Geneformer computes it
        ranked = token_ids[k][np.lexsort((token_ids[k], -value))].tolist()
        if v2:
            out.append([tokens["<cls>"]] + ranked[: model_input_size - 2] + [tokens["<eos>"]])
        else:
            out.append(ranked[:model_input_size])
    return out


@pytest.mark.parametrize("name, dicts, size, id_key", [
    ("kang2018_pbmc_12261.h5ad", "gc95M", 4096, "ensembl_id"),
    ("pbmc_3chemistries_2860.h5ad", "gc30M", 2048, "ensembl_id"),
    ("cellbench_lung_1408.h5ad", "gc95M", 4096, None),  # Ensembl ids are the var_names here
])
def test_geneformer_input_ids_equal_the_reference(tmp_path, name, dicts, size, id_key):
    path = shared_path(name)
    dict_dir = shared_path(f"geneformer/{dicts}")
    out = tokenize_files([path], None, tmp_path / "gf", geneformer_dicts=dict_dir, model_input_size=size,
                         gene_id_key=id_key, obs_keys="batch", num_workers=1, progress=False)
    ds = datasets.load_from_disk(str(out))
    adata = ad.read_h5ad(path)
    gene_ids = adata.var[id_key] if id_key else adata.var_names
    reference = geneformer_reference(adata, list(gene_ids), dict_dir, size)
    kept = [i for i, r in enumerate(reference) if r is not None]
    assert ds["cell_id"] == list(adata.obs_names[kept])
    got = ds["input_ids"]
    assert len(got) == len(kept)
    mismatched = [i for i, k in enumerate(kept) if got[i] != reference[k]]
    assert not mismatched, f"{len(mismatched)} cells differ, first {ds[mismatched[0]]['cell_id']}"
    assert max(ds["length"]) <= size
    if size == 2048:
        assert max(ds["length"]) == 2048  # deep cells are truncated
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenization"]["mode"] == "geneformer" and manifest["params"]["model_input_size"] == size
    assert manifest["tokenization"]["n_zeros"] == 0 and manifest["tokenization"]["add_eos"] == (size == 4096)
    assert "is_zero" not in ds.column_names


def test_geneformer_dictionaries_and_settings(tmp_path):
    v2 = load_geneformer_dicts(shared_path("geneformer/gc95M"))
    assert v2.vocab.special_tokens == ("<pad>", "<mask>", "<cls>", "<eos>") and v2.vocab.vocab_size == 20275
    v1 = load_geneformer_dicts(shared_path("geneformer/gc30M"))
    assert v1.vocab.special_tokens == ("<pad>", "<mask>") and v1.vocab.vocab_size == 25426
    tokens = json.loads((shared_path("geneformer/gc30M") / "token_dictionary.json").read_text())
    assert v1.vocab.token_to_id == tokens  # ids are Geneformer's own
    adata = ad.read_h5ad(shared_path("bmmc_cite_600.h5ad"))
    with pytest.raises(InputError, match="4096 \\(Geneformer V2\\) needs <cls> and <eos>"):
        tokenize_adata(adata, geneformer_dicts=v1.directory, model_input_size=4096, gene_id_key="ensembl_id")
    with pytest.raises(InputError, match="2048 \\(Geneformer V1\\) or 4096"):
        tokenize_adata(adata, geneformer_dicts=v2.directory, model_input_size=1024, gene_id_key="ensembl_id")
    ds = tokenize_adata(adata, geneformer_dicts=v2.directory, gene_id_key="ensembl_id").dataset  # V2 by default
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in ds["input_ids"])


def test_ids_are_collapsed_upper_cased_and_unknown_targets_count_as_unmapped(tmp_path):
    """The id-collapsing map is looked up upper-cased (a lower-case key still matches), and an id it sends outside
    the token dictionary counts as unmapped, as one it lacks does (not as a gene missing from the vocabulary)."""
    source = shared_path("geneformer/gc95M")
    dicts = tmp_path / "dicts"
    dicts.mkdir()
    for name in ("token_dictionary.json", "gene_median_dictionary.json"):
        (dicts / name).write_text((source / name).read_text())
    tokens = json.loads((source / "token_dictionary.json").read_text())
    genes = [g for g in sorted(tokens, key=tokens.get) if not g.startswith("<")][:6]
    mapping = {genes[0].lower(): genes[0], "ENSGOUTSIDE": "ENSG_NOT_A_TOKEN", genes[2]: genes[2], genes[3]: genes[3],
               genes[4]: genes[3]}  # genes[4] collapses onto genes[3]: their counts are summed
    (dicts / "ensembl_mapping_dict.json").write_text(json.dumps(mapping))
    X = sp.csr_matrix(np.array([[1, 4, 2, 3, 5, 7], [2, 0, 1, 0, 0, 1]], dtype=np.int32))
    var_ids = [genes[0], "ENSGOUTSIDE", genes[2], genes[3], genes[4], "ENSGABSENT"]
    adata = ad.AnnData(X=X, var=pd.DataFrame({"ensembl_id": var_ids}, index=[f"g{i}" for i in range(6)]))
    adata.obs_names = ["c0", "c1"]
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    out = tokenize_files([path], None, tmp_path / "gf", geneformer_dicts=dicts, gene_id_key="ensembl_id",
                         progress=False)
    report = json.loads((out / "manifest.json").read_text())["inputs"][0]
    assert report["genes_unmapped"] == 2 and report["genes_in_vocab"] == 3 and report["genes_missing_from_vocab"] == 0
    medians = json.loads((source / "gene_median_dictionary.json").read_text())
    kept = [genes[0], genes[2], genes[3]]
    counts = X.toarray().astype(np.float64)
    counts = np.stack([counts[:, 0], counts[:, 2], counts[:, 3] + counts[:, 4]], axis=1)  # genes[4] -> genes[3]
    expected = []
    for i, total in enumerate(X.toarray().sum(1)):
        value = counts[i] / total * 10_000 / np.array([medians[g] for g in kept])
        ids = np.array([tokens[g] for g in kept])
        order = np.lexsort((ids, -value))
        expected.append([tokens["<cls>"]] + [int(ids[k]) for k in order if counts[i, k] > 0] + [tokens["<eos>"]])
    assert datasets.load_from_disk(str(out))["input_ids"] == expected
