"""The evidence benchmark keeps fine-tuning test cells out of pretraining (the rule by obs value)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from finetune.benchmark.splits import held_out_mask as finetune_test_mask


def test_finetune_test_cells_are_masked_by_value_in_any_file_with_the_column():
    # Kang's test donors are 1244 and 1256; a control file sharing the donor column loses the same donors
    obs = pd.DataFrame({"donor": ["1015", "1244", "1256", "101", "1244"], "cell_type": list("abcde")})
    np.testing.assert_array_equal(finetune_test_mask(obs), [False, True, True, False, True])
    # CellBench and CITE-seq splits use a batch column; integers stored as numbers still match
    obs = pd.DataFrame({"batch": ["sc_dropseq", "sc_10x", "s1d2", "s1d1", "sc_celseq2_5cl_p3"]})
    np.testing.assert_array_equal(finetune_test_mask(obs), [True, False, True, False, True])
    obs = pd.DataFrame({"donor": [1244, 1016]})
    np.testing.assert_array_equal(finetune_test_mask(obs), [True, False])
    # a file without any split column keeps every cell
    assert not finetune_test_mask(pd.DataFrame({"cell_type": ["a", "b"]})).any()
