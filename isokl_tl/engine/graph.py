"""The GPU decode path: `FastDecoder` with every decode step of fixed shape, captured once as a
CUDA graph and replayed.

Shapes never change between steps: the batch keeps finished rows (the rollout loop masks them and
checks for EOS only every few steps, so the host does not wait on the GPU each step), attention
covers the whole static cache under a key mask (with Triton, `engine.kernels.attn` reads the
write position on the device and skips the slots not yet written; else SDPA reads them all), and
the write position and per-row rotary positions are device tensors updated in place, inside the
graph. With `scored_step` the rollout's per-step scoring (KL, argmax, log-probability, written
into the rollout's result buffers by the scoring kernel itself: `engine.scoring.greedy_record`) is
captured into the same graph, so a greedy decode step is one graph replay and nothing else. On
CUDA with Triton, rotary + KV-cache writes (inside the attention kernel unless `hook_rot_q` is
hooked: `kernels.attn.rotate_attend`), the MLP's silu(gate) * up and each residual add with the
RMSNorm after it are Triton kernels too (`engine.kernels.block`), as are the attention output and
down projections at the row counts where they beat cuBLAS (`engine.kernels.splitk`, whose
pieces the add + RMSNorm after them sums), and so is the gate/up multiply with silu(gate) * up
(`engine.kernels.gate_up`) where it beats cuBLAS; the logits go straight into their buffer.

Everything the step reads that a caller may change (the tokens, the steering coefficients
`Steering.coeff`, updated in place, the mask) lives in tensors the graph was captured with.
Python-side effects of hooks run once, at capture (so `Steering.calls` counts 2 for the whole
decode here); hooks that compute on tensors run every step.

A decoder, its buffers and its graph can outlive one rollout: `engine.pool` keeps the last few
per model (keyed on everything the graph depends on) and a later rollout of the same shape calls
`adopt` with its own steering and `prefill`s into the same buffers, so it skips the warm-up step
and the capture. `engine.release(model)` drops them (and their GPU memory).
"""

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from isokl_tl.engine import attention, fusion
from isokl_tl.engine.fast import FastDecoder
from isokl_tl.hooks import Steering, SteeringGroup, first_rows, handles


