"""Dense, preallocated KV cache for ModernDecoderLM, plus a static-shape decode step for CUDA graphs.

Design choices
- One (B, n_kv_heads, max_len, D) buffer for keys and one for values per layer, allocated once. GQA models
  therefore cache ``n_kv_heads`` heads, never the repeated query heads.
- ``update(layer, k, v)`` writes this step's keys/values at slots ``[length, length + T)`` and returns views of
  slots ``[0, length + T)`` (new tokens last), which is the contract of ``modern_llm.models.attention``.
  ``length`` advances after the LAST layer has written, so every layer of one forward sees the same offset.
- ``next_position`` (= ``length``) is what the model uses for default positions, so prefill-then-decode
  needs no position bookkeeping from the caller when the batch has no padding.
- Left padding: a batch of prompts of different lengths is right-aligned; ``mark_padding`` records which
  slots are padding. While any row has padding the cache publishes ``attn_mask`` (B, 1, T, S): a query sees
  the real slots at or before its own slot, and always itself (so a padding query never gets an all-masked
  row, whose softmax would be NaN and leak into later layers through 0 * NaN). Positions of left-padded rows
  must be passed explicitly by the caller (the engine does), since rows then start at different slots.
- Static mode (``StaticDecodeStep``): for CUDA graphs every tensor shape and address must be fixed, so the
  write slot is a device tensor, ``update`` writes with ``index_copy_`` and returns the FULL buffers, and
  ``attn_mask`` hides the slots not yet written. Python-side state (``length``) is advanced by the step
  object outside the captured region.

- ``SharedPrefixKVCache`` (the engine's ``num_samples`` decode on CPU/GPU eager): after one prefill, N samples
  of a prompt share its keys/values instead of N copies. ``expand(n)`` would copy the prompt n times and
  every decode step would read all n copies; with 16 samples of a 700-token prompt that attention was about
  a third of SmolLM2's CPU time in a one-off profile (the matmuls were the rest). Rows own only the tokens generated after the prefill; each prompt's
  prefix is attended once for all its rows (N * group queries in one matmul) and merged with the row's own
  part through log-sum-exp, which is exact (the block merge of FlashAttention / "cascade" inference).

Footguns
- Writing past ``max_len`` raises; size the cache for prompt + max_new_tokens (+ tool insertions, which the
  engine counts inside max_new_tokens).
- ``expand`` reallocates the buffers and ``keep_rows`` shrinks them to views; a captured CUDA graph holds the
  old addresses and shapes, so batch surgery and static mode do not mix (the engine never compacts in static
  mode).
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer K/V buffers for ``batch_size`` sequences of up to ``max_len`` tokens."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"KVCache: {name} must be >= 1, got {value}")
        self.n_layers, self.max_len = n_layers, max_len
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)  # False = padding
        self.has_padding = False
        self.attn_mask: torch.Tensor | None = None  # read by Attention after update(); None = plain causal
        # Static (CUDA-graph) mode state; see StaticDecodeStep.
        self.static = False
        self.write_index = torch.zeros(1, dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device)

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache shaped for ``model`` (a ModernDecoderLM); dtype/device default to the model's weights."""
        cfg = model.config
        weight = next(model.parameters())
        return cls(
            cfg.n_layers,
            batch_size,
            max_len,
            cfg.n_kv_heads,
            cfg.head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    # ------------------------------------------------------------------ the model-facing hook
    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def next_position(self) -> int:
        """Position of the next token for unpadded rows (left-padded rows need explicit positions)."""
        return self.length

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, KV, T, D) keys/values of this step; return all cached ones (B, KV, S, D), new last."""
        if self.static:
            return self._update_static(layer_idx, k, v)
        T = k.shape[2]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache overflow: {end} tokens > max_len={self.max_len}; allocate the cache for "
                f"prompt length + max_new_tokens"
            )
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KVCache holds batch {self.batch_size} but got keys for batch {k.shape[0]}")
        self.k[layer_idx][:, :, start:end] = k
        self.v[layer_idx][:, :, start:end] = v
        if layer_idx == 0:  # one mask per forward, shared by all layers
            self.attn_mask = self._padding_mask(start, T) if self.has_padding else None
        if layer_idx == self.n_layers - 1:
            self.length = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def _padding_mask(self, start: int, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool: query t (slot start+t) sees real slots <= its own, and always itself."""
        S = start + T
        slots = self._slots[:S]
        query_slots = torch.arange(start, S, device=slots.device)
        causal = slots[None, :] <= query_slots[:, None]  # (T, S)
        itself = slots[None, :] == query_slots[:, None]  # (T, S)
        valid = self.key_valid[:, :S]  # (B, S)
        return (causal & (valid[:, None, :] | itself))[:, None]  # (B, 1, T, S)

    def _update_static(self, layer_idx: int, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        # Fixed shapes: write at a device-side slot, attend over the whole buffer through the mask.
        self.k[layer_idx].index_copy_(2, self.write_index, k)
        self.v[layer_idx].index_copy_(2, self.write_index, v)
        if layer_idx == 0:
            visible = self.key_valid & (self._slots <= self.write_index)  # (B, max_len)
            self.attn_mask = visible[:, None, None, :]  # (B, 1, 1, max_len)
        return self.k[layer_idx], self.v[layer_idx]

    # ------------------------------------------------------------------ engine-facing batch surgery
    def mark_padding(self, pad_mask: torch.Tensor) -> None:
        """``pad_mask`` (B, T) bool, True = padding, for the first T slots (set before the prefill)."""
        if pad_mask.shape[0] != self.batch_size or pad_mask.shape[1] > self.max_len:
            raise ValueError(
                f"pad_mask of shape {tuple(pad_mask.shape)} does not fit cache batch={self.batch_size}, "
                f"max_len={self.max_len}"
            )
        T = pad_mask.shape[1]
        self.key_valid[:, :T] = ~pad_mask.to(self.key_valid.device)
        self.has_padding = bool(pad_mask.any())

    def expand(self, n: int) -> None:
        """Repeat every row ``n`` times in place (row b -> rows b*n .. b*n+n-1): one prefill, n samples."""
        if n == 1:
            return
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        self.key_valid = self.key_valid.repeat_interleave(n, dim=0)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (1-D index tensor), e.g. to drop finished samples.

        In place: the kept rows' filled slots move to the front of the same buffers, which then stay views
        of their first rows. Copying whole buffers (``index_select``) cost max_len slots per row at every
        drop, and with hundreds of samples finishing one by one that copy dominated decode.
        """
        rows = rows.to(self.key_valid.device)
        m, filled = len(rows), self.length
        for buffers in (self.k, self.v):
            for i, t in enumerate(buffers):
                t[:m, :, :filled] = t[rows, :, :filled]  # the right side is a copy, so overlap is safe
                buffers[i] = t[:m]
        self.key_valid = self.key_valid.index_select(0, rows)
        self.has_padding = bool((~self.key_valid[:, : self.length]).any())


def attend_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries (..., M, D) over one block of keys/values (..., S, D), no causal mask.

    Returns (output (..., M, D), log-sum-exp of the scaled scores (..., M, 1) fp32); ``valid`` (bool,
    broadcastable to (..., M, S)) hides keys. Two blocks' outputs merge exactly by their log-sum-exps (``SharedPrefixKVCache.attend``).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (..., M, S)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    lse = scores.logsumexp(dim=-1, keepdim=True)  # (..., M, 1)
    return torch.matmul((scores - lse).exp().to(v.dtype), v), lse


class SharedPrefixKVCache:
    """Decode cache for n samples of each of P prompts whose prefill keys/values are stored once.

    Built from the prefilled ``KVCache`` of the P prompts (row order ``p * n + s``, as ``KVCache.expand``).
    ``update`` stores each row's new token in ``rows``, a plain ``KVCache`` of ``max_new`` slots; the model's
    attention calls ``attend`` (it checks ``shared_prefix``). ``keep_rows`` drops finished rows (only their
    own slots are copied). Decoding only: one new token per row per step.
    """

    shared_prefix = True
    attn_mask = None  # rows hold no padding: the prompt's padding is handled inside ``attend``

    def __init__(self, prompts: KVCache, n: int, max_new: int):
        L = prompts.length
        self.prefix_k = [k[:, :, :L] for k in prompts.k]  # per layer (P, KV, L, D)
        self.prefix_v = [v[:, :, :L] for v in prompts.v]
        self.prefix_valid = prompts.key_valid[:, :L]  # (P, L) False = left padding
        self.prefix_length = L
        P, KV, _, D = prompts.k[0].shape
        k0 = prompts.k[0]
        self.rows = KVCache(prompts.n_layers, P * n, max_new, KV, D, dtype=k0.dtype, device=k0.device)
        self.row_prompt = torch.arange(P, device=k0.device).repeat_interleave(n)  # (B,)
        self._place_rows()

    @property
    def batch_size(self) -> int:
        return self.rows.batch_size

    @property
    def next_position(self) -> int:
        return self.prefix_length + self.rows.length

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, KV, 1, D) keys/values; return the rows' own ones (B, KV, S, D)."""
        if k.shape[2] != 1:
            raise ValueError(
                f"SharedPrefixKVCache decodes one token per row per step, got {k.shape[2]}; run a multi-token "
                "forward on a KVCache (expand() it instead)"
            )
        return self.rows.update(layer_idx, k, v)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.rows.keep_rows(rows)
        self.row_prompt = self.row_prompt.index_select(0, rows.to(self.row_prompt.device))
        self._place_rows()

    def _place_rows(self) -> None:
        """Each row's (prompt, slot) in a (P, slots) grid, so all prompts attend in one batched matmul.

        Rows of a prompt are contiguous (row order p * n + s, kept by keep_rows); slot = rank within them.
        """
        rp = self.row_prompt
        first = torch.searchsorted(rp, rp)  # index of the first row of each row's prompt (rp is sorted)
        self._slot = torch.arange(len(rp), device=rp.device) - first
        self._n_slots = int(self._slot.max()) + 1

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Queries (B, H, 1, D) over [their prompt's prefix ; their own keys k/v (B, KV, S, D)] -> (B, H, 1, D)."""
        B, H, _, D = q.shape
        KV, g = k.shape[1], H // k.shape[1]
        q = q.reshape(B, KV, g, D)  # query heads grouped under their KV head (GQA)
        out_own, lse_own = attend_block(q, k, v)  # (B, KV, g, D), (B, KV, g, 1)
        pk, pv = self.prefix_k[layer_idx], self.prefix_v[layer_idx]  # (P, KV, L, D)
        P, n = pk.shape[0], self._n_slots
        grid = q.new_zeros(P, n, KV, g, D)  # empty slots (finished rows) attend too and are dropped
        grid[self.row_prompt, self._slot] = q
        grid = grid.permute(0, 2, 1, 3, 4).reshape(P, KV, n * g, D)  # a prompt's queries share its keys
        out, lse = attend_block(grid, pk, pv, self.prefix_valid[:, None, None, :])  # (P, KV, n*g, D|1)
        out_pre = out.view(P, KV, n, g, D).permute(0, 2, 1, 3, 4)[self.row_prompt, self._slot]
        lse_pre = lse.view(P, KV, n, g, 1).permute(0, 2, 1, 3, 4)[self.row_prompt, self._slot]
        lse = torch.logaddexp(lse_pre, lse_own)
        y = out_pre.float() * (lse_pre - lse).exp() + out_own.float() * (lse_own - lse).exp()
        return y.to(q.dtype).view(B, H, 1, D)


class StaticDecodeStep:
    """One-token decode with fixed shapes, replayable as a CUDA graph.

    ``step(tokens (B,), positions (B,)) -> logits (B, V)``: copies the inputs into static buffers, points the
    cache's device-side write slot at ``cache.length``, runs (or replays) the forward over the full cache
    buffers and advances ``cache.length``. ``mode``: "eager" runs the same static-shape code without capture
    (the CPU path, used to test equivalence); "cuda_graph" captures it with ``torch.cuda.CUDAGraph`` on the
    first call; "compile" wraps it in ``torch.compile(mode="reduce-overhead")`` (which also uses CUDA graphs).

    Footguns: MoE layers route with data-dependent shapes, and learned absolute positions check their range
    on the host, so neither can be captured (both rejected here); the graph bakes in the cache's buffer
    addresses, so build a new step after ``expand``/``keep_rows``. Not run on a GPU during development.
    """

    def __init__(self, model: torch.nn.Module, cache: KVCache, mode: str = "eager"):
        if mode not in ("eager", "cuda_graph", "compile"):
            raise ValueError(
                f"StaticDecodeStep mode must be 'eager', 'cuda_graph' or 'compile', got {mode!r}"
            )
        device = cache.k[0].device
        if mode != "eager" and device.type != "cuda":
            raise ValueError(f"mode={mode!r} needs the model and cache on CUDA, got {device}; use 'eager'")
        if mode != "eager" and getattr(model.config, "is_moe", False):
            raise ValueError("MoE routing has data-dependent shapes and cannot be captured; use mode='eager'")
        if mode != "eager" and getattr(model.config, "pos_encoding", "rope") == "learned":
            # the learned-position range check reads positions on the host, which a capture cannot do
            raise ValueError("learned absolute positions cannot be captured; use mode='eager'")
        self.model, self.cache, self.mode = model, cache, mode
        B = cache.batch_size
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self._graph = None
        self._logits: torch.Tensor | None = None
        self._forward = self._run
        if mode == "compile":
            self._forward = torch.compile(self._run, mode="reduce-overhead", fullgraph=False)

    def _run(self) -> torch.Tensor:
        self.cache.static = True
        try:
            return self.model(self.tokens, positions=self.positions, kv_cache=self.cache).logits[:, -1]
        finally:
            self.cache.static = False

    def _capture(self) -> None:
        # Warm up on a side stream (allocator + lazy init), then record. Warm-up writes K/V only into the
        # slot this very step is about to overwrite, so it leaves no trace in the cache.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._run()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.length >= cache.max_len:
            raise ValueError(f"KVCache overflow: cache is full (max_len={cache.max_len})")
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        cache.write_index.fill_(cache.length)
        if self.mode == "cuda_graph":
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self._logits.clone()
        else:
            logits = self._forward().clone()
        cache.length += 1
        return logits
