"""A faster decode path for HookedTransformers: Llama-like pre-norm blocks and the variants
`unsupported_reason` does not name (post-norm OLMo-2, Gemma's sandwich norms and soft caps,
LayerNorm, parallel attention + MLP, learned positions, sliding windows).

Same weights, and the residual-stream hook points (`hook_embed`, `blocks.L.hook_resid_pre/mid/post`,
`hook_attn_out`, `hook_mlp_out`, `attn.hook_q/k/v/rot_q/z`, the norms' and MLP's hooks) fire on the
same tensors as in `model(...)`, so `steer()` and user hooks work unchanged. What changes:

- keys and values live in a static, pre-allocated cache (rotated once, written in place), where
  TransformerLens concatenates its cache every step and re-rotates every cached key;
- attention is `scaled_dot_product_attention` with grouped-query heads, without materialising
  repeated K/V or the score matrix;
- the rest of a block runs in fewer, larger operations (`engine.fusion`: joined Q/K/V and
  gate/input projections, one-call RMSNorm, Q and K rotated together with rotary rows looked up
  once per step), wherever no hook could tell; `fuse=False` keeps TransformerLens's own modules;
- for float32 models on CPU, those multiplies go through oneDNN with each weight packed once
  (`engine.cpu_linear`), 2-5x faster than MKL's sgemm for a decode step's few rows; on CUDA
  the element-wise middle of a block and the residual add + RMSNorm pairs are Triton kernels
  (`engine.kernels.block`), and so, for a step's few rows, are the attention output and down
  projections whose result that add reads (`engine.kernels.splitk`: pieces of a split-K multiply,
  summed by the add + RMSNorm launch), and the gated MLP's gate/up multiply with silu(gate) * up
  in its epilogue (`engine.kernels.gate_up`), where they beat cuBLAS. That block arithmetic lives
  in `engine.sublayers`;
- a prefill or a fork (several new columns) runs the last block past its keys and values for the
  last column alone, the only one whose logits are read (`last_column_only`), unless a hook point
  of that block, the final norm or the unembedding carries a hook.

So `attn.hook_rot_k` (which TransformerLens fires on the whole key history),
`hook_attn_scores`, `hook_pattern` and `hook_result` do not fire here: if any of them carries a hook,
or the architecture is not covered (`unsupported_reason`), `make_decoder` returns the
`ReferenceDecoder`.
"""

from collections import Counter

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from isokl_tl.engine import attention, cpu_linear, fusion
from isokl_tl.engine.decoder import Decoder
from isokl_tl.engine.distinct import Distinct, SharedRows, distinct_rows
from isokl_tl.engine.kv_cache import KVCache
from isokl_tl.engine.sublayers import Sublayers
from isokl_tl.engine.scoring import triton_available
from isokl_tl.hooks import Steering, SteeringGroup, first_rows, handles, rows_of

POST_NORM = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")   # blocks normalise sublayer outputs, and Q/K as whole vectors


