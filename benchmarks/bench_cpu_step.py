"""What a CPU decode step of the fast path costs, and what the base partners add to it: prefill and
per-step time of `FastDecoder` on the embedded model for B steered rows alone, B rows + B base
partners, and the same with the partners sharing the blocks below the steering site
(`share_prefix`); each with TransformerLens's modules (`fuse=False`) and with the fused block
arithmetic of `isokl_tl.engine.fusion` (the default; on CPU its multiplies go through oneDNN over packed
weights, `isokl_tl.engine.cpu_linear`); then those multiplies alone, MKL against oneDNN.

    python benchmarks/bench_cpu_step.py --rows 8
"""

import argparse
import statistics
import time

import torch

from isokl_tl.engine import FastDecoder
from isokl_tl.hooks import hook_layer, steer
from isokl_tl.models import EMBEDDED, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=35)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--hook", default="blocks.18.hook_resid_post")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(EMBEDDED)
    b = a.rows
    own = torch.randint(5, 3000, (b, a.prompt_len))
    v = torch.randn(model.cfg.d_model)
    v = v / v.norm()
    print(f"{EMBEDDED}, {b} steered rows, {a.prompt_len}-token prompts, hook {a.hook}, "
          f"threads {torch.get_num_threads()}")
    cases = {"steered rows only": (own, torch.full((b,), 50.0), False),
             "+ partners": (torch.cat([own, own]), torch.cat([torch.full((b,), 50.0), torch.zeros(b)]), False),
             "+ partners, shared prefix": (torch.cat([own, own]),
                                           torch.cat([torch.full((b,), 50.0), torch.zeros(b)]), True)}
    for (name, (tokens, coeff, share)), fuse in ((case, fuse) for case in cases.items() for fuse in (False, True)):
        prefill, step = [], []
        with torch.no_grad(), steer(model, a.hook, v, coeff) as s:
            for _ in range(3):
                dec = FastDecoder(model, s, a.prompt_len + a.steps + 1, fuse=fuse)
                if share:
                    dec.share_prefix(b, torch.arange(b), hook_layer(a.hook))
                t0 = time.perf_counter()
                logits = dec.prefill(tokens, torch.ones_like(tokens))
                t1 = time.perf_counter()
                nxt = logits.argmax(-1)
                for _ in range(a.steps):
                    nxt = dec.step(nxt).argmax(-1)
                prefill.append(t1 - t0)
                step.append((time.perf_counter() - t1) / a.steps)
        name = f"{name}{', fused' if fuse else ''}"
        print(f"{name:35s} prefill {1000 * statistics.median(prefill):7.1f} ms   "
              f"step {1000 * statistics.median(step):6.1f} ms   (median of 3)")

    gemms(model, b)


def gemms(model, rows: int) -> None:
    """The step's multiplies on the model's own weights, MKL (`F.linear`) against oneDNN over packed
    weights (`isokl_tl.engine.cpu_linear`), each over all blocks: GB/s of weights streamed."""
    import torch.nn.functional as F

    from isokl_tl.engine import cpu_linear, fusion
    packer = cpu_linear.packer(model)
    if packer is None:
        return
    joined = [fusion.join(block) for block in model.blocks]
    groups = {"gate/up": [j.gate_up for j in joined],
              "down": [block.mlp.W_out.T for block in model.blocks],
              "unembedding": [model.unembed.W_U.T]}
    for name, ws in groups.items():
        xs = [torch.randn(rows, w.shape[1]) for w in ws]
        for w, x in zip(ws, xs):
            packer.linear(x, w)                                   # packs (once)
        nbytes = sum(w.numel() * 4 for w in ws)
        out = []
        for label, fn in (("MKL", F.linear), ("oneDNN packed", packer.linear)):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for w, x in zip(ws, xs):
                    fn(x, w)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            out.append(f"{label} {1000 * t:6.1f} ms ({nbytes / t / 1e9:4.1f} GB/s)")
        print(f"{rows} rows x {name:12s} " + "   ".join(out))


if __name__ == "__main__":
    main()
