"""Attention probability maps for a prompt, per layer and head, for ModernDecoderLM and Hugging Face models.

Design choices
- Our model is never modified. Its attention runs through SDPA, which does not return probabilities, so a
  forward hook on every ``Attention`` module captures the module's own inputs (the normed hidden state and
  the RoPE tables the model computed) and ``recompute_attention`` redoes the score computation in fp32 with
  the module's own weights: fused ``qkv`` -> optional q_norm/k_norm -> ``apply_rope`` -> learnable sink keys
  prepended -> causal mask -> softmax. The test suite checks that ``probs @ V`` pushed through the module's
  output projection reproduces the module's output, so the maps are provably the attention the model used;
  the CLI records that reconstruction error next to every figure.
- Key axis layout: ``n_sinks`` learnable sink columns first, then the T prompt tokens, so every map is
  ``(L, H, T, n_sinks + T)`` and rows sum to 1. HF models have no learnable sinks (n_sinks = 0).
- GQA: query head h reads KV head ``h // (n_heads // n_kv_heads)``, the same grouping as SDPA's
  ``enable_gqa`` (``repeat_interleave``), so head indices in our maps match HF's after an import.
- HF models: probabilities come from the model itself (``output_attentions=True``) with the eager attention
  implementation; fused kernels (sdpa/flash) cannot return them. The implementation is switched to eager for
  the call and switched back afterwards.
- Sink mass (StreamingLLM, Xiao et al. 2023: a large share of attention lands on the first tokens whatever
  they say): per layer, the attention mass on the learnable sinks, and on the first ``n_first`` prompt
  tokens, averaged over heads and query positions. For first-token mass the first ``n_first`` queries are
  left out, because they can only see those tokens (their mass is 1 by construction). Each curve comes with
  the mass a uniform causal attention would give, so "more than chance" is visible in the figure.
- Figures use matplotlib's object API (``Figure`` + Agg canvas), never pyplot: no global state, no GUI
  backend, safe to call from tests and worker threads.

Footguns
- Maps need the whole prompt in one forward pass: a KV cache in the forward call is rejected.
- Dropout must be off: the functions put the model in eval mode for the call and restore its mode after.
- Long prompts make unreadable heatmaps; tick labels are dropped above ``MAX_LABELLED_TOKENS`` tokens.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from modern_llm.models.attention import Attention, apply_rope

MAX_LABELLED_TOKENS = 48


# ---------------------------------------------------------------------------------------------------------------
# Our model: recompute probabilities from the inputs each Attention module received
# ---------------------------------------------------------------------------------------------------------------


def recompute_attention(
    attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities and values of ``attn`` for input ``x`` (B, T, d_model), no KV cache.

    Returns ``probs`` (B, H, T, n_sinks + T) in fp32, rows summing to 1, and ``values`` (B, H, n_sinks + T, D)
    in fp32 with KV heads repeated per query head, so ``probs @ values`` is the per-head attention output.
    """
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = k.view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
    v = v.view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.use_rope and rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    S = attn.n_sinks
    if S:  # sinks carry no position: prepended after RoPE, exactly as the module does
        k = torch.cat([attn.sink_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, KV, S+T, D)
        v = torch.cat([attn.sink_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
    group = H // KV
    k = k.float().repeat_interleave(group, dim=1)  # (B, H, S+T, D): SDPA's enable_gqa grouping
    v = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, S+T)
    scores = scores.masked_fill(~causal_mask_with_sinks(T, S, x.device), float("-inf"))
    return scores.softmax(dim=-1), v


def causal_mask_with_sinks(T: int, n_sinks: int, device=None) -> torch.Tensor:
    """(T, n_sinks + T) boolean: query i sees every sink and prompt tokens 0..i."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat([causal.new_ones(T, n_sinks), causal], dim=1)


@dataclass
class LayerCapture:
    """What one Attention module computed: probabilities, values and the module's actual output."""

    probs: torch.Tensor  # (B, H, T, S+T) fp32
    values: torch.Tensor  # (B, H, S+T, D) fp32
    output: torch.Tensor  # (B, T, d_model): the module's own return value


def _hook_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple | None, object]:
    """(x, rope, kv_cache) from an ``Attention.forward(x, rope, kv_cache=None)`` call, however passed."""
    names = ("x", "rope", "kv_cache")
    values = list(args) + [kwargs.get(n) for n in names[len(args) :]]
    return values[0], values[1], values[2] if len(values) > 2 else None


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (T,) or (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
    return input_ids


def capture_modern_attention(
    model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor | None = None
) -> list[LayerCapture]:
    """Run ``model`` once on ``input_ids`` (T,) or (B, T) and recompute every layer's attention."""
    input_ids = _as_batch(input_ids)
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no modern_llm Attention modules; use hf_attention_maps")
    captures: dict[int, LayerCapture] = {}

    def hook(module: Attention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x, rope, kv_cache = _hook_inputs(args, kwargs)
        if kv_cache is not None:
            raise ValueError(
                "attention maps need the whole prompt in one forward pass; call without kv_cache"
            )
        probs, values = recompute_attention(module, x, rope)
        captures[module.layer_idx] = LayerCapture(probs, values, output.detach())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        with _eval_mode(model), torch.no_grad():
            model(input_ids, positions=positions)
    finally:
        for h in handles:
            h.remove()
    return [captures[i] for i in sorted(captures)]


def modern_attention_maps(
    model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """(L, H, T, n_sinks + T) attention probabilities of a ModernDecoderLM for one prompt (T,) or (1, T)."""
    input_ids = _as_batch(input_ids)
    if input_ids.shape[0] != 1:
        raise ValueError(f"attention maps are for one prompt; got a batch of {input_ids.shape[0]}")
    return torch.stack([c.probs[0] for c in capture_modern_attention(model, input_ids, positions)])


def reconstruction_error(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Max |attn.out(probs @ V) - module output| over layers: ~1e-6 proves the maps are the model's attention."""
    modules = {m.layer_idx: m for m in model.modules() if isinstance(m, Attention)}
    worst = 0.0
    with torch.no_grad():
        for i, cap in enumerate(capture_modern_attention(model, input_ids)):
            attn = modules[i]
            B, H, T, _ = cap.probs.shape
            heads = cap.probs @ cap.values  # (B, H, T, D)
            merged = heads.transpose(1, 2).reshape(B, T, H * attn.head_dim)  # (B, T, H*D)
            rebuilt = attn.out(merged.to(attn.out.weight.dtype))
            worst = max(worst, (rebuilt.float() - cap.output.float()).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face models: the model's own probabilities through the eager implementation
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous is not None and previous != "eager"
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def hf_attention_maps(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(L, H, T, T) attention probabilities of an HF causal LM for one prompt (T,) or (1, T)."""
    input_ids = _as_batch(input_ids)
    if input_ids.shape[0] != 1:
        raise ValueError(f"attention maps are for one prompt; got a batch of {input_ids.shape[0]}")
    device = next(model.parameters()).device
    with _eval_mode(model), _eager_attention(model), torch.no_grad():
        out = model(input_ids.to(device), output_attentions=True, use_cache=False)
    if not out.attentions or any(a is None for a in out.attentions):
        raise ValueError(f"{type(model).__name__} returned no attention probabilities with output_attentions")
    return torch.stack([a[0].float().cpu() for a in out.attentions])  # (L, H, T, T)


# ---------------------------------------------------------------------------------------------------------------
# Sink statistics
# ---------------------------------------------------------------------------------------------------------------


def sink_mass(probs: torch.Tensor, n_sinks: int) -> list[float]:
    """Per layer: attention mass on the ``n_sinks`` learnable sink columns, mean over heads and queries."""
    if n_sinks <= 0:
        raise ValueError("sink_mass needs n_sinks > 0; use first_token_mass for models without sinks")
    return probs[..., :n_sinks].sum(-1).mean(dim=(1, 2)).tolist()  # (L,)


def first_token_mass(probs: torch.Tensor, n_sinks: int = 0, n_first: int = 1) -> list[float]:
    """Per layer: mass on the first ``n_first`` prompt tokens, mean over heads and queries i >= n_first."""
    T = probs.shape[2]
    if not 1 <= n_first < T:
        raise ValueError(f"n_first must be in [1, {T - 1}] for a {T}-token prompt, got {n_first}")
    mass = probs[..., n_sinks : n_sinks + n_first].sum(-1)  # (L, H, T)
    return mass[:, :, n_first:].mean(dim=(1, 2)).tolist()


def uniform_mass(T: int, n_sinks: int, n_cols: int, skip_queries: int = 0) -> float:
    """The mass ``n_cols`` key columns would get if every query attended uniformly to all it can see."""
    visible = [n_sinks + i + 1 for i in range(skip_queries, T)]
    return sum(n_cols / v for v in visible) / len(visible)


def sink_summary(probs: torch.Tensor, n_sinks: int, n_first: int = 1) -> dict[str, object]:
    """Sink statistics of a (L, H, T, n_sinks + T) map: per-layer lists and their uniform baselines."""
    T = probs.shape[2]
    summary: dict[str, object] = {}
    if n_sinks:
        summary["sink_mass_per_layer"] = sink_mass(probs, n_sinks)
        summary["sink_mass_uniform"] = uniform_mass(T, n_sinks, n_sinks)
    if n_first < T:
        summary["first_token_mass_per_layer"] = first_token_mass(probs, n_sinks, n_first)
        summary["first_token_mass_uniform"] = uniform_mass(T, n_sinks, n_first, skip_queries=n_first)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable per-token strings (each id decoded alone; whitespace made visible)."""
    labels = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        labels.append(text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or f"<{int(i)}>")
    return labels


def plot_layer_heads(
    layer_probs: torch.Tensor, tokens: Sequence[str], n_sinks: int, path: str | Path, title: str = ""
) -> Path:
    """One PNG with a heatmap per head (grid) of a (H, T, n_sinks + T) layer map; rows = queries."""
    H, T, K = layer_probs.shape
    if len(tokens) != T or n_sinks + T != K:
        raise ValueError(
            f"map of shape {tuple(layer_probs.shape)} does not fit {len(tokens)} tokens + {n_sinks} sinks"
        )
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    cell = min(8.0, 2.5 + 0.14 * K)
    fig = Figure(figsize=(cols * cell, rows * cell), layout="constrained")
    key_labels = [f"<sink{s}>" for s in range(n_sinks)] + list(tokens)
    labelled = K <= MAX_LABELLED_TOKENS
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)  # sqrt scale: small but real weights stay visible
    image = None
    for h in range(H):
        ax = fig.add_subplot(rows, cols, h + 1)
        image = ax.imshow(
            layer_probs[h].numpy(), cmap="viridis", norm=norm, aspect="auto", interpolation="nearest"
        )
        ax.set_title(f"head {h}", fontsize=9)
        if n_sinks:
            ax.axvline(n_sinks - 0.5, color="white", linewidth=0.8)
        if labelled:
            ax.set_xticks(range(K), key_labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), list(tokens), fontsize=6)
        else:
            ax.set_xlabel("key position", fontsize=7)
            ax.set_ylabel("query position", fontsize=7)
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention probability (sqrt scale)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_sink_mass(summary: dict[str, object], path: str | Path, title: str = "") -> Path:
    """Line plot per layer of sink / first-token attention mass with their uniform-attention baselines."""
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    curves = [("sink_mass", "learnable sinks", "tab:red"), ("first_token_mass", "first token(s)", "tab:blue")]
    for key, label, color in curves:
        values = summary.get(f"{key}_per_layer")
        if values is None:
            continue
        ax.plot(range(len(values)), values, marker="o", color=color, label=label)
        ax.axhline(
            summary[f"{key}_uniform"], color=color, linestyle="--", linewidth=1, label=f"{label}: uniform"
        )
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("attention mass (mean over heads, queries)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: attention mass on sink tokens per layer".lstrip(": "), fontsize=10)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path


# ---------------------------------------------------------------------------------------------------------------
# End to end: prompt -> maps -> PNGs + JSON summary
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionReport:
    probs: torch.Tensor  # (L, H, T, n_sinks + T)
    tokens: list[str]
    n_sinks: int
    summary: dict[str, object]
    files: list[Path]


def visualize(
    probs: torch.Tensor,
    tokens: Sequence[str],
    n_sinks: int,
    out_dir: str | Path,
    layers: Sequence[int] | None = None,
    n_first: int = 1,
    title: str = "",
) -> AttentionReport:
    """Write ``layer_XX.png`` per chosen layer and ``sink_mass.png`` into ``out_dir``; return the summary."""
    out_dir = Path(out_dir)
    L = probs.shape[0]
    layers = list(range(L)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < L]
    if bad:
        raise ValueError(f"--layers {bad} out of range: the model has layers 0..{L - 1}")
    files = [
        plot_layer_heads(
            probs[i], tokens, n_sinks, out_dir / f"layer_{i:02d}.png", f"{title} layer {i}".strip()
        )
        for i in layers
    ]
    summary = sink_summary(probs, n_sinks, n_first)
    files.append(plot_sink_mass(summary, out_dir / "sink_mass.png", title))
    return AttentionReport(probs, list(tokens), n_sinks, summary, files)


def _load_checkpoint_model(checkpoint: str, tokenizer_path: str | None):
    from modern_llm.data.tokenizer import load_tokenizer
    from modern_llm.models.pretrained import load_pretrained

    model, tokenizer, ckpt = load_pretrained(checkpoint)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer is None:
        raise FileNotFoundError(f"{ckpt}: the checkpoint has no tokenizer/ folder; pass --tokenizer PATH")
    return model, tokenizer, ckpt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attention-viz",
        description="Plot per-layer/per-head attention maps for a prompt and measure attention-sink mass.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our trainer checkpoint (step_* folder or run folder)")
    src.add_argument("--hf-model", help="HF model: registered short name, local folder or Hub id")
    p.add_argument("--tokenizer", help="tokenizer folder for --checkpoint (default: <checkpoint>/tokenizer)")
    p.add_argument(
        "--prompt", required=True, help="text to visualise (keep it short: < ~48 tokens for labels)"
    )
    p.add_argument("--add-bos", action="store_true", help="prepend the BOS (or EOS) token if not present")
    p.add_argument("--layers", type=int, nargs="*", help="layers to plot (default: all)")
    p.add_argument("--first-tokens", type=int, default=1, help="how many leading tokens count as sinks")
    p.add_argument(
        "--out-dir", default="experiments/attention", help="results root; files go to <out-dir>/<name>/"
    )
    p.add_argument("--name", help="run name (default: derived from the model)")
    p.add_argument("--device", default="cpu")
    return p


def _encode(tokenizer, prompt: str, add_bos: bool, hf: bool) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=hf)["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if not ids:
        raise ValueError("--prompt encodes to zero tokens; pass some text")
    return ids


def main(argv: list[str] | None = None) -> int:
    from modern_llm.utils.records import now_iso, write_record

    args = build_parser().parse_args(argv)
    started, t0 = now_iso(), time.time()
    if args.checkpoint:
        model, tokenizer, ckpt = _load_checkpoint_model(args.checkpoint, args.tokenizer)
        model_name, hf = str(ckpt), False
    else:
        from modern_llm.hf.registry import load_model

        model, tokenizer = load_model(args.hf_model)
        model_name, hf = args.hf_model, True
    model.to(args.device)
    ids = _encode(tokenizer, args.prompt, args.add_bos, hf)
    input_ids = torch.tensor([ids], device=args.device)
    metrics: dict[str, object] = {}
    if hf:
        probs, n_sinks = hf_attention_maps(model, input_ids), 0
    else:
        probs, n_sinks = modern_attention_maps(model, input_ids).cpu(), model.config.n_sinks
        metrics["reconstruction_max_abs_err"] = reconstruction_error(model, input_ids)
    name = args.name or _slug(Path(model_name).name if not hf else model_name)
    out_dir = Path(args.out_dir) / name
    tokens = token_labels(tokenizer, ids)
    report = visualize(probs, tokens, n_sinks, out_dir, args.layers, args.first_tokens, title=name)
    metrics |= report.summary
    record = write_record(
        out_dir / "summary.json",
        name=f"attention-{name}",
        task="attention-viz",
        model=model_name,
        metrics=metrics,
        protocol={
            "prompt": args.prompt,
            "n_tokens": len(ids),
            "tokens": tokens,
            "n_sinks": n_sinks,
            "first_tokens": args.first_tokens,
            "source": "hf-eager-output_attentions" if hf else "modern-hook-recompute",
            "layers_plotted": args.layers if args.layers is not None else list(range(probs.shape[0])),
            "files": [f.name for f in report.files],
        },
        seed=None,
        device=str(args.device),
        dtype="fp32",
        started=started,
        duration_s=time.time() - t0,
    )
    print(f"wrote {len(report.files)} figures and {record}")
    for key, value in report.summary.items():
        shown = [round(v, 3) for v in value] if isinstance(value, list) else round(float(value), 3)
        print(f"  {key}: {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