class GraphDecoder(FastDecoder):
    name = "cuda-graph"
    shrinks = False
    captures_scoring = True
    reusable = True   # may be kept for the next rollout of the same shape (`engine.pool`, `adopt`)

    def __init__(self, model: HookedTransformer, steering: Steering | SteeringGroup | None, capacity: int,
                 use_graph: bool | None = None, fuse: bool = True):
        super().__init__(model, steering, capacity, fuse=fuse)
        dev = torch.device(model.cfg.device)
        self.use_graph = (dev.type == "cuda") if use_graph is None else use_graph
        d = model.cfg.d_head
        # rotary and KV-cache writes in a Triton kernel (`kernels.block`, or the attention's), where it fits
        self.rotate_in_kernel = (self.kernels is not None and self.rotary is not None and self.rotary.dim == d
                                 and not self.rotary.adjacent
                                 and d & (d - 1) == 0 and model.cfg.dtype in (torch.bfloat16, torch.float32))
        # attention over the keys in use only (`engine.kernels.attn`), else SDPA over the whole cache
        self.attention = None
        if self.kernels is not None:
            from isokl_tl.engine.kernels import attn
            self.attention = attn
        self.rotate_in_attention = self.attention is not None and self.rotary is not None   # `kernels.attn.rotate_attend`
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed = False           # an eager step has run (compiled kernels) before any capture
        self.captured: Steering | SteeringGroup | None = None   # the steering the graph reads
        self.bias: Tensor | None = None
        self.forks: dict[tuple[int, int], dict] = {}   # per fork shape: its buffers and graph (one rollout's)

    def hold(self, steering: Steering | SteeringGroup | None) -> None:
        """Mark `steering` as the one the graph (about to be captured) reads; its directions become
        copies of their own, so that a later `adopt` never writes into a caller's tensor."""
        for h in handles(steering):
            h.direction = h.direction.clone()
        self.captured = steering

    def run_hooks_every_step(self) -> None:
        self.use_graph = False

    def select(self, rows: Int[Tensor, " keep"]) -> None:
        raise NotImplementedError("GraphDecoder keeps its batch fixed; finished rows are masked instead")

    def adopt(self, steering: Steering | SteeringGroup | None) -> None:
        """Serve a new rollout: its `steering` runs the eager parts (the prefill), and its
        coefficients and directions are copied into the tensors of the steering the graph was
        captured with, which the replayed graph reads. Raises ValueError where the two do not
        match site for site (a rollout's reuse key rules that out)."""
        if self.captured is None:          # nothing captured: only the eager parts read steering
            self.steering = steering
            return
        old, new = handles(self.captured), handles(steering)
        if len(old) != len(new):
            raise ValueError("a different number of steering sites than the captured graph's")
        for a, b in zip(old, new):
            if (a.hook, a.method, a.start) != (b.hook, b.method, b.start) or not (
                    torch.is_tensor(a.coeff) and torch.is_tensor(b.coeff) and a.coeff.shape == b.coeff.shape):
                raise ValueError(f"steering at {b.hook} does not match the captured graph's")
        for a, b in zip(old, new):
            a.coeff.copy_(b.coeff)
            a.direction.copy_(b.direction)
        self.steering = steering

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
                ) -> Float[Tensor, "batch d_vocab"]:
        logits = super().prefill(tokens, mask)
        if not (self.reused and self.graph is not None and self.tok_buf.shape[0] == tokens.shape[0]):
            dev = tokens.device
            self.tok_buf = torch.zeros(tokens.shape[0], dtype=torch.long, device=dev)
            self.pos_ids = torch.empty(tokens.shape[0], dtype=torch.long, device=dev)
            self.write_at = torch.empty(1, dtype=torch.long, device=dev)
            self.logits = torch.empty_like(logits)         # the latest logits, in a fixed buffer
            # no graph kept (a new shape, or none captured): the next step runs eagerly first, so
            # kernels for its row counts (split-K's tiles are per row class) compile before any capture
            self.graph, self.captured, self.warmed = None, None, False
        self.forks = {}                # fork graphs serve one rollout (they read its steering's tensors)
        # in place: a kept graph reads these very tensors
        self.pos_ids.copy_(mask.sum(1))                    # rotary position of the next token
        self.write_at.fill_(self.cache.length)
        self.logits.copy_(logits)
        return self.logits

    def _static_layer(self, i: int, resid: Tensor, x: Tensor | None, cos: Tensor | None, sin: Tensor | None
                      ) -> tuple[Tensor, Tensor | None]:
        resid, q, k, v = self._qkv(i, resid, x)
        if self.rotary is not None:
            cos, sin = cos[:len(q)], sin[:len(q)]            # fewer rows below a shared split
        rows = self.shared.rows(i)
        joined = self.rotate_in_kernel and self.kernels.joined_views(q, k, v)
        fits = self.attention is not None and self.attention.supports(q, self.cache.k[i])
        options = dict(cap=self.cap, window=self.windows[i])      # soft cap, sliding window: in the kernel too
        if (joined and fits and self.rotate_in_attention
                and not fusion.has_hook(self.model.blocks[i].attn.hook_rot_q)):
            z = self.attention.rotate_attend(q, k, v, cos, sin, self.cache.k[i], self.cache.v[i], self.cache.mask[:rows],
                                             self.write_at, self.scale, **options)      # rotation inside attention
            return self._finish(i, resid, z)
        if joined:
            q = self.kernels.rotate_store(q, k, v, cos, sin, self.cache.k[i], self.cache.v[i], self.write_at)
        else:
            if self.rotary is not None:
                q, k = self.rotary.rotate_qk(q, k, cos, sin)
            self.cache.k[i].index_copy_(2, self.write_at, k.transpose(1, 2))
            self.cache.v[i].index_copy_(2, self.write_at, v.transpose(1, 2))
        if self.rotary is not None:
            q = self.model.blocks[i].attn.hook_rot_q(q)
        if self.attention is not None and self.attention.supports(q, self.cache.k[i]):    # q as the hook left it
            z = self.attention.decode_attention(q, self.cache.k[i], self.cache.v[i], self.cache.mask[:rows], self.write_at,
                                                self.scale, **options)
        elif self.exact(i):                 # soft-capped or windowed: as TransformerLens computes it
            mask = self.cache.mask[:rows].bool()[:, None, None, :]
            if self.windows[i] is not None:
                mask = mask & attention.in_window(self.write_at, self.cache.capacity, self.windows[i])
            z = attention.exact_attention(q, self.cache.k[i], self.cache.v[i], mask,
                                          attn_scale=self.model.blocks[i].attn.attn_scale, cap=self.cap)
        else:
            z = self._attend(q, self.cache.k[i], self.cache.v[i], self._key_bias()[:rows])
        return self._finish(i, resid, z)

    def _key_bias(self) -> Tensor:
        """The additive form of the key mask ([batch, 1, 1, capacity]), built once per step for
        every layer that attends through SDPA (which would convert a boolean mask to exactly
        this in each layer)."""
        if self.bias is None:
            bias = torch.zeros(self.cache.mask.shape, dtype=self.cache.k[0].dtype, device=self.cache.mask.device)
            self.bias = bias.masked_fill_(self.cache.mask == 0, float("-inf"))[:, None, None, :]
        return self.bias

    def _static_step(self) -> Tensor:
        """One step on the buffers, bookkeeping included, all on the device: the new key becomes
        visible, the layers run, and the write position and rotary positions move on."""
        m = self.model
        self.cache.mask.index_fill_(1, self.write_at, 1)
        self.bias = None
        rows = self.shared.rows(0)
        if self.rotary is not None:
            tables = self.rotary.rows(self.pos_ids[:, None])
            resid = m.hook_embed(m.embed(self.tok_buf[:rows, None]))
        else:                               # learned positions: the new token's row of W_pos
            tables = [(None, None)] * m.cfg.n_layers
            resid = m.hook_embed(m.embed(self.tok_buf[:rows, None])) + m.hook_pos_embed(
                m.pos_embed.W_pos[self.pos_ids[:rows]][:, None])
        x = None
        for i in range(m.cfg.n_layers):
            resid = self.shared.widen(i, resid)
            resid, x = self._static_layer(i, resid, x, *tables[i])
        u = m.unembed
        if self.fuse and not (fusion.has_hook(u.hook_in) or fusion.has_hook(u.hook_out)):
            # straight into the logits buffer: F.linear's own call, without a [batch, d_vocab] copy
            torch.addmm(u.b_U, self._last_normed(resid, x)[:, -1], u.W_U, out=self.logits)
            if self.logit_cap is not None:  # in place, as `attention.soft_cap` computes it
                self.logits.div_(self.logit_cap).tanh_().mul_(self.logit_cap)
        else:
            self.logits.copy_(self._logits(resid, x))
        self.pos_ids += 1
        self.write_at += 1
        return self.logits

    def _run(self, body: Callable[[], None]) -> Tensor:
        """Run `body` (which fills `tok_buf`) and one step: eagerly the first time (which also warms
        up the kernels), then as one captured CUDA graph replayed every call."""
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"decode past the cache capacity of {self.cache.capacity} tokens")
        if self.steering is not None:
            self.steering.offset = self.cache.length
        if not self.use_graph or (self.graph is None and not self.warmed):
            body()
            self._static_step()
            self.warmed = True
        else:
            if self.graph is None:
                self.hold(self.steering)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    body()
                    self._static_step()
            self.graph.replay()
        self.cache.length += 1
        return self.logits

    @torch.no_grad()
    def step(self, tokens: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        self.tok_buf.copy_(tokens)
        return self._run(lambda: None)

    def _static_fork_fits(self) -> bool:
        """Whether the fork can run on fixed shapes: every layer attends through SDPA over the
        whole cache (no soft cap, no sliding window: those layers fork the eager way)."""
        return not any(self.exact(i) for i in range(self.model.cfg.n_layers))

    @torch.no_grad()
    def fork(self, tail: Int[Tensor, "rows tail"]) -> Float[Tensor, "rows d_vocab"]:
        """`FastDecoder.fork` on fixed shapes: the tail's queries attend over the whole cache under
        its key mask plus the tail's own slots up to each query, its keys go to the slots from
        the write position on (device tensors, as in a step), and nothing is undone afterwards
        (the cache mask is never touched; the next steps overwrite those slots). Run eagerly the
        first time for a tail shape, then captured as a CUDA graph and replayed, once per fork."""
        if not self._static_fork_fits():
            return super().fork(tail)
        n, width = tail.shape
        if self.cache.length + width > self.cache.capacity:
            raise ValueError(f"fork past the cache capacity of {self.cache.capacity} tokens")
        f = self.forks.get((n, width))
        if f is None:
            dev = tail.device
            f = self.forks[(n, width)] = {"tok": torch.empty_like(tail), "span": torch.arange(width, device=dev),
                                          "out": None, "graph": None}
        f["tok"].copy_(tail)
        if self.steering is not None:      # the tail's first column; always generated positions
            self.steering.offset = self.cache.length
        with first_rows(self.steering, n):
            if not self.use_graph or f["out"] is None:
                logits = self._static_fork(f)
                if f["out"] is None:
                    f["out"] = torch.empty_like(logits)
                f["out"].copy_(logits)
            else:
                if f["graph"] is None:
                    f["graph"] = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(f["graph"]):
                        f["out"].copy_(self._static_fork(f))
                f["graph"].replay()
        return f["out"]

    def _static_fork(self, f: dict) -> Tensor:
        m, tok, span = self.model, f["tok"], f["span"]
        n, width = tok.shape
        slots = self.write_at + span                                   # where the tail's keys go
        pos = self.pos_ids[:n, None] + span[None, :]                   # the tail's rotary positions
        cols = torch.arange(self.cache.capacity, device=tok.device)
        own = (cols[None, :] >= slots[:1, None]) & (cols[None, :] <= slots[:, None])      # [tail, key]
        seen = self.cache.mask[:n].bool()[:, None, :] | own[None]
        bias = torch.zeros(seen.shape, dtype=self.cache.k[0].dtype, device=tok.device)
        bias = bias.masked_fill_(~seen, float("-inf"))[:, None]         # [rows, 1, tail, key]
        if self.rotary is not None:
            tables = self.rotary.rows(pos)
            resid = m.hook_embed(m.embed(tok))
        else:
            tables = [(None, None)] * m.cfg.n_layers
            resid = m.hook_embed(m.embed(tok)) + m.hook_pos_embed(m.pos_embed.W_pos[pos])
        x = None
        for i in range(m.cfg.n_layers):
            resid, q, k, v = self._qkv(i, resid, x)
            if self.rotary is not None:
                q, k = self.rotary.rotate_qk(q, k, *tables[i])
                q = m.blocks[i].attn.hook_rot_q(q)
            keys, values = self.cache.k[i][:n], self.cache.v[i][:n]
            keys.index_copy_(2, slots, k.transpose(1, 2))
            values.index_copy_(2, slots, v.transpose(1, 2))
            if self.last_column_only(i, width):
                q, resid, bias = self.last_column(q, resid, bias)
            resid, x = self._finish(i, resid, self._attend(q, keys, values, bias))
        return self._logits(resid, x)

    @torch.no_grad()
    def scored_step(self, score: Callable[[Tensor], Tensor]) -> Float[Tensor, "batch d_vocab"]:
        """`score(logits)` reads the latest logits (recording whatever it needs into its own device
        buffers) and returns the next tokens; then one step. Both go into the same graph, so a
        greedy decode step is a single graph replay with no other launch."""
        return self._run(lambda: self.tok_buf.copy_(score(self.logits)))
