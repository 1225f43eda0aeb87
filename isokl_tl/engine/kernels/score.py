"""The Triton kernels behind `engine.scoring.greedy_scores` and `greedy_record`. `SPLIT` programs per steered row each
stream a slice of the row's logits and of its base partner's once, keeping running maxima,
rescaled sums (an online log-sum-exp) and first-occurrence argmaxes in float32; a second, tiny
kernel merges the slices (and, for `greedy_record_triton`, writes the results where a rollout
records them). The [batch, d_vocab] logits are read once and never copied. Set
TRITON_INTERPRET=1 before importing to run them on CPU tensors."""

import torch
import triton
import triton.language as tl
from jaxtyping import Bool, Float, Int
from torch import Tensor

BLOCK = 2048      # vocabulary entries per load
SPLIT = 16        # programs per row, each over a contiguous slice of the vocabulary
FIELDS = tl.constexpr(8)  # partial results per (row, slice)
WARPS = 4         # (`benchmarks/tune_mlp_scoring.py` on an H100: 32.8 -> 27.8 us from 4096 / 8 warps)


@triton.jit
def _partials(logits, stride, base_row, part, n_vocab: tl.constexpr, CHUNK: tl.constexpr,
              SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row i, slice c): over vocabulary slice c, the steered and base running maxima
    (with first-occurrence argmaxes), sum exp(x - m_s), sum exp(x - m_s) (x - y), sum exp(y - m_b),
    and the base logit at the steered argmax."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    j = tl.load(base_row + i)
    s_row = logits + i.to(tl.int64) * stride
    b_row = logits + j.to(tl.int64) * stride
    m_s = tl.full((), float("-inf"), tl.float32)
    z_s = tl.zeros((), tl.float32)
    t_s = tl.zeros((), tl.float32)
    m_b = tl.full((), float("-inf"), tl.float32)
    z_b = tl.zeros((), tl.float32)
    arg_s = tl.zeros((), tl.int32)
    arg_b = tl.zeros((), tl.int32)
    y_at = tl.zeros((), tl.float32)
    lo = c * CHUNK
    for start in range(0, CHUNK, BLOCK):
        offs = lo + start + tl.arange(0, BLOCK)
        ok = (offs < n_vocab) & (offs < lo + CHUNK)
        x = tl.load(s_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
        y = tl.load(b_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
        bx, ix = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        by, iy = tl.max(y, 0, return_indices=True, return_indices_tie_break_left=True)
        y_ix = tl.sum(tl.where(tl.arange(0, BLOCK) == ix, tl.where(ok, y, 0.0), 0.0), 0)
        y_at = tl.where(bx > m_s, y_ix, y_at)
        arg_s = tl.where(bx > m_s, lo + start + ix, arg_s)   # strictly greater: the first maximum wins
        arg_b = tl.where(by > m_b, lo + start + iy, arg_b)
        new_s = tl.maximum(m_s, bx)
        new_b = tl.maximum(m_b, by)
        e = tl.exp(x - new_s)                                 # 0 where masked
        scale = tl.exp(m_s - new_s)
        z_s = z_s * scale + tl.sum(e, 0)
        t_s = t_s * scale + tl.sum(e * (tl.where(ok, x, 0.0) - tl.where(ok, y, 0.0)), 0)
        z_b = z_b * tl.exp(m_b - new_b) + tl.sum(tl.exp(y - new_b), 0)
        m_s, m_b = new_s, new_b
    out = part + (i * SPLIT + c) * FIELDS
    tl.store(out + 0, m_s)
    tl.store(out + 1, z_s)
    tl.store(out + 2, t_s)
    tl.store(out + 3, m_b)
    tl.store(out + 4, z_b)
    tl.store(out + 5, arg_s.to(tl.float32))
    tl.store(out + 6, arg_b.to(tl.float32))
    tl.store(out + 7, y_at)


@triton.jit
def _combine(part, kl_out, lp_out, tok_out, agree_out, blp_out, SPLIT: tl.constexpr,
             col, width, done, gen_len, eos_ids, partner_at, nxt, N_EOS: tl.constexpr, EP: tl.constexpr,
             RECORD: tl.constexpr):
    """Program i: row i's slices merged (maxima, rescaled sums; the first slice holding the maximum
    gives the argmax) into KL, the log-probability of the argmax, the argmax, agreement and the
    base log-probability of the argmax. With
    RECORD, written as a rollout records them (`engine.scoring.record_torch`, the reference)."""
    i = tl.program_id(0)
    at = part + (i * SPLIT + tl.arange(0, SPLIT)) * FIELDS
    m_s, z_s, t_s = tl.load(at + 0), tl.load(at + 1), tl.load(at + 2)
    m_b, z_b = tl.load(at + 3), tl.load(at + 4)
    top_s, c_s = tl.max(m_s, 0, return_indices=True, return_indices_tie_break_left=True)
    top_b, c_b = tl.max(m_b, 0, return_indices=True, return_indices_tie_break_left=True)
    w_s = tl.exp(m_s - top_s)
    zs = tl.sum(z_s * w_s, 0)
    lse_s = top_s + tl.log(zs)
    lse_b = top_b + tl.log(tl.sum(z_b * tl.exp(m_b - top_b), 0))
    arg_s = tl.load(part + (i * SPLIT + c_s) * FIELDS + 5).to(tl.int64)   # exact: indices < 2^24
    arg_b = tl.load(part + (i * SPLIT + c_b) * FIELDS + 6).to(tl.int64)
    blp = tl.load(part + (i * SPLIT + c_s) * FIELDS + 7) - lse_b
    kl = tl.sum(t_s * w_s, 0) / zs - lse_s + lse_b
    lp = top_s - lse_s
    if RECORD:       # at column `col` of [batch, width] results; finished rows get -1 / NaN / False
        alive = tl.load(done + i).to(tl.int32) == 0
        at = i.to(tl.int64) * width + tl.load(col)
        tl.store(tok_out + at, tl.where(alive, arg_s, -1))
        tl.store(kl_out + at, tl.where(alive, kl, float("nan")))
        tl.store(lp_out + at, tl.where(alive, lp, float("nan")))
        tl.store(agree_out + at, alive & (arg_s == arg_b))
        tl.store(blp_out + at, tl.where(alive, blp, float("nan")))
        tl.store(gen_len + i, tl.load(gen_len + i) + alive.to(tl.int64))
        e = tl.arange(0, EP)
        hit = tl.sum((tl.load(eos_ids + e, mask=e < N_EOS, other=-1) == arg_s).to(tl.int32), 0) > 0
        tl.store(done + i, hit | (alive == 0))
        tl.store(nxt + i, arg_s)                   # the next token, for the row and its partner
        p = tl.load(partner_at + i)
        if p >= 0:
            tl.store(nxt + p, arg_s)
    else:
        tl.store(kl_out + i, kl)
        tl.store(lp_out + i, lp)
        tl.store(tok_out + i, arg_s)
        tl.store(agree_out + i, arg_s == arg_b)
        tl.store(blp_out + i, blp)


def _partials_of(logits: Tensor, base_row: Tensor) -> tuple[Tensor, int]:
    b, v = len(base_row), logits.shape[1]
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if v >= 2 ** 24:
        raise ValueError(f"vocabulary of {v} entries: the scoring kernel takes fewer than 2**24")
    dev = logits.device
    split = min(SPLIT, triton.next_power_of_2(triton.cdiv(v, BLOCK)))
    chunk = triton.cdiv(v, split)                 # every slice holds at least one entry
    part = torch.empty((b, split, FIELDS.value), dtype=torch.float32, device=dev)
    block = min(BLOCK, triton.next_power_of_2(chunk))
    _partials[(b, split)](logits, logits.stride(0), base_row, part, n_vocab=v, CHUNK=chunk, SPLIT=split,
                          BLOCK=block, num_warps=WARPS)
    return part, split


def greedy_scores_triton(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"]
                         ) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"],
                                    Bool[Tensor, " batch"], Float[Tensor, " batch"]]:
    b, dev = len(base_row), logits.device
    part, split = _partials_of(logits, base_row)
    kl = torch.empty(b, dtype=torch.float32, device=dev)
    lp = torch.empty(b, dtype=torch.float32, device=dev)
    tok = torch.empty(b, dtype=torch.long, device=dev)
    agree = torch.empty(b, dtype=torch.bool, device=dev)
    blp = torch.empty(b, dtype=torch.float32, device=dev)
    _combine[(b,)](part, kl, lp, tok, agree, blp, SPLIT=split, col=part, width=0, done=part, gen_len=part, eos_ids=part,
                   partner_at=part, nxt=part, N_EOS=0, EP=1, RECORD=False, num_warps=1)
    return tok, kl, lp, agree, blp


def greedy_record_triton(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"], st: dict
                         ) -> Int[Tensor, " rows"]:
    """`engine.scoring.record_torch` of the greedy scores, in the scoring's own two launches: the
    results go straight into the rollout's buffers (`st`)."""
    out, eos = st["out"], st["eos_ids"]
    part, split = _partials_of(logits, base_row)
    n = max(1, len(eos))
    _combine[(len(base_row),)](part, out["kl"], out["logprob"], out["tokens"], out["base_agree"],
                               out["base_logprob"], SPLIT=split,
                               col=st["col"], width=out["kl"].shape[1], done=out["eos"], gen_len=out["gen_len"],
                               eos_ids=eos if len(eos) else part, partner_at=st["partner_at"], nxt=st["next"],
                               N_EOS=len(eos), EP=triton.next_power_of_2(n), RECORD=True, num_warps=1)
    return st["next"]
