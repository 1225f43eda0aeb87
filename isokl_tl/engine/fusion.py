"""A decode step's arithmetic in fewer, larger operations, with TransformerLens's hook points.

TransformerLens's modules spend most of a one-token step on small element-wise operations: eight
for an RMSNorm, three separate projections for Q, K and V and two for the MLP's gate and input,
a dozen for rotary embeddings. The fast decoders (`engine.fast`, `engine.graph`) use these
helpers instead, wherever no hook could tell the difference:

- `qkv` and `mlp` run Q, K and V as one matrix multiply, and the gate and input projections as
  one. `relayout_for_decode` stores each group as consecutive rows of one block of memory, so
  TransformerLens's parameters are views of it (`joined_rows` finds the block; no copy, and
  TransformerLens's own forward is unchanged bit for bit). `hook_q/k/v`, `hook_pre`,
  `hook_pre_linear` and `hook_post` still fire, on views of the joined result (where `hook_pre`
  and `hook_pre_linear` carry nothing, the GPU's `kernels.gate_up` may skip that result: nothing
  could see it);
- `norm` is one `torch.rms_norm` call (one kernel on GPU) when the norm's `hook_scale` carries no
  hook; `hook_normalized` still fires when it carries one;
- `rotate_qk` turns Q and K with one set of operations when they are still adjacent views of the
  joined projection (no hook replaced them), using `Rotary` rows looked up once per step.

The numbers agree with TransformerLens's to rounding, not bit for bit (x * rsqrt(m) against
x / sqrt(m); one matrix multiply against three). Rotation itself is bit-identical.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.components import GatedMLP, RMSNorm, RMSNormPre
from transformer_lens.hook_points import HookPoint


def has_hook(hp: HookPoint) -> bool:
    return bool(hp.fwd_hooks or hp._forward_hooks)


def _as_rows(w: Tensor) -> Tensor | None:
    """The [rows, d_model] matrix that F.linear wants, as a view of `w` (a [head, d_model, d_head]
    attention weight or a [d_model, d_out] MLP weight), or None when that would need a copy."""
    t = w.detach()
    t = t.permute(0, 2, 1) if t.dim() == 3 else t.T
    if not t.is_contiguous():
        return None
    return t.reshape(-1, t.shape[-1])


def joined_rows(*weights: Tensor) -> Tensor | None:
    """The one contiguous [rows, d_model] block whose consecutive row ranges `weights` are, or None."""
    rows = [_as_rows(w) for w in weights]
    if any(r is None for r in rows):
        return None
    first = rows[0]
    at = first.data_ptr()
    for r in rows:
        same = r.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not same or r.data_ptr() != at or r.shape[1] != first.shape[1] or r.dtype != first.dtype:
            return None
        at += r.numel() * r.element_size()
    return first.as_strided((sum(r.shape[0] for r in rows), first.shape[1]), (first.shape[1], 1))


@dataclass
class Joined:
    """A block's joined projections (None where the weights are not stored joined)."""

    qkv: Tensor | None = None            # [(n_heads + 2 n_kv) d_head, d_model]
    qkv_bias: Tensor | None = None
    heads: tuple[int, int, int] = (0, 0, 0)
    gate_up: Tensor | None = None        # [2 d_mlp, d_model]
    b_in: Tensor | None = None           # None when zero: adding it changes nothing


def join(block) -> Joined:
    """Find the joined weight blocks of a TransformerLens block (see `relayout_for_decode`)."""
    attn, mlp, out = block.attn, block.mlp, Joined()
    p = attn._parameters
    grouped = "_W_K" in p and not attn.cfg.ungroup_grouped_query_attention
    names = ("W_Q", "_W_K", "_W_V") if grouped else ("W_Q", "W_K", "W_V")
    if all(p.get(n) is not None for n in names):
        ws = [p[n] for n in names]
        out.qkv = joined_rows(*ws)
        if out.qkv is not None:
            biases = [attn.b_Q, attn._b_K if grouped else attn.b_K, attn._b_V if grouped else attn.b_V]
            out.qkv_bias = torch.cat([b.detach().reshape(-1) for b in biases])
            out.heads = tuple(w.shape[0] for w in ws)
    if type(mlp) is GatedMLP and mlp.W_gate.shape == mlp.W_in.shape:
        out.gate_up = joined_rows(mlp.W_gate, mlp.W_in)
        out.b_in = mlp.b_in.detach() if bool(mlp.b_in.any()) else None
    return out


def plain_rms(ln) -> bool:
    """Whether `ln` is a weighted RMSNorm whose intermediate hooks carry nothing."""
    return type(ln) is RMSNorm and not (has_hook(ln.hook_scale) or has_hook(ln.hook_normalized))