class FastDecoder(Sublayers, Decoder):
    """Static KV cache + SDPA decode step over the model's own modules (see module docstring)."""

    name = "fast"
    shares_prefix = True

    def __init__(self, model: HookedTransformer, steering: Steering | SteeringGroup | None, capacity: int,
                 fuse: bool = True):
        super().__init__(model, steering, capacity)
        cfg = model.cfg
        rotary = cfg.positional_embedding_type == "rotary"   # else learned positions, added to the embedding
        for block in model.blocks if rotary else []:   # rotary tables long enough, as TL extends them
            attn = block.attn
            if attn.rotary_cos.shape[0] < capacity:
                attn._extend_rotary_embeddings(min(cfg.n_ctx, max(capacity, 2 * attn.rotary_cos.shape[0])))
        self.rotary, self.fuse = fusion.Rotary(model) if rotary else None, fuse
        self.joined = [fusion.join(b) if fuse else fusion.Joined() for b in model.blocks]
        self.norm = fusion.norm if fuse else (lambda ln, x: ln(x))
        packer = cpu_linear.packer(model) if fuse else None     # float32 CPU: oneDNN, weights packed once
        self.linear = F.linear if packer is None else packer.linear
        self.kernels = None           # Triton kernels for element-wise work (`engine.kernels.block`)
        self.splitk = None            # narrow projections as split-K kernels (`engine.kernels.splitk`)
        self.gated = None             # gate/up multiply with silu(gate) * up (`engine.kernels.gate_up`)
        if fuse and torch.device(cfg.device).type == "cuda" and triton_available():
            from isokl_tl.engine.kernels import block, gate_up, splitk
            self.kernels = block
            # bf16, where their tiles were measured; bf16 tensor-core dots need compute capability 8.0
            if cfg.dtype == torch.bfloat16 and torch.cuda.get_device_capability(cfg.device) >= (8, 0):
                self.splitk, self.gated = splitk, gate_up
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.scale = 1.0 / (model.blocks[0].attn.attn_scale if cfg.use_attn_scale else 1.0)
        self.cache = KVCache(capacity)
        self.reused = False            # the last prefill cleared the previous rollout's buffers
        self.prompt: tuple[Tensor, Tensor] | None = None      # the last prefill's tokens and mask
        self.shared = SharedRows()     # which rows each block runs on (`share_prefix`, `_distinct`)
        self.post_norm = cfg.original_architecture in POST_NORM
        self.head_norm = bool(getattr(cfg, "use_qk_norm", False)) and not self.post_norm   # Qwen3's QK norm
        self.sandwich = bool(cfg.use_normalization_before_and_after)    # Gemma 2/3: norms after sublayers too
        self.parallel = bool(cfg.parallel_attn_mlp)         # GPT-J, GPT-NeoX, Phi: both read resid_pre
        self.cap = attention.cap_of(getattr(cfg, "attn_scores_soft_cap", None))
        self.logit_cap = attention.cap_of(getattr(cfg, "output_logits_soft_cap", None))
        # per layer: the sliding window (local layers), or None
        self.windows = [cfg.window_size if b.attn.attn_type == "local" else None for b in model.blocks]
        # the hook points that fire after the last block's keys and values (and before them, in it)
        self.tail_hooks = [hp for part in (model.blocks[-1], getattr(model, "ln_final", None), model.unembed)
                           if part is not None for hp in part.modules() if isinstance(hp, HookPoint)]

    def share_prefix(self, n_own: int, partner_of: Int[Tensor, " partner"], split: int) -> None:
        """Declare that batch rows `n_own + j` repeat row `partner_of[j]` up to block `split`: same
        tokens, same mask, no steering below it (base partners of steered rows). Blocks below
        `split` then run on the first `n_own` rows only (`SharedRows`). Exact: those rows would
        compute the same numbers. Call before `prefill`.

        At prefill the same holds for every row of the same prompt (a sweep's rows repeat each
        prompt at every coefficient): `prefill` runs the blocks below `split` once per distinct
        prompt, and the later blocks once per distinct prompt and coefficients (`Distinct`)."""
        self.shared.declare(n_own, partner_of, split)

    def _distinct(self, tokens: Tensor, mask: Tensor, until: int | None = None) -> Distinct | None:
        """A prefill's distinct rows (`Distinct`), or None where no row repeats another or a hook
        other than the steering's is registered (it would see fewer rows). Rows are alike below
        the first site when their prompts are (tokens and mask); from it on, when their steering
        coefficients are too (those that act before position `until`, by default the prompt's
        end: not with steering from a later start)."""
        count = Counter(h.hook for h in handles(self.steering))
        if any(len(hp._forward_hooks) > count[name] for name, hp in self.model.hook_dict.items()):
            return None
        return distinct_rows(tokens, mask, self.steering, self.shared.site_block, self.shared.rows(0) or len(tokens),
                             until)

    def _last_normed(self, resid: Tensor, x: Tensor | None) -> Tensor:
        """The final norm at the last position ([batch, 1, d_model]): `x` when the last block's
        `_add_norm` already computed it."""
        return self.norm(self.model.ln_final, resid[:, -1:]) if x is None else x[:, -1:]

    def _logits(self, resid: Tensor, x: Tensor | None) -> Tensor:
        x = self._last_normed(resid, x)
        u = self.model.unembed
        if self.fuse and not (fusion.has_hook(u.hook_in) or fusion.has_hook(u.hook_out)):
            return attention.soft_cap(self.linear(x[:, -1], u.W_U.T, u.b_U), self.logit_cap)
        return attention.soft_cap(u(x)[:, -1], self.logit_cap)

    def exact(self, i: int) -> bool:
        """Whether layer i attends in `engine.attention` (soft-capped or windowed), not SDPA."""
        return self.cap is not None or self.windows[i] is not None

    def last_column_only(self, i: int, width: int) -> bool:
        """Whether block i of a forward over `width` new columns goes on with the last column alone
        once its keys and values are written: in the last block only the last column's logits are
        read past them (a prefill, a fork). Not while any hook point of that block, the final norm
        or the unembedding carries a hook: one in the block would see fewer positions than in
        `model(...)` (the final norm's and unembedding's hooks see the last column either way, and
        are counted only to be safe)."""
        return (width > 1 and i == self.model.cfg.n_layers - 1
                and not any(fusion.has_hook(hp) for hp in self.tail_hooks))

    @staticmethod
    def last_column(q: Tensor, resid: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The last column of a block's queries, residual and attention mask (`last_column_only`).
        Copies, not views: with the views a bf16 fork on CUDA failed on a misaligned address."""
        return q[:, -1:].contiguous(), resid[:, -1:].contiguous(), mask[:, :, -1:].contiguous()

    def _layer(self, i: int, resid: Tensor, x: Tensor | None, attn_mask: Tensor, cos: Tensor | None,
               sin: Tensor | None) -> tuple[Tensor, Tensor | None]:
        resid, q, k, v = self._qkv(i, resid, x)
        if self.rotary is not None:
            q, k = self.rotary.rotate_qk(q, k, cos[:len(q)], sin[:len(q)])
            q = self.model.blocks[i].attn.hook_rot_q(q)
        shared = self.shared
        if shared.distinct is not None:     # every row's cache gets the keys of the row it repeats
            spread = (shared.distinct.low if i < shared.site_block else shared.distinct.high)[:shared.rows(i)]
            keys, values = self.cache.write(i, k[spread], v[spread])
            keys, values = shared.lower(i, keys), shared.lower(i, values)
        else:
            keys, values = self.cache.write(i, k, v)
        mask = attn_mask
        if self.windows[i] is not None:     # a windowed layer (exact attention), over every new column
            start = self.cache.length
            cols = torch.arange(start, start + q.shape[1], device=q.device)
            mask = mask & attention.in_window(cols, keys.shape[2], self.windows[i])
        if self.last_column_only(i, q.shape[1]):
            q, resid, mask = self.last_column(q, resid, mask)
        if self.exact(i):
            z = attention.exact_attention(q, keys, values, mask, attn_scale=self.model.blocks[i].attn.attn_scale,
                                          cap=self.cap)
            return self._finish(i, resid, z)
        return self._finish(i, resid, self._attend(q, keys, values, mask))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Attention of q ([batch, pos, head, d_head]) over cached k and v ([batch, kv_head, key,
        d_head]) under `mask` ([batch, 1, pos, key]); returns z shaped like q."""
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.n_kv != q.shape[2])
        return z.transpose(1, 2)

    def _forward(self, tokens: Tensor, mask_new: Tensor) -> Tensor:
        m = self.model
        n = tokens.shape[1]
        cache = self.cache
        cache.check_room(n)
        start, end = cache.length, cache.length + n
        cache.mask[:len(mask_new), start:end] = mask_new       # a fork may run the first rows only
        mask_now = cache.mask[:, :end]
        keys = mask_now.bool()[:, None, None, :]                  # [batch, 1, 1, key]
        if n > 1:
            causal = torch.ones(n, end, dtype=torch.bool, device=tokens.device).tril(start)
            keys = keys & causal
            own = torch.zeros(n, end, dtype=torch.bool, device=tokens.device)
            own[torch.arange(n), start + torch.arange(n)] = True  # padding rows see themselves
            keys = keys | own
        if self.steering is not None:
            self.steering.offset = start
        # rotary positions as TransformerLens counts them: unmasked tokens before, from 0
        pos = (mask_now.cumsum(1) - 1).clamp(min=0)[:, start:]
        shared, distinct = self.shared, self.shared.distinct
        if self.rotary is None:
            low = high = [(None, None)] * m.cfg.n_layers
        elif distinct is None:
            low = high = self.rotary.rows(pos)
        else:                               # the rows each block runs on
            low, high = self.rotary.rows(pos[distinct.below]), self.rotary.rows(pos[distinct.above])
        resid, x = m.hook_embed(m.embed(shared.lower(0, tokens))), None
        if self.rotary is None:             # learned positions: TransformerLens's own module, same positions
            resid = resid + m.hook_pos_embed(m.pos_embed(shared.lower(0, tokens), start, shared.lower(0, mask_now)))
        for i in range(m.cfg.n_layers):
            resid = shared.widen(i, resid)
            resid, x = self._layer(i, resid, x, shared.lower(i, keys), *(low if i < shared.site_block else high)[i])
        cache.length = end
        logits = self._logits(resid, x)
        return logits if distinct is None else logits[distinct.high]

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
                ) -> Float[Tensor, "batch d_vocab"]:
        cfg = self.model.cfg
        b = tokens.shape[0]
        shapes = [(self.shared.rows(i) or b, self.n_kv, self.cache.capacity, cfg.d_head) for i in range(cfg.n_layers)]
        # a decoder serving another rollout of its shape (`engine.pool`) clears its buffers in place
        self.reused = self.cache.reset(shapes, b, cfg.dtype, tokens.device)
        self.prompt = (tokens, mask)    # a fork before the first step shares rows as this prefill does
        distinct = self.shared.distinct = self._distinct(tokens, mask)
        if distinct is None:
            return self._forward(tokens, mask)
        try:                                # the steering acts on the rows of `above` meanwhile
            with rows_of(self.steering, distinct.above):
                return self._forward(tokens, mask)
        finally:
            self.shared.distinct = None

    @torch.no_grad()
    def fork(self, tail: Int[Tensor, "rows tail"]) -> Float[Tensor, "rows d_vocab"]:
        """Only the first `len(tail)` batch rows fork (the steered rows: their base partners come
        after them), every block running on those rows alone. The tail's keys and values go to
        the slots after the cached ones, which the next step overwrites (and no query reads while
        they are masked out again).

        Right after the prefill (a fork at the first generated token) each row's cache is still
        its prompt's, so the rows of one prompt (a sweep's alphas) run the blocks below the
        steering site once, as the prefill did (`_distinct`)."""
        cache, length, n = self.cache, self.cache.length, tail.shape[0]
        tokens, mask = self.prompt
        try:
            with self.shared.first_only(n, self.model.cfg.n_layers), first_rows(self.steering, n):
                distinct = None
                if length == tokens.shape[1]:
                    distinct = self._distinct(tokens[:n], mask[:n], until=length + tail.shape[1])
                if distinct is None:
                    return self._forward(tail, torch.ones_like(tail))
                self.shared.distinct = distinct
                with rows_of(self.steering, distinct.above):
                    return self._forward(tail, torch.ones_like(tail))
        finally:
            self.shared.distinct = None
            cache.mask[:, length:length + tail.shape[1]] = 0
            cache.length = length

    def select(self, rows: Int[Tensor, " keep"]) -> None:
        self.shared.select(rows, self.cache)
        self.select_coeff(rows)
