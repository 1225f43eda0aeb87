"""The Triton kernels of the GPU decode path, run by Triton's CPU interpreter against the PyTorch
arithmetic they replace. The interpreter must be switched on before Triton is first imported,
hence a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import isokl_tl.engine.kernels.block as block_triton
import isokl_tl.engine.kernels.score as score_kernel
from isokl_tl.engine.fusion import Rotary
from isokl_tl.engine.scoring import greedy_scores_torch
from test_score import BASE, _logits

# scoring: next token, KL, log-probability, agreement
score_kernel.BLOCK = 128                      # 16 slices of 313, 3 blocks each: ragged ends
for dtype in (torch.float32, torch.bfloat16):
    x = _logits(dtype=dtype)
    tok, kl, lp, agree, blp = score_kernel.greedy_scores_triton(x, BASE)
    ref = greedy_scores_torch(x, BASE)
    assert torch.equal(tok, ref[0]) and torch.equal(agree, ref[3]), (tok, ref[0], agree, ref[3])
    torch.testing.assert_close(kl, ref[1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lp, ref[2], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(blp, ref[4], atol=2e-5, rtol=1e-5)
    assert float(kl[1]) == 0 and float(kl[2]) == 0, kl

# the same kernel writing a rollout's records at a column, against record_torch
from isokl_tl.engine.scoring import record_torch


def state(eos_ids, width=6):
    out = {"tokens": torch.full((4, width), -1), "kl": torch.full((4, width), float("nan")),
           "logprob": torch.full((4, width), float("nan")), "base_agree": torch.zeros(4, width, dtype=torch.bool),
           "base_logprob": torch.full((4, width), float("nan")), "gen_len": torch.tensor([3, 1, 3, 3]), "eos": torch.tensor([False, True, False, False])}
    return {"out": out, "col": torch.tensor([3]), "has": torch.tensor([0, 1, 3]), "eos_ids": eos_ids,
            "partner_at": torch.tensor([4, 5, -1, 6]), "next": torch.full((7,), -9)}


for dtype in (torch.float32, torch.bfloat16):
    x = _logits(dtype=dtype)
    first = int(greedy_scores_torch(x, BASE)[0][0])
    for eos_ids in (torch.tensor([10 ** 6, first]), torch.tensor([], dtype=torch.long)):
        got_st, ref_st = state(eos_ids), state(eos_ids.clone())
        got = score_kernel.greedy_record_triton(x, BASE, got_st)
        ref = record_torch(*greedy_scores_torch(x, BASE), ref_st)
        assert torch.equal(got, ref) and int(got.min()) >= 0, (got, ref)
        for name in ("tokens", "base_agree", "gen_len", "eos"):
            assert torch.equal(got_st["out"][name], ref_st["out"][name]), (name, got_st["out"][name], ref_st["out"][name])
        for name in ("kl", "logprob", "base_logprob"):
            torch.testing.assert_close(got_st["out"][name], ref_st["out"][name], atol=2e-5, rtol=1e-5, equal_nan=True)
        eo = got_st["out"]
        assert bool(eo["eos"][0]) == (len(eos_ids) > 0) and bool(eo["eos"][1]) and int(eo["tokens"][1, 3]) == -1
        assert int(eo["tokens"][0, 3]) == first and eo["gen_len"].tolist() == [4, 1, 4, 4]

# rotary + KV-cache writes, against Rotary.rotate_qk and index_copy_
b, hq, hk, d, cap = 5, 4, 2, 16, 12
rot = object.__new__(Rotary)
rot.dim, rot.adjacent = d, False
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    out = torch.randn(b, 1, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, v = out.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(b, 1, hq, d), k.view(b, 1, hk, d), v.view(b, 1, hk, d)
    assert block_triton.joined_views(q, k, v) and not block_triton.joined_views(q, k.clone(), v)
    cos = torch.randn(b, 1, 1, d, generator=g).to(dtype)
    sin = torch.randn(b, 1, 1, d, generator=g).to(dtype)
    at = torch.tensor([7])
    kc, vc = torch.zeros(b, hk, cap, d, dtype=dtype), torch.zeros(b, hk, cap, d, dtype=dtype)
    got_q = block_triton.rotate_store(q, k, v, cos, sin, kc, vc, at)
    ref_q, ref_k = rot.rotate_qk(q, k, cos, sin)
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    rk.index_copy_(2, at, ref_k.transpose(1, 2))
    rv.index_copy_(2, at, v.transpose(1, 2))
    if dtype == torch.bfloat16:       # rounding spelled out on the bits: bit-identical
        assert torch.equal(got_q, ref_q) and torch.equal(kc, rk)
    else:                             # float32 may fuse a multiply-add: within rounding
        torch.testing.assert_close(got_q, ref_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(kc, rk, atol=1e-6, rtol=1e-6)
    assert torch.equal(vc, rv) and bool((kc[:, :, 7] != 0).all()) and not kc[:, :, :7].any()

# silu(gate) * up on the halves of a joined projection
for dtype in (torch.float32, torch.bfloat16):
    h = (3 * torch.randn(3, 2, 2 * 1500, generator=g)).to(dtype)
    gate, up = h.chunk(2, dim=-1)
    got = block_triton.silu_mul(gate, up)
    ref = torch.nn.functional.silu(gate) * up
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -6)
    torch.testing.assert_close(got, ref, **tol)
    assert block_triton.silu_mul(gate, up.clone()) is None      # unequal strides: PyTorch instead

# residual add + RMSNorm, against the add and torch.rms_norm
for dtype in (torch.float32, torch.bfloat16):
    a, b = (torch.randn(4, 1, 600, generator=g).to(dtype) for _ in range(2))
    w = (1 + torch.randn(600, generator=g) / 4).to(dtype)
    total, normed = block_triton.add_rms_norm(a, b, w, 1e-6)
    assert torch.equal(total, a + b)
    ref = torch.rms_norm(a + b, (600,), w, 1e-6)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2 ** -7)
    torch.testing.assert_close(normed, ref, **tol)
    assert block_triton.add_rms_norm(a, b[..., ::2].repeat(1, 1, 2), w[:300], 1e-6) is None

# split-K projection pieces, and their sum added by the add + RMSNorm, against F.linear + add_rms_norm
import isokl_tl.engine.kernels.splitk as splitk
for dtype in (torch.float32, torch.bfloat16):
    for rows, d_in, config in ((3, 200, (64, 32, 64, 3, 4, 3)), (70, 96, (64, 64, 64, 1, 4, 3)), (5, 300, None)):
        x = torch.randn(rows, 2 * d_in, generator=g).to(dtype)[:, ::2]      # strided rows: copied first
        wt = (torch.randn(40, d_in, generator=g) / d_in ** 0.5).to(dtype)
        bias = torch.randn(40, generator=g).to(dtype)
        parts = splitk.linear_parts(x, wt, config)
        assert parts.dtype == torch.float32 and parts.shape[1:] == (rows, 40)
        torch.testing.assert_close(parts.sum(0), x.float() @ wt.float().T, atol=1e-5, rtol=1e-5)
        a = torch.randn(rows, 40, generator=g).to(dtype)
        w = (1 + torch.randn(40, generator=g) / 4).to(dtype)
        for b in (None, bias):
            total, normed = splitk.add_parts_rms_norm(a, parts, b, w, 1e-6)
            ref_total, ref_normed = block_triton.add_rms_norm(a, torch.nn.functional.linear(x, wt, b), w, 1e-6)
            # the same sum in another order: equal in float32 to rounding, in bfloat16 to one rounding step
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2 ** -7)
            torch.testing.assert_close(total, ref_total, **tol)
            torch.testing.assert_close(normed, ref_normed, **tol)
            # the rounding order exactly: one float32 piece plus the bias, rounded once, then the add
            piece = (x.float() @ wt.float().T)[None]
            delta = (piece[0] + (0 if b is None else b.float())).to(dtype)
            exact = splitk.add_parts_rms_norm(a, piece, b, w, 1e-6)
            expect = block_triton.add_rms_norm(a, delta, w, 1e-6)
            assert torch.equal(exact[0], expect[0]) and torch.equal(exact[1], expect[1]), (dtype, rows)

# the gate/up multiply with silu(gate) * up in its epilogue, against F.linear + silu_mul
import isokl_tl.engine.kernels.gate_up as gate_up
for dtype in (torch.float32, torch.bfloat16):
    for rows, d_in, config in ((3, 200, (64, 16, 64, 4, 3)), (70, 96, (64, 32, 64, 4, 3)), (5, 300, None)):
        x = torch.randn(rows, 2 * d_in, generator=g).to(dtype)[:, ::2]      # strided rows: copied first
        wt = (torch.randn(2 * 40, d_in, generator=g) / d_in ** 0.5).to(dtype)
        got = gate_up.gate_up_silu(x[:, None], wt, config)
        gate, up = torch.nn.functional.linear(x, wt).chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2 ** -6)
        assert got.shape == (rows, 1, 40)
        torch.testing.assert_close(got[:, 0], ref, **tol)
    # the rounding order exactly, on sums float32 holds exactly (multiples of 1/64): gate and up
    # rounded to the dtype, then the activation, then the product, as F.linear + silu_mul round
    x = (torch.randint(-16, 17, (6, 64), generator=g) / 8).to(dtype)
    wt = (torch.randint(-16, 17, (2 * 48, 64), generator=g) / 8).to(dtype)
    gate, up = (x.double() @ wt.double().T).to(dtype).chunk(2, dim=-1)
    g32 = gate.float()
    act = (g32 / (1 + torch.exp(-g32))).to(dtype)
    expect = (act.float() * up.float()).to(dtype)
    got = gate_up.gate_up_silu(x, wt, (64, 16, 32, 4, 2))
    if dtype == torch.bfloat16:
        assert torch.equal(got, expect), (got.float() - expect.float()).abs().max()
    else:                             # nothing to round; exp to the last bit of float32
        torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6)
    assert gate_up.gate_up_silu(x[:1].expand(200, -1), wt) is None            # more rows than MAX_ROWS
    assert gate_up.gate_up_silu(x, wt.T.contiguous().T) is None          # a strided weight
    assert gate_up.gate_up_silu(x.float() if dtype != torch.float32 else x.double(), wt) is None
    assert gate_up.gate_up_silu(x.half(), wt.half()) is None                # float16: not taken
    try:
        gate_up.gate_up_silu(x[:, :32], wt)
        raise AssertionError("a weight of another width was taken")
    except ValueError:
        pass

# tiles fit the shared memory they are given: fewer stages, then none (cuBLAS)
for rows, d_in in ((64, 896), (128, 4864), (128, 8192)):
    big = splitk.TILES[min((k for k in splitk.TILES if k[0] == (rows <= 64) and splitk.TILES[k]),
                           key=lambda k: abs(k[1] - d_in))]
    assert splitk.tiles(rows, d_in) in (big, None)
import isokl_tl.engine.kernels.tiling as tiling
original = tiling.shared_memory
for room, size in ((100 * 1024, 2), (100 * 1024, 4), (20 * 1024, 4)):
    tiling.shared_memory = lambda device, room=room: room
    for key in splitk.TILES:
        got = splitk.tiles(64 if key[0] else 128, key[1], size)
        if got is not None:
            bm, bn, bk, _, _, stages = got
            assert 2 <= stages and stages * (bm + bn) * bk * size <= room, (key, got, room)
        else:
            assert splitk.TILES[key] is None or 2 * sum(splitk.TILES[key][:2]) * splitk.TILES[key][2] * size > room
import isokl_tl.engine.kernels.gate_up as gate_up
for room, size in ((100 * 1024, 2), (100 * 1024, 4), (20 * 1024, 4)):
    tiling.shared_memory = lambda device, room=room: room
    for key, config in gate_up.TILES.items():
        got = gate_up.tiles(64 if key[0] else 128, key[1], size)
        if got is not None:                   # x's tile and two weight tiles per stage: as many as fit
            bm, bn, bk, _, stages = got
            per_stage = (bm + 2 * bn) * bk * size
            assert got[:4] == config[:4] and stages == min(config[4], room // per_stage), (key, got, room)
        else:
            assert config is None or 2 * (config[0] + 2 * config[1]) * config[2] * size > room, (key, room)
tiling.shared_memory = original
assert gate_up.tiles(128, 896) is None and gate_up.tiles(64, 896) == gate_up.TILES[(True, 896)]   # cuBLAS there

# decode attention over the used part of a static cache, against SDPA over all of it
import isokl_tl.engine.kernels.attn as attn_triton
attn_triton.SLICE, attn_triton.BLOCK = 32, 16            # 3 slices, 2 blocks each; the last unused
for dtype in (torch.float32, torch.bfloat16):
    for hq, hkv in ((6, 2), (4, 4)):
        b, d, cap = 3, 16, 70
        q = torch.randn(b, 1, hq, d, generator=g).to(dtype)
        kc, vc = (torch.randn(b, hkv, cap, d, generator=g).to(dtype) for _ in range(2))
        mask = torch.ones(b, cap, dtype=torch.long)
        mask[:, 41:] = 0                                  # keys 0..40 in use
        mask[1, :5] = 0                                   # left padding
        mask[2, 33:38] = 0                                # a hole within one block
        kc[:, :, 41:], vc[:, :, 41:] = float("nan"), float("nan")     # never read
        assert attn_triton.supports(q, kc)
        z = attn_triton.decode_attention(q, kc, vc, mask, torch.tensor([40]), 0.25)
        bias = torch.zeros(b, 1, 1, cap).masked_fill(mask[:, None, None] == 0, float("-inf"))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(1, 2), kc.float().nan_to_num(), vc.float().nan_to_num(), attn_mask=bias, scale=0.25,
            enable_gqa=True).transpose(1, 2)
        tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -7)
        torch.testing.assert_close(z.float(), ref, **tol)

# soft-capped scores and a sliding window (Gemma 2's local layers), against engine.attention
from isokl_tl.engine.attention import exact_attention, in_window
for dtype in (torch.float32, torch.bfloat16):
    b, hq, hkv, d, cap = 3, 6, 2, 16, 70
    q = (3 * torch.randn(b, 1, hq, d, generator=g)).to(dtype)
    kc, vc = (torch.randn(b, hkv, cap, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(b, cap, dtype=torch.long)
    mask[:, 41:] = 0
    mask[1, :5] = 0
    for soft_cap, window in ((2.0, None), (None, 7), (2.0, 20), (None, 60)):
        z = attn_triton.decode_attention(q, kc, vc, mask, torch.tensor([40]), 0.25, cap=soft_cap, window=window)
        allowed = mask.bool()[:, None, None, :]
        if window is not None:
            allowed = allowed & in_window(torch.tensor([40]), cap, window)
        ref = exact_attention(q.float(), kc.float(), vc.float(), allowed, attn_scale=4.0, cap=soft_cap)
        tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -7)
        torch.testing.assert_close(z.float(), ref, **tol)
        plain = attn_triton.decode_attention(q, kc, vc, mask, torch.tensor([40]), 0.25)
        changes = soft_cap is not None or window < 41              # (a window over all 41 keys is none)
        assert ((z.float() - plain.float()).abs().max() > 1e-2) == changes, (soft_cap, window)

# rotation inside the attention kernel: the same numbers as rotate_store, then decode_attention
attn_triton.SLICE = 16                                    # the new key (40) in the third of 5 slices
for dtype in (torch.float32, torch.bfloat16):
    b, hq, hk, d, cap = 3, 6, 2, 16, 70
    out = torch.randn(b, 1, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, v = out.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(b, 1, hq, d), k.view(b, 1, hk, d), v.view(b, 1, hk, d)
    cos, sin = (torch.randn(b, 1, 1, d, generator=g).to(dtype) for _ in range(2))
    kc, vc = (torch.randn(b, hk, cap, d, generator=g).to(dtype) for _ in range(2))
    kc[:, :, 40:], vc[:, :, 40:] = float("nan"), float("nan")       # the new slot, then unused ones
    mask = torch.ones(b, cap, dtype=torch.long)
    mask[:, 41:] = 0
    mask[1, :5] = 0
    at = torch.tensor([40])
    rk, rv = kc.clone(), vc.clone()
    ref = attn_triton.decode_attention(block_triton.rotate_store(q, k, v, cos, sin, rk, rv, at), rk, rv, mask, at, 0.25)
    z = attn_triton.rotate_attend(q, k, v, cos, sin, kc, vc, mask, at, 0.25)
    for got, want in ((z, ref), (kc, rk), (vc, rv)):       # bit for bit (NaN: the unused slots)
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    assert not z.isnan().any() and not kc[:, :, 40].isnan().any()
    # with a soft cap and a window too (Gemma 2's local layers)
    kc2, vc2, rk2, rv2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    kc2[:, :, 40], vc2[:, :, 40] = float("nan"), float("nan")
    ref = attn_triton.decode_attention(block_triton.rotate_store(q, k, v, cos, sin, rk2, rv2, at), rk2, rv2, mask, at,
                                       0.25, cap=2.0, window=7)
    z = attn_triton.rotate_attend(q, k, v, cos, sin, kc2, vc2, mask, at, 0.25, cap=2.0, window=7)
    torch.testing.assert_close(z, ref, atol=0, rtol=0)

print("kernels ok")
"""