def norm(ln, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
    """`ln(x)` for a TransformerLens RMSNorm, in one operation unless its `hook_scale` is hooked."""
    if type(ln) not in (RMSNorm, RMSNormPre) or has_hook(ln.hook_scale):
        return ln(x)
    w = getattr(ln, "w", None)
    if has_hook(ln.hook_normalized):
        up = x if ln.cfg.dtype in (torch.float32, torch.float64) else x.float()
        x = ln.hook_normalized(torch.rms_norm(up, (x.shape[-1],), eps=ln.eps)).to(ln.cfg.dtype)
        return x if w is None else x * w
    return torch.rms_norm(x, (x.shape[-1],), w, ln.eps)


def qkv(attn, joined: Joined, x: Float[Tensor, "batch pos d_model"], linear=F.linear
        ) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V ([batch, pos, head, d_head]) with hook_q, hook_k and hook_v fired. `linear`: F.linear
    or a drop-in for it (`engine.cpu_linear`)."""
    if joined.qkv is None:
        return attn.calculate_qkv_matrices(x, x, x)
    d = attn.cfg.d_head
    out = linear(x, joined.qkv, joined.qkv_bias)
    q, k, v = out.split([h * d for h in joined.heads], dim=-1)
    b, n = x.shape[:2]
    hq, hk, hv = joined.heads
    return (attn.hook_q(q.view(b, n, hq, d)), attn.hook_k(k.view(b, n, hk, d)),
            attn.hook_v(v.view(b, n, hv, d)))


def mlp(m, joined: Joined, x: Float[Tensor, "batch pos d_model"], kernels=None, linear=F.linear
        ) -> Float[Tensor, "batch pos d_model"]:
    """`m(x)` for a gated MLP, with its hooks fired; gate and input projections in one multiply.
    `kernels` (`engine.kernels.block`, on CUDA) computes silu(gate) * up in one launch."""
    if joined.gate_up is None:
        return m(x)
    return linear(mlp_hidden(m, joined, x, kernels, linear), m.W_out.T.contiguous(), m.b_out)


def mlp_hidden(m, joined: Joined, x: Float[Tensor, "batch pos d_model"], kernels=None, linear=F.linear,
               gated=None) -> Float[Tensor, "batch pos d_mlp"]:
    """A gated MLP (`joined.gate_up` set) up to its down projection: `hook_post`'s output.
    `gated` (`engine.kernels.gate_up`, on CUDA) computes silu(gate) * up inside the multiply, where
    no hook reads gate or up; it returns None where it does not apply."""
    post = None
    if (gated is not None and m.act_fn is F.silu
            and not (has_hook(m.hook_pre) or has_hook(m.hook_pre_linear))):
        post = gated.gate_up_silu(x, joined.gate_up)
    if post is None:
        gate, up = linear(x, joined.gate_up).chunk(2, dim=-1)
        gate, up = m.hook_pre(gate), m.hook_pre_linear(up)
        if kernels is not None and m.act_fn is F.silu:
            post = kernels.silu_mul(gate, up)
        if post is None and m.act_fn is F.silu:        # a new tensor: the product may go into it
            post = F.silu(gate).mul_(up)
        elif post is None:
            post = m.act_fn(gate) * up
    if joined.b_in is not None:
        post = post + joined.b_in
    return m.hook_post(post)


class Rotary:
    """Rotary rows for the positions of a step, looked up once for all layers that share a table.

    With `rotary_adjacent_pairs` off, the half-swap TransformerLens builds with a clone and two
    writes is a `roll`, and its sign goes into a copy of the sine table."""

    def __init__(self, model):
        cfg = model.cfg
        self.dim, self.adjacent = cfg.rotary_dim, cfg.rotary_adjacent_pairs
        self.turn = model.blocks[0].attn.rotate_every_two
        seen: list[tuple[Tensor, Tensor, tuple[Tensor, Tensor]]] = []   # (cos, sin, table) per distinct table
        self.tables = []
        for block in model.blocks:      # each block holds its own copy, usually of the same values
            cos, sin = block.attn.rotary_cos, block.attn.rotary_sin
            same = [t for c, s, t in seen if c.shape == cos.shape and torch.equal(c, cos) and torch.equal(s, sin)]
            if not same:
                signed = sin
                if not self.adjacent:
                    half = self.dim // 2
                    signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
                seen.append((cos, sin, (cos, signed)))
                same = [seen[-1][2]]
            self.tables.append(same[0])

    def rows(self, pos: Int[Tensor, "batch pos"]) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the (cos, sin) rows at `pos`, shaped [batch, pos, 1, rotary_dim]."""
        seen: dict[int, tuple[Tensor, Tensor]] = {}
        out = []
        for cos, sin in self.tables:
            if id(cos) not in seen:
                seen[id(cos)] = (cos[pos][:, :, None], sin[pos][:, :, None])
            out.append(seen[id(cos)])
        return out

    def rotate(self, x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor) -> Tensor:
        r = self.dim
        x_rot = x if r == x.shape[-1] else x[..., :r]
        turned = self.turn(x_rot) if self.adjacent else x_rot.roll(r // 2, dims=-1)
        out = x_rot * cos + turned * sin
        return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)

    def rotate_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated q and k; in one pass when k directly follows q in one projection's output."""
        hq = q.shape[2]
        same_strides = all(a == b for a, b, size in zip(q.stride(), k.stride(), q.shape) if size > 1)
        adjacent = (q._base is not None and k._base is q._base and same_strides
                    and k.data_ptr() == q.data_ptr() + hq * q.stride(2) * q.element_size())
        if not adjacent:
            return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        both = q.as_strided((*q.shape[:2], hq + k.shape[2], q.shape[3]), q.stride())
        turned = self.rotate(both, cos, sin)
        return turned[:, :, :hq], turned[:, :, hq:]
