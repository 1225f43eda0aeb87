"""Would splitting the batch across CUDA streams hide the step's launch latency? A decode step is
~250 small kernels in one chain; the batch's rows are independent, so k decoders of 1/k of the rows
each (steered rows + their base partners, prefix shared below the steering block as in a rollout)
can run as k independent chains of graph replays, one per stream, overlapping each other's
launch and ramp. Times (ms per step, captured replays, no scoring) the whole batch in one graph
against k parts replayed one after another on one stream and on k streams. (Each part is prefilled
on its own, so its greedy tokens, and hence its logits, need not match the whole batch's in bf16.)

Measured (H100, session 7, 300 keys): whole batch 1.318 ms; 2 parts on 2 streams 1.679 (2.389 on
one); 4 parts on 4 streams 1.996 (4.510 on one). Each part reads every weight again.

    python benchmarks/probe_streams.py --shape qwen2.5-0.5b --fill 300
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(model, hook, v, tokens, parts: int, cap: int, fill: int, layer: int):
    """`parts` decoders over the steered rows of `tokens` split evenly, each with its partners,
    filled to `fill` keys and captured."""
    from isokl_tl.graph_decode import StaticDecoder
    from isokl_tl.hooks import steer

    n = tokens.shape[0] // parts
    dev = tokens.device
    coeff = torch.cat([torch.full((n,), 3.0), torch.zeros(n)]).to(dev)
    decs = []
    with steer(model, hook, v, coeff) as s:
        for p in range(parts):
            # each part's graph captured on a stream of its own: cuBLAS keeps a workspace per stream,
            # and graphs captured on one stream share it (concurrent replays of those hang)
            torch.cuda.graph.default_capture_stream = torch.cuda.Stream() if dev.type == "cuda" else None
            t = tokens[p * n:(p + 1) * n]
            dec = StaticDecoder(model, s, cap)
            dec.share_prefix(n, torch.arange(n, device=dev), layer)
            nxt = dec.prefill(torch.cat([t, t]), torch.ones(2 * n, t.shape[1], dtype=torch.long, device=dev)
                              ).argmax(-1)
            for _ in range(fill - t.shape[1]):
                dec.step(nxt)
            decs.append(dec)
    return decs


def rewind(decs, steps: int) -> None:
    """Back `steps` replays (which moved the device-side positions, not `dec.length`)."""
    for dec in decs:
        dec.pos_ids -= steps
        dec.write_at -= steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--rows", type=int, default=64, help="steered rows (each with a base partner)")
    ap.add_argument("--fill", type=int, default=300)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--parts", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    from timing import steered_model
    from isokl_tl.hooks import hook_name

    t0 = time.perf_counter()
    model, tokens, _ = steered_model(a.shape, rows=a.rows, layer=a.layer)
    print(f"model built and loaded: {time.perf_counter() - t0:.1f} s", flush=True)
    v = torch.randn(model.cfg.d_model)
    v = v / v.norm()
    cap = a.fill + a.steps + 8
    with torch.no_grad():
        sets = {k: build(model, hook_name(a.layer), v, tokens, k, cap, a.fill, a.layer) for k in [1] + a.parts}
        print(f"decoders filled and captured: {time.perf_counter() - t0:.1f} s", flush=True)
        streams = [torch.cuda.Stream() for _ in range(max(sets))]
        times = {}

        def run(name, decs, concurrent):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(a.steps):
                for j, dec in enumerate(decs):
                    if concurrent:
                        with torch.cuda.stream(streams[j]):
                            dec.graph.replay()
                    else:
                        dec.graph.replay()
            torch.cuda.synchronize()
            times.setdefault(name, []).append(1000 * (time.perf_counter() - t) / a.steps)
            if a.verbose:
                print(f"  {name}: {times[name][-1]:.4f} ms/step", flush=True)

        for _ in range(a.repeats):
            for k, decs in sets.items():
                run(f"{k} part(s), one stream", decs, False)
                rewind(decs, a.steps)
                if k > 1:
                    run(f"{k} parts, {k} streams", decs, True)
                    rewind(decs, a.steps)
    for name, ts in times.items():
        print(f"{name:28s} {sorted(ts)[len(ts) // 2]:.4f} ms/step (min {min(ts):.4f})", flush=True)


if __name__ == "__main__":
    main()
