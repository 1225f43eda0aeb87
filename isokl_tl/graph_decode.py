"""The GPU decode path: `FastDecoder` with every decode step of fixed shape, captured once as a
CUDA graph and replayed.

Shapes never change between steps: the batch keeps finished rows (the rollout loop masks them and
checks for EOS only every few steps, so the host does not wait on the GPU each step), attention
reads the whole static cache under a key mask, and the write position and per-row rotary positions
are device tensors updated in place, inside the graph. With `scored_step` the rollout's per-step
scoring (log-softmax, KL, argmax, writing the results) is captured into the same graph, so a greedy
decode step is one graph replay and nothing else. Everything the step reads that a caller may change — the
tokens, the steering coefficients (`Steering.coeff`, updated in place), the mask — lives in tensors
the graph was captured with. Python-side effects of hooks run once, at capture (so
`Steering.calls` counts 2 for the whole decode here); hooks that compute on tensors run every step.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from isokl_tl.fast_decode import FastDecoder
from isokl_tl.hooks import Steering, SteeringGroup


class StaticDecoder(FastDecoder):
    static = True

    def __init__(self, model: HookedTransformer, steering: Steering | SteeringGroup | None, capacity: int,
                 use_graph: bool | None = None):
        super().__init__(model, steering, capacity)
        dev = torch.device(model.cfg.device)
        self.use_graph = (dev.type == "cuda") if use_graph is None else use_graph
        for block in model.blocks:                     # rotary tables long enough, as TL extends them
            attn = block.attn
            if attn.rotary_cos.shape[0] < capacity:
                attn._extend_rotary_embeddings(min(model.cfg.n_ctx, max(capacity, 2 * attn.rotary_cos.shape[0])))
        first = model.blocks[0].attn
        # every layer reads the same rotary table: look the step's rows up once, not once per layer
        self.shared_rotary = all(torch.equal(b.attn.rotary_cos, first.rotary_cos)
                                 and torch.equal(b.attn.rotary_sin, first.rotary_sin) for b in model.blocks)
        self._cos_sin: tuple[Tensor, Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
                ) -> Float[Tensor, "batch d_vocab"]:
        logits = super().prefill(tokens, mask)
        dev = tokens.device
        self.tok_buf = torch.zeros(tokens.shape[0], dtype=torch.long, device=dev)
        self.pos_ids = mask.sum(1).to(dev)                 # rotary position of the next token
        self.write_at = torch.full((1,), self.length, dtype=torch.long, device=dev)
        self.logits = logits.clone()                       # the latest logits, in a fixed buffer
        self.graph, self.steps = None, 0
        return self.logits

    def _rotary(self, attn) -> tuple[Tensor, Tensor]:
        if self.shared_rotary and self._cos_sin is not None:
            return self._cos_sin
        cs = (attn.rotary_cos[self.pos_ids][:, None, None, :], attn.rotary_sin[self.pos_ids][:, None, None, :])
        self._cos_sin = cs if self.shared_rotary else None
        return cs

    def _rotate(self, attn, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.model.cfg.rotary_dim
        t_rot = t[..., :r]
        if self.model.cfg.rotary_adjacent_pairs:
            turned = attn.rotate_every_two(t_rot)
        else:                                              # the same values as rotate_every_two
            n = r // 2
            turned = torch.cat([-t_rot[..., n:], t_rot[..., :n]], dim=-1)
        out = t_rot * cos + turned * sin
        return out if r == t.shape[-1] else torch.cat([out, t[..., r:]], dim=-1)

    def _static_layer(self, i: int, resid: Tensor, bias: Tensor) -> Tensor:
        block = self.model.blocks[i]
        attn = block.attn
        resid, q, k, v = self._qkv(block, resid)
        cos, sin = self._rotary(attn)
        cos, sin = cos[:resid.shape[0]], sin[:resid.shape[0]]   # fewer rows below a shared split
        q = attn.hook_rot_q(self._rotate(attn, q, cos, sin))
        self.k[i].index_copy_(2, self.write_at, self._rotate(attn, k, cos, sin).transpose(1, 2))
        self.v[i].index_copy_(2, self.write_at, v.transpose(1, 2))
        z = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[i], self.v[i], attn_mask=bias,
                                           scale=self.scale, enable_gqa=self.n_kv != q.shape[2])
        return self._finish(block, resid, z.transpose(1, 2))

    def _static_step(self) -> Tensor:
        """One step on the buffers, bookkeeping included, all on the device: the new key becomes
        visible, the layers run, and the write position and rotary positions move on."""
        m = self.model
        self.key_mask.index_fill_(1, self.write_at, 1)
        # the additive form of the key mask, built once for every layer (SDPA would convert a
        # boolean mask to exactly this in each layer)
        bias = torch.zeros(self.key_mask.shape, dtype=self.k[0].dtype, device=self.key_mask.device)
        bias.masked_fill_(self.key_mask == 0, float("-inf"))
        bias = bias[:, None, None, :]
        self._cos_sin = None
        resid = m.hook_embed(m.embed(self.tok_buf[:self._rows(0), None]))
        for i in range(m.cfg.n_layers):
            resid = self._widen(i, resid)
            resid = self._static_layer(i, resid, bias[:self._rows(i)])
        self.logits.copy_(m.unembed(m.ln_final(resid))[:, -1])
        self.pos_ids += 1
        self.write_at += 1
        return self.logits

    def _run(self, body: Callable[[], None]) -> Tensor:
        """Run `body` (which fills `tok_buf`) and one step: eagerly the first time (which also warms
        up the kernels), then as one captured CUDA graph replayed every call."""
        if self.length >= self.capacity:
            raise ValueError(f"decode past the cache capacity of {self.capacity} tokens")
        if self.steering is not None:
            self.steering.offset = self.length
        if not self.use_graph or self.steps == 0:
            body()
            self._static_step()
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    body()
                    self._static_step()
            self.graph.replay()
        self.length += 1
        self.steps += 1
        return self.logits

    @torch.no_grad()
    def step(self, tokens: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        self.tok_buf.copy_(tokens)
        return self._run(lambda: None)

    @torch.no_grad()
    def scored_step(self, score: Callable[[Tensor], Tensor]) -> Float[Tensor, "batch d_vocab"]:
        """`score(logits)` reads the latest logits (recording whatever it needs into its own device
        buffers) and returns the next tokens; then one step. Both go into the same graph, so a
        greedy decode step is a single graph replay with no other launch."""
        return self._run(lambda: self.tok_buf.copy_(score(self.logits)))

    def select(self, rows: Int[Tensor, " keep"]) -> None:
        raise RuntimeError("StaticDecoder keeps its batch fixed; finished rows are masked instead")
