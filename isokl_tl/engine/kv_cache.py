"""`KVCache`: the static key/value cache of the fast decoders.

Per layer, keys and values `[rows, kv_head, capacity, d_head]` are allocated once for the whole
rollout and written in place (keys already rotated), where TransformerLens concatenates its cache
every step. `mask` (`[batch, capacity]`, 1 where a slot holds a real token) says which slots a
query may read; `length` counts the slots written. Layers below a shared-prefix split hold the
steered rows only (their base partners repeat them there: `FastDecoder.share_prefix`).
"""

import torch
from jaxtyping import Int
from torch import Tensor


class KVCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.mask: Tensor | None = None
        self.length = 0

    def reset(self, shapes: list[tuple[int, ...]], batch: int, dtype: torch.dtype,
              device: torch.device) -> bool:
        """Empty buffers of these per-layer shapes. Buffers of the same shapes are cleared in place
        (a kept decoder's captured graph reads those very tensors); returns True when they were."""
        reused = ([tuple(k.shape) for k in self.k] == shapes and self.k[0].device == device
                  and self.mask.shape == (batch, self.capacity))
        if reused:
            for t in (*self.k, *self.v, self.mask):
                t.zero_()
        else:
            self.k = [torch.zeros(sh, dtype=dtype, device=device) for sh in shapes]
            self.v = [torch.zeros(sh, dtype=dtype, device=device) for sh in shapes]
            self.mask = torch.zeros((batch, self.capacity), dtype=torch.long, device=device)
        self.length = 0
        return reused

    def check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise ValueError(f"decode past the cache capacity of {self.capacity} tokens")

    def write(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer i's new keys and values (`[rows, pos, kv_head, d_head]`, for the first
        `rows` rows of the layer's cache) at the next slots; returns those rows' keys and values
        up to them."""
        end, n = self.length + k.shape[1], k.shape[0]
        self.k[i][:n, :, self.length:end] = k.transpose(1, 2)
        self.v[i][:n, :, self.length:end] = v.transpose(1, 2)
        return self.k[i][:n, :, :end], self.v[i][:n, :, :end]

    def select(self, rows: Int[Tensor, " keep"], own: Int[Tensor, " keep_own"] | None = None,
               split: int = 0) -> None:
        """Keep these batch rows; layers below `split` keep the rows `own` of theirs."""
        below = (own, row_moves(own)) if split else None       # each keep's moves planned once, not per buffer
        above = (rows, row_moves(rows))
        picks = [below if i < split else above for i in range(len(self.k))]
        self.k = [keep_rows(k, p, self.length, m) for k, (p, m) in zip(self.k, picks)]
        self.v = [keep_rows(v, p, self.length, m) for v, (p, m) in zip(self.v, picks)]
        self.mask = self.mask[rows]


def row_moves(rows: Int[Tensor, " keep"]) -> list[tuple[int, int, int]] | None:
    """How `keep_rows` moves a buffer's rows to keep `rows`: (to, from, count) copies in order, or
    None where `rows` is not ascending (then it indexes). A run of consecutive kept rows moves down
    by its gap `g` in pieces of at most `g` rows, so that source and destination never overlap; a
    run that would take more than four pieces is one copy through a buffer (count negated)."""
    r = rows.tolist()
    if any(b <= a for a, b in zip(r, r[1:])):
        return None
    moves, to, i = [], 0, 0
    while i < len(r):
        end = i + 1
        while end < len(r) and r[end] == r[end - 1] + 1:
            end += 1                                  # rows r[i] .. r[end - 1] are consecutive
        n, gap = end - i, r[i] - to
        if gap and n > 4 * gap:
            moves.append((to, r[i], -n))
        elif gap:
            moves += [(to + c, r[i] + c, min(gap, n - c)) for c in range(0, n, gap)]
        to, i = to + n, end
    return moves


def keep_rows(t: Tensor, rows: Int[Tensor, " keep"], length: int,
              moves: list[tuple[int, int, int]] | None = None) -> Tensor:
    """`t[rows]` for a cache buffer `[row, kv_head, slot, d_head]` of which the first `length`
    slots are read: with `rows` ascending, the kept rows move down inside t's own memory
    (`row_moves`, or `moves` computed from `rows` already) and the result is a view of its first
    `len(rows)` rows. No new buffer (whose pages the kernel would zero at first touch) and only the
    rows that move are copied, `length` slots of each; a row whose rows before it all stay is not
    copied at all."""
    moves = row_moves(rows) if moves is None else moves
    if moves is None or not t.is_contiguous():
        return t[rows]
    for to, src, n in moves:
        if n < 0:                                     # many small pieces: one copy through a buffer
            t[to:to - n, :, :length] = t[src:src - n, :, :length].clone()
        else:
            t[to:to + n, :, :length] = t[src:src + n, :, :length]
    return t[:len(rows)]
