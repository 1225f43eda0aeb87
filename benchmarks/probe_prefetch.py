"""Does prefetching a block's weights into L2 on a side stream (while the block's earlier,
latency-bound kernels run) shorten a captured decode step? Each variant captures its own graph;
replays timed interleaved. (Session 6 on an H100: no; 1.506 ms/step without, 1.496-1.526 with the
block's own MLP weights, 1.70-1.76 with the next block's: see BENCHMARKS.md.)

    python benchmarks/probe_prefetch.py --shape qwen2.5-0.5b
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHUNK = 32768      # bytes per bulk prefetch instruction


@triton.jit
def _prefetch(base, n_chunks, PER: tl.constexpr, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * PER + tl.arange(0, PER)
    offs = tl.minimum(offs, n_chunks - 1)
    ptrs = base + offs.to(tl.int64) * CHUNK
    tl.inline_asm_elementwise(f"cp.async.bulk.prefetch.L2.global [$1], {CHUNK}; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


def prefetch(t: torch.Tensor) -> None:
    n = t.numel() * t.element_size()
    n_chunks = triton.cdiv(n, CHUNK)
    base = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (n,))
    _prefetch[(triton.cdiv(n_chunks, 128),)](base, n_chunks, PER=128, CHUNK=CHUNK, num_warps=4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    a = ap.parse_args()
    from isokl_tl.graph_decode import StaticDecoder
    from timing import steered_model

    model, tokens, steering = steered_model(a.shape)
    side = torch.cuda.Stream()
    plain = StaticDecoder._static_layer

    def weights(dec, i, which):
        blk, j = model.blocks[i], dec.joined[i]
        w = {"qkv": j.qkv, "o": blk.attn.W_O, "gu": j.gate_up, "down": blk.mlp.W_out}
        return [w[k] for k in which]

    def variant(which_now, which_next):
        def layer(self, i, resid, x, cos, sin):
            main_s = torch.cuda.current_stream()
            side.wait_stream(main_s)
            with torch.cuda.stream(side):
                for t in weights(self, i, which_now):
                    prefetch(t)
                if i + 1 < model.cfg.n_layers:
                    for t in weights(self, i + 1, which_next):
                        prefetch(t)
            out = plain(self, i, resid, x, cos, sin)
            main_s.wait_stream(side)
            return out
        return layer

    variants = {"none": None,
                "this block's o+gate/up+down": variant(["o", "gu", "down"], []),
                "this block's gate/up+down": variant(["gu", "down"], []),
                "this block's mlp, next qkv+o": variant(["gu", "down"], ["qkv", "o"]),
                "next block's all": variant([], ["qkv", "o", "gu", "down"])}
    decs = {}
    with torch.no_grad(), steering as s:
        for name, fn in variants.items():
            StaticDecoder._static_layer = plain if fn is None else fn
            dec = StaticDecoder(model, s, 560)
            logits = dec.prefill(tokens, torch.ones_like(tokens))
            nxt = logits.argmax(-1)
            for _ in range(300):
                dec.step(nxt)
            decs[name] = (dec, nxt)
        StaticDecoder._static_layer = plain
        times = {k: [] for k in decs}
        for rep in range(4):
            for name, (dec, nxt) in decs.items():
                dec.length -= 20
                dec.pos_ids -= 20
                dec.write_at -= 20
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    dec.step(nxt)
                torch.cuda.synchronize()
                times[name].append(1000 * (time.perf_counter() - t) / 20)
        for name, ts in times.items():
            print(f"{name:32s} {sorted(ts)[1]:.3f} ms/step  {[round(x, 3) for x in ts]}")


if __name__ == "__main__":
    main()
