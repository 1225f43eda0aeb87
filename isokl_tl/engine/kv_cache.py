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
        pick = [own if i < split else rows for i in range(len(self.k))]
        self.k = [keep_rows(k, p, self.length) for k, p in zip(self.k, pick)]
        self.v = [keep_rows(v, p, self.length) for v, p in zip(self.v, pick)]
        self.mask = self.mask[rows]


def keep_rows(t: Tensor, rows: Int[Tensor, " keep"], length: int) -> Tensor:
    """`t[rows]` for a cache buffer `[row, kv_head, slot, d_head]` of which the first `length`
    slots are read: with `rows` ascending, the kept rows move down inside t's own memory and the
    result is a view of its first `len(rows)` rows. No new buffer (whose pages the kernel would
    zero at first touch) and only the rows that move are copied, `length` slots of each; a row
    whose rows before it all stay is not copied at all. Source and destination never overlap: a
    run of kept rows moves down by its gap `g` in pieces of at most `g` rows, or through a copy
    of the run where that would take more than four pieces."""
    r = rows.tolist()
    if not t.is_contiguous() or any(b <= a for a, b in zip(r, r[1:])):
        return t[rows]
    to, i = 0, 0
    while i < len(r):
        end = i + 1
        while end < len(r) and r[end] == r[end - 1] + 1:
            end += 1                                  # rows r[i] .. r[end - 1] are consecutive
        n, gap = end - i, r[i] - to
        if gap and n > 4 * gap:                       # many small pieces: one copy through a buffer
            t[to:to + n, :, :length] = t[r[i]:r[i] + n, :, :length].clone()
        elif gap:
            for c in range(0, n, gap):
                m = min(gap, n - c)
                t[to + c:to + c + m, :, :length] = t[r[i] + c:r[i] + c + m, :, :length]
        to, i = to + n, end
    return t[:len(r)]
