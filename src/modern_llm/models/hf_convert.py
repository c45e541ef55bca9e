"""Convert ModernDecoderLM <-> Hugging Face ``LlamaForCausalLM`` (dense) / ``MixtralForCausalLM`` (all-MoE).

The mapping is a pure renaming plus splitting of our fused projections:
  qkv    -> q_proj / k_proj / v_proj (rows in that order)
  gate_up -> gate_proj / up_proj     (gate rows first)
  MoE    -> mlp.gate (router), mlp.experts.gate_up_proj / down_proj (same fused 3-D layout as ours)

Features HF cannot represent raise ``UnsupportedExport`` instead of producing a silently different model:
attention sinks, QK-norm, learned/NoPE positions, and MoE in only some layers (Mixtral is MoE everywhere).
Capacity-based token dropping only happens in training mode, so it does not affect exported inference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.models.transformer import ModernDecoderLM


class UnsupportedExport(ValueError):
    """The model uses a feature the target HF architecture does not have."""


def _check_exportable(cfg: ModernLLMConfig) -> str:
    problems = []
    if cfg.n_sinks:
        problems.append(f"attention sinks (n_sinks={cfg.n_sinks}) have no HF Llama/Mixtral equivalent")
    if cfg.qk_norm:
        problems.append("qk_norm=True is not part of Llama/Mixtral")
    if cfg.pos_encoding != "rope":
        problems.append(f"pos_encoding={cfg.pos_encoding!r}: Llama/Mixtral only support RoPE")
    if cfg.moe_layers and len(cfg.moe_layers) != cfg.n_layers:
        problems.append(f"MoE in layers {cfg.moe_layers} of {cfg.n_layers}: Mixtral needs MoE in every layer")
    if cfg.moe_layers and cfg.moe_d_ff != cfg.d_ff:
        problems.append("moe_d_ff != d_ff cannot be expressed in a Mixtral config")
    if problems:
        raise UnsupportedExport("cannot export to Hugging Face: " + "; ".join(problems))
    return "mixtral" if cfg.moe_layers else "llama"


def hf_config_for(cfg: ModernLLMConfig):
    from transformers import LlamaConfig, MixtralConfig

    arch = _check_exportable(cfg)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        initializer_range=cfg.init_std,
    )
    if arch == "mixtral":
        return MixtralConfig(
            **common,
            num_local_experts=cfg.moe_n_experts,
            num_experts_per_tok=cfg.moe_top_k,
            router_aux_loss_coef=cfg.moe_aux_loss_coef,
        )
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def to_hf_state_dict(model: ModernDecoderLM) -> dict[str, torch.Tensor]:
    cfg = model.config
    _check_exportable(cfg)
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_rows, kv_rows, kv_rows], dim=0)
        sd |= {
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.out.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
        }
        if block.is_moe:
            sd |= {
                p + "mlp.gate.weight": block.ffn.router.weight,
                p + "mlp.experts.gate_up_proj": block.ffn.w_gate_up,
                p + "mlp.experts.down_proj": block.ffn.w_down,
            }
        else:
            gate, up = block.ffn.gate_up.weight.chunk(2, dim=0)
            sd |= {
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": block.ffn.down.weight,
            }
    sd["model.norm.weight"] = model.norm.weight
    sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _set_special_ids(hf, tokenizer) -> None:
    """Llama's config defaults (bos=1, eos=2) name unrelated tokens in our vocabularies: take them from the
    tokenizer, or clear them, so HF ``generate`` never stops on a wrong id."""
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        setattr(hf.config, attr, value)
        if getattr(hf, "generation_config", None) is not None:
            setattr(hf.generation_config, attr, value)


def to_hf_model(model: ModernDecoderLM, tokenizer=None):
    """Build the equivalent in-memory HF model (fp32, eval mode); special ids come from ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config_for(model.config), dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [m for m in missing if not (model.config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF export mapping is out of date: missing={missing} unexpected={unexpected}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    _set_special_ids(hf, tokenizer)
    return hf.eval()


def export_hf(model: ModernDecoderLM, out_dir: str | Path, tokenizer=None) -> Path:
    """Write an HF folder (safetensors + config [+ tokenizer]) loadable with ``AutoModelForCausalLM``."""
    out_dir = Path(out_dir)
    hf = to_hf_model(model, tokenizer)
    hf.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def config_from_hf(hf_config) -> ModernLLMConfig:
    model_type = getattr(hf_config, "model_type", "")
    if model_type not in {"llama", "mixtral"}:
        raise ValueError(f"can only import Llama or Mixtral checkpoints, got model_type={model_type!r}")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported by ModernDecoderLM")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError("head_dim * num_attention_heads != hidden_size is not supported by ModernDecoderLM")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("Llama checkpoints with attention/MLP biases are not supported by ModernDecoderLM")
    kwargs = dict(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads,
        d_ff=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
    )
    if model_type == "mixtral":
        kwargs |= dict(
            moe_layers=list(range(hf_config.num_hidden_layers)),
            moe_n_experts=hf_config.num_local_experts,
            moe_top_k=hf_config.num_experts_per_tok,
            moe_capacity_factor=0.0,
        )
    return ModernLLMConfig(**kwargs)


def from_hf_model(hf_model) -> ModernDecoderLM:
    """Import an in-memory HF Llama/Mixtral model into a ModernDecoderLM with the same weights."""
    cfg = config_from_hf(hf_model.config)
    hf_sd = hf_model.state_dict()
    if any("lora_" in key or "base_layer" in key for key in hf_sd):
        raise ValueError(
            "this model carries unmerged LoRA adapters; merge them first (peft_model.merge_and_unload()) "
            "so the imported weights include them"
        )
    model = ModernDecoderLM(cfg)
    with torch.no_grad():
        model.tok_emb.weight.copy_(hf_sd["model.embed_tokens.weight"])
        for i, block in enumerate(model.blocks):
            p = f"model.layers.{i}."
            block.attn_norm.weight.copy_(hf_sd[p + "input_layernorm.weight"])
            block.ffn_norm.weight.copy_(hf_sd[p + "post_attention_layernorm.weight"])
            block.attn.qkv.weight.copy_(
                torch.cat([hf_sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
            )
            block.attn.out.weight.copy_(hf_sd[p + "self_attn.o_proj.weight"])
            if block.is_moe:
                block.ffn.router.weight.copy_(hf_sd[p + "mlp.gate.weight"])
                block.ffn.w_gate_up.copy_(hf_sd[p + "mlp.experts.gate_up_proj"])
                block.ffn.w_down.copy_(hf_sd[p + "mlp.experts.down_proj"])
            else:
                block.ffn.gate_up.weight.copy_(
                    torch.cat([hf_sd[p + "mlp.gate_proj.weight"], hf_sd[p + "mlp.up_proj.weight"]], dim=0)
                )
                block.ffn.down.weight.copy_(hf_sd[p + "mlp.down_proj.weight"])
        model.norm.weight.copy_(hf_sd["model.norm.weight"])
        if not cfg.tie_embeddings:
            model.lm_head.weight.copy_(hf_sd["lm_head.weight"])
    return model.eval()


def import_hf(path: str | Path) -> ModernDecoderLM:
    """Load a Llama/Mixtral folder from disk (or a Hub id when online) into ModernDecoderLM."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
    return from_hf_model(hf)


def export_main(argv: list[str] | None = None) -> int:
    """CLI: trainer checkpoint -> HF folder (model + tokenizer) loadable with AutoModelForCausalLM."""
    import argparse

    from modern_llm.models.pretrained import load_pretrained

    p = argparse.ArgumentParser(prog="modern-llm export-hf", description=export_main.__doc__)
    p.add_argument("--checkpoint", required=True, help="a step_* folder or a run folder (latest checkpoint)")
    p.add_argument("--out", required=True, help="output folder for the Hugging Face model")
    args = p.parse_args(argv)
    model, tokenizer, ckpt = load_pretrained(args.checkpoint)
    try:
        out = export_hf(model, args.out, tokenizer)
    except UnsupportedExport as err:
        p.error(str(err))
    print(f"exported {ckpt} -> {out} ({type(to_hf_model(model)).__name__})")
    return 0


def import_main(argv: list[str] | None = None) -> int:
    """CLI: HF Llama/Mixtral folder (or Hub id when online) -> a checkpoint folder for our engine/trainer."""
    import argparse

    from transformers import AutoTokenizer

    from modern_llm.config.base import config_to_dict
    from modern_llm.utils.checkpointing import save_checkpoint

    p = argparse.ArgumentParser(prog="modern-llm import-hf", description=import_main.__doc__)
    p.add_argument("--hf-model", required=True, help="local HF folder (or Hub id when online)")
    p.add_argument(
        "--out", required=True, help="run folder; the checkpoint goes to <out>/checkpoints/step_0000000"
    )
    args = p.parse_args(argv)
    model = import_hf(args.hf_model)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_model, trust_remote_code=False)
    ckpt = save_checkpoint(
        Path(args.out) / "checkpoints",
        0,
        model,
        {"step": 0},
        {"model": config_to_dict(model.config)},
        extra_files=lambda folder: tokenizer.save_pretrained(folder / "tokenizer"),
    )
    print(f"imported {args.hf_model} -> {ckpt}")
    return 0
