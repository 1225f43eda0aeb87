"""The GPU decode path: `FastDecoder` with every decode step of fixed shape, captured once as a
CUDA graph and replayed.

Shapes never change between steps: the batch keeps finished rows (the rollout loop masks them and
checks for EOS only every few steps, so the host does not wait on the GPU each step), attention
reads the whole static cache under a key mask, and the write position and per-row rotary positions
are device tensors updated in place. Everything the step reads that a caller may change — the
tokens, the steering coefficients (`Steering.coeff`, updated in place), the mask — lives in tensors
the graph was captured with. Python-side effects of hooks run once, at capture (so
`Steering.calls` counts 2 for the whole decode here); hooks that compute on tensors run every step.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from isokl_tl.fast_decode import FastDecoder
from isokl_tl.hooks import Steering


class StaticDecoder(FastDecoder):
    static = True

    def __init__(self, model: HookedTransformer, steering: Steering | None, capacity: int,
                 use_graph: bool | None = None):
        super().__init__(model, steering, capacity)
        dev = torch.device(model.cfg.device)
        self.use_graph = (dev.type == "cuda") if use_graph is None else use_graph
        for block in model.blocks:                     # rotary tables long enough, as TL extends them
            attn = block.attn
            if attn.rotary_cos.shape[0] < capacity:
                attn._extend_rotary_embeddings(min(model.cfg.n_ctx, max(capacity, 2 * attn.rotary_cos.shape[0])))
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
        self.graph, self.steps = None, 0
        return logits

    def _static_layer(self, i: int, resid: Tensor, keys: Tensor) -> Tensor:
        block = self.model.blocks[i]
        attn = block.attn
        resid = block.hook_resid_pre(resid)
        x = block.ln1(resid)
        q, k, v = attn.calculate_qkv_matrices(x, x, x)
        cos = attn.rotary_cos[self.pos_ids][:, None, None, :]
        sin = attn.rotary_sin[self.pos_ids][:, None, None, :]
        r = self.model.cfg.rotary_dim

        def rotate(t: Tensor) -> Tensor:
            t_rot = t[..., :r]
            return torch.cat([t_rot * cos + attn.rotate_every_two(t_rot) * sin, t[..., r:]], dim=-1)

        q = attn.hook_rot_q(rotate(q))
        self.k[i].index_copy_(2, self.write_at, rotate(k).transpose(1, 2))
        self.v[i].index_copy_(2, self.write_at, v.transpose(1, 2))
        z = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[i], self.v[i], attn_mask=keys,
                                           scale=self.scale, enable_gqa=self.n_kv != q.shape[2])
        z = attn.hook_z(z.transpose(1, 2))
        w = attn.W_O.permute(2, 0, 1).reshape(attn.W_O.shape[2], -1)
        attn_out = block.hook_attn_out(F.linear(z.reshape(z.shape[0], 1, -1), w, attn.b_O))
        resid_mid = block.hook_resid_mid(resid + attn_out)
        mlp_out = block.hook_mlp_out(block.mlp(block.ln2(resid_mid)))
        return block.hook_resid_post(resid_mid + mlp_out)

    def _static_step(self) -> Tensor:
        m = self.model
        keys = self.key_mask.bool()[:, None, None, :]
        resid = m.hook_embed(m.embed(self.tok_buf[:, None]))
        for i in range(m.cfg.n_layers):
            resid = self._static_layer(i, resid, keys)
        return m.unembed(m.ln_final(resid))[:, -1]

    @torch.no_grad()
    def step(self, tokens: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        if self.length >= self.capacity:
            raise ValueError(f"decode past the cache capacity of {self.capacity} tokens")
        self.tok_buf.copy_(tokens)
        self.key_mask[:, self.length] = 1
        self.write_at.fill_(self.length)
        if self.steering is not None:
            self.steering.offset = self.length
        if not self.use_graph or self.steps == 0:          # the first step also warms up kernels
            out = self._static_step()
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out_buf = self._static_step()
            self.graph.replay()
            out = self.out_buf
        self.pos_ids += 1
        self.length += 1
        self.steps += 1
        return out

    def select(self, rows: Int[Tensor, " keep"]) -> None:
        raise RuntimeError("StaticDecoder keeps its batch fixed; finished rows are masked instead")
