"""export-hf / import-hf round trip through the CLI on a trained checkpoint."""

import torch
from transformers import AutoModelForCausalLM

from modern_llm.config.base import apply_overrides
from modern_llm.models.hf_convert import export_main, import_main
from modern_llm.models.pretrained import load_pretrained
from modern_llm.training.train_lm import LMRunConfig, run


def test_export_then_import_round_trip(tmp_path):
    cfg = apply_overrides(
        LMRunConfig(),
        {
            "model.d_model": 32,
            "model.n_layers": 1,
            "model.n_heads": 2,
            "model.max_seq_len": 16,
            "train.out_dir": str(tmp_path / "run"),
            "train.max_steps": 2,
            "train.warmup_steps": 1,
            "train.batch_size": 2,
            "train.progress": False,
            "train.tensorboard": False,
            "train.eval_batches": 1,
            "data.corpus": "embedded:50",
            "data.vocab_size": 320,
            "data.cache_dir": str(tmp_path / "c"),
            "sample.max_new_tokens": 2,
        },
    )
    run(cfg)
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours, tok, _ = load_pretrained(tmp_path / "run")
    ids = torch.tensor([tok.encode("Once upon a time")])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-4
    assert import_main(["--hf-model", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    back, tok2, _ = load_pretrained(tmp_path / "imported")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours(ids).logits)
    assert tok2.encode("Once upon a time") == ids[0].tolist()
