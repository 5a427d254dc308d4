"""Cross-validation over training groups: folds are built only from groups that are not dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_script

cv_celltype = load_script("cv_celltype")


def test_group_folds_masks_and_errors():
    groups = np.array(["a", "b", "c", "a", "d"])
    masks = cv_celltype.group_folds(groups, ["a", "b,c"], drop=["t"])
    np.testing.assert_array_equal(masks[0], [True, False, False, True, False])
    np.testing.assert_array_equal(masks[1], [False, True, True, False, False])
    with pytest.raises(ValueError, match="dropped"):
        cv_celltype.group_folds(groups, ["a", "t"], drop=["t"])
    with pytest.raises(ValueError, match="absent from the data"):
        cv_celltype.group_folds(groups, ["zz"], drop=[])
    with pytest.raises(ValueError, match="more than one fold"):
        cv_celltype.group_folds(groups, ["a", "a,b"], drop=[])


def test_cv_on_cellbench_batches_never_reads_the_dropped_batch(shared, tmp_path):
    data = shared("cellbench_lung_1408.h5ad")
    out = tmp_path / "cv.jsonl"
    scores = cv_celltype.main(["--data", str(data), "--group_key", "batch", "--drop", "sc_dropseq",
                               "sc_celseq2_5cl_p3", "--folds", "sc_celseq2", "sc_celseq2_5cl_p1,sc_celseq2_5cl_p2",
                               "--baseline", "--arm", "mlp", '{"epochs": 3, "head": {"mlp_hidden_size": 32}}',
                               "--n_top_genes", "500", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and {r["arm"] for r in records} == {"l1_logistic_regression", "mlp"}
    for r in records:
        assert "sc_dropseq" not in r["validation_groups"] and "p3" not in r["validation_groups"]
    # the two folds partition the 878 training cells
    fold_sizes = {r["fold"]: r["n_validation"] for r in records}
    assert sum(fold_sizes.values()) == 878
    # five cell lines (plus doublets): logistic regression is far above chance on held-out batches
    assert np.mean(scores["l1_logistic_regression"]) > 0.5
