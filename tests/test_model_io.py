"""Saving and loading: safetensors round trips, Auto classes, attn_implementation, and trust_remote_code loading in a
process where the express packages cannot be imported."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from modeling import (
    ExpressConfig,
    ExpressForCellClassification,
    ExpressForMaskedModeling,
    ExpressModel,
)
from test_model_forward import collate, make_cells, tiny_model


@pytest.fixture
def batch():
    return collate(make_cells([14, 9, 6]))


def predictions(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_save_pretrained_round_trip_is_exact(tmp_path, batch):
    model = tiny_model(ExpressForMaskedModeling)
    with torch.no_grad():
        model.mcv_head.log_theta.uniform_(-1, 1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    # the code travels with the checkpoint, and every Auto class finds it
    assert {"configuration_express.py", "modeling_express.py", "likelihoods.py"} <= {p.name for p in tmp_path.iterdir()}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification"}

    loaded = ExpressForMaskedModeling.from_pretrained(tmp_path).eval()
    assert_same(predictions(loaded, batch), predictions(model, batch))
    # the vocabulary's statistics are part of the checkpoint
    for name in ("gene_zero_fraction", "gene_group_ids", "gene_statistics_set"):
        torch.testing.assert_close(getattr(loaded.express.embeddings, name), getattr(model.express.embeddings, name))
    assert loaded.mlm_head.decoder.weight is loaded.express.embeddings.gene_embeddings.weight


def test_auto_classes_round_trip(tmp_path, batch):
    config = AutoConfig.for_model("express", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    assert isinstance(config, ExpressConfig) and config.hidden_size == 32 and config.vocab_size == 64
    model = tiny_model(ExpressForMaskedModeling)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ExpressConfig)

    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(mlm) is ExpressForMaskedModeling
    assert_same(predictions(mlm, batch), predictions(model, batch))

    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder) is ExpressModel
    assert_same(predictions(encoder, batch), predictions(model.express, batch))

    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4).eval()
    assert type(classifier) is ExpressForCellClassification and classifier.config.num_labels == 4
    with torch.no_grad():
        torch.testing.assert_close(classifier.express(**batch).last_hidden_state,
                                   model.express(**batch).last_hidden_state, rtol=0, atol=0)
    # a fine-tuned classifier round-trips too, labels included
    classifier.config.id2label = {0: "B", 1: "T", 2: "NK", 3: "mono"}
    classifier.config.label2id = {v: k for k, v in classifier.config.id2label.items()}
    classifier.save_pretrained(tmp_path / "clf")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    assert again.config.id2label[2] == "NK"
    assert_same(predictions(again, batch), predictions(classifier, batch))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_from_pretrained_attn_implementation(tmp_path, batch, attn):
    model = tiny_model(ExpressModel)
    model.save_pretrained(tmp_path)
    loaded = ExpressModel.from_pretrained(tmp_path, attn_implementation=attn).eval()
    assert loaded.config._attn_implementation == attn
    torch.testing.assert_close(predictions(loaded, batch)["last_hidden_state"],
                               predictions(model, batch)["last_hidden_state"], rtol=1e-5, atol=1e-5)


def test_flash_attention_request_without_flash_attn_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    tiny_model(ExpressModel).save_pretrained(tmp_path)
    with pytest.raises((ImportError, ValueError), match="(?i)flash"):
        ExpressModel.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    # The express packages must not be importable: the checkpoint's own code has to do everything.
    for name in ("modeling", "tokenizer", "pretrain", "finetune"):
        sys.modules[name] = None
    import numpy as np
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    checkpoint, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3]
    batch = {k: torch.from_numpy(v) for k, v in np.load(inputs, allow_pickle=False).items()}
    mlm = AutoModelForMaskedLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    encoder = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(checkpoint, trust_remote_code=True, num_labels=3)
    assert type(mlm).__module__.startswith("transformers_modules"), type(mlm).__module__
    assert type(classifier).__name__ == "ExpressForCellClassification"
    with torch.no_grad():
        pred = mlm(**batch)
        hidden = encoder(**batch).last_hidden_state
    np.savez(out, logits=pred.logits.numpy(), mcv_logits=pred.mcv_logits.numpy(), hidden=hidden.numpy())
    """
)


def test_trust_remote_code_without_the_express_packages(tmp_path, batch):
    model = tiny_model(ExpressForMaskedModeling)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in batch.items()})
    (tmp_path / "load.py").write_text(REMOTE_SCRIPT)
    work = tmp_path / "elsewhere"  # a cwd from which the repository is not on sys.path
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(checkpoint), str(tmp_path / "inputs.npz"),
         str(tmp_path / "out.npz")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = np.load(tmp_path / "out.npz", allow_pickle=False)
    local = predictions(model, batch)
    np.testing.assert_array_equal(remote["logits"], local["logits"].numpy())
    np.testing.assert_array_equal(remote["mcv_logits"], local["mcv_logits"].numpy())
    np.testing.assert_array_equal(remote["hidden"], local["last_hidden_state"].numpy())


def test_model_files_import_only_torch_transformers_and_siblings():
    """The files that travel with checkpoints must not reach into the rest of the project."""
    import ast
    from pathlib import Path

    import modeling

    from modeling.modeling_express import CODE_FILES

    allowed = {"torch", "transformers", "math", "dataclasses", "collections", "typing", "__future__", "os",
               "pathlib", "shutil", "numpy"}  # numpy for type hints only (always installed beside torch)
    assert set(CODE_FILES) == {p.name for p in Path(modeling.__file__).parent.glob("*.py")} - {"__init__.py"}
    for name in CODE_FILES:
        tree = ast.parse((Path(modeling.__file__).parent / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name} imports {roots - allowed}"


def test_importing_modeling_does_not_import_the_tokenizer():
    code = "import sys, modeling; assert 'tokenizer' not in sys.modules, 'tokenizer imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