DECODE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from isokl_tl.engine.kernels import attn as attn_triton, block as block_triton, gate_up, splitk
from isokl_tl.engine import ReferenceDecoder
from isokl_tl.engine import FastDecoder
from isokl_tl.engine import GraphDecoder
from isokl_tl.models import TINY, load_model
from isokl_tl.rollout import rollout

torch.manual_seed(0)
model = load_model(TINY)
v = torch.randn(model.cfg.d_model)
v = v / v.norm()


def with_kernels(cls):
    def make(model, steering, capacity):
        dec = cls(model, steering, capacity)
        dec.kernels, dec.splitk, dec.gated = block_triton, splitk, gate_up     # what a CUDA device gets
        if cls is GraphDecoder:
            dec.attention, dec.rotate_in_kernel, dec.rotate_in_attention = attn_triton, True, True
        return dec
    return make


fused = []                                            # the split-K projections' adds that ran
_add_parts = splitk.add_parts_rms_norm
splitk.add_parts_rms_norm = lambda *a: fused.append(a[0].shape[0]) or _add_parts(*a)
hidden = []                                           # the fused gate/up + silu launches that ran
gate_up.TILES = {(True, 64): (64, 32, 64, 4, 3), (False, 64): (64, 32, 64, 4, 3)}   # the tiny model's, whatever the H200's are
_gate_up = gate_up.gate_up_silu


def _counted(*a):
    out = _gate_up(*a)
    if out is not None:                               # a fallback to cuBLAS does not count
        hidden.append(a[0].shape[0])
    return out


gate_up.gate_up_silu = _counted
prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]        # unequal: left padding in the key mask
kw = dict(direction=v, hook="blocks.1.hook_resid_post", window=10, eos=[])
c = torch.tensor([3.0, 6.0])
ref = rollout(model, prompts, c, decoder=ReferenceDecoder, **kw)
for cls in (FastDecoder, GraphDecoder):
    fused.clear(), hidden.clear()
    got = rollout(model, prompts, c, decoder=with_kernels(cls), **kw)
    assert torch.equal(got.tokens, ref.tokens), (cls, got.tokens, ref.tokens)
    torch.testing.assert_close(got.kl, ref.kl, atol=1e-4, rtol=0)
    # both projections of every block in the prefill and the 9 steps, but two: block 0's MLP output
    # is where the base partners' rows join, and block 1's resid_post carries the steering
    assert len(fused) >= 10 * (2 * model.cfg.n_layers - 2), (cls, len(fused))
    assert len(hidden) == 10 * model.cfg.n_layers, (cls, len(hidden))      # every block's MLP, every pass
# a hook between a residual add and the norm after it switches that fusion off and fires; a hook on
# the rotated queries makes q rotate apart from the attention kernel, and fires; so does one on the
# MLP's hidden activations, which the split-K down projection then reads; one on the gate switches
# the fused gate/up + silu off
for point in ("blocks.2.hook_resid_mid", "blocks.0.attn.hook_rot_q", "blocks.3.mlp.hook_post", "blocks.1.mlp.hook_pre",
              "blocks.2.mlp.hook_pre_linear",
              "blocks.3.hook_resid_pre", "blocks.2.hook_mlp_out", "blocks.2.ln2.hook_normalized"):
    seen = []
    with model.hooks(fwd_hooks=[(point, lambda t, hook: seen.append(t.shape[0]) or t * 1.5)]):
        ref = rollout(model, prompts, c, decoder=ReferenceDecoder, **kw)
        n = len(seen)
        got = rollout(model, prompts, c, decoder=with_kernels(GraphDecoder), **kw)
    assert len(seen) > n and torch.equal(got.tokens, ref.tokens), point
    torch.testing.assert_close(got.kl, ref.kl, atol=1e-4, rtol=0)
# Gemma 2: soft-capped attention (a small cap, so that it matters) and sliding-window layers, in the kernel
import tempfile
from isokl_tl.models.checkpoints import make_checkpoint
with tempfile.TemporaryDirectory() as where:
    gemma = load_model(str(make_checkpoint("gemma2", where, attn_logit_softcapping=1.0)))
w = torch.randn(gemma.cfg.d_model)
kw = dict(direction=w / w.norm(), hook="blocks.0.hook_resid_post", window=12, eos=[])      # past the 8-key window
ref = rollout(gemma, prompts, c, decoder=ReferenceDecoder, **kw)
got = rollout(gemma, prompts, c, decoder=with_kernels(GraphDecoder), **kw)
assert torch.equal(got.tokens, ref.tokens), (got.tokens, ref.tokens)
torch.testing.assert_close(got.kl, ref.kl, atol=1e-4, rtol=0)
print("decoders ok")
"""


def test_decoders_with_the_kernels_match_transformer_lens_in_the_interpreter():
    """The GPU path's kernels (add + RMSNorm, attention over the written slots, rotary + cache,
    rotation inside the attention, gate/up with silu-mul, the split-K projections summed by the add + RMSNorm)
    inside both fast decoders, on CPU through the interpreter, against TransformerLens; hooks on
    the tensors a fused kernel skips switch it off and fire."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", DECODE, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "decoders ok" in done.stdout, done.stderr[-3000:]


def test_triton_kernels_match_torch_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", CHECK, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stderr[-3000:]
