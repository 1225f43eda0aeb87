"""Rollout throughput on CPU, in one process, same model, prompts, batch and steering hook:

  isokl-tl fast   this project's engine with the fast decode path (steered tokens + per-token KL
                  against a base partner per steered row)
  isokl-tl TL     the same engine over TransformerLens's own forward and KV cache
  TL generate     HookedTransformer.generate with the steering hook (tokens only, no KL)
  HF generate     transformers' generate on the same GGUF weights, steering by a forward hook on
                  the same block (tokens only, no KL)
  HF gen + KL     the same generate keeping its steered logits, then one teacher-forced forward of
                  the base model over the finished rollouts and the per-token KL: the same output
                  as this project's engine, the straightforward way

    python benchmarks/bench_rollout.py --batches 1 8 64 --window 32

All decode greedily with a KV cache for exactly `window` new tokens (EOS ignored) from equal-length
chat prompts. Each engine is warmed up once, then all are timed in turns, `--repeats` rounds; the
median is reported as steered tokens per second and milliseconds per decode step, and the engine's
speed over HF generate's per round.
"""

import argparse
import statistics
import time

import torch

from isokl_tl.directions import compute_direction
from isokl_tl.engine import FastDecoder, ReferenceDecoder
from isokl_tl.hooks import hook_layer, resolve_hook, steer
from isokl_tl.kl import token_kl
from isokl_tl.models import EMBEDDED, embedded_gguf_path, load_model
from isokl_tl.prompts import load_pairs, load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.tokens import prompt_ids


def hf_model():
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def timed(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function: all warmed up once, then timed in turns (one call of
    each per repeat), so a drift of the machine's speed hits every engine alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=EMBEDDED)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(a.model)
    d = compute_direction(model, load_pairs(), resolve_hook(model), "mean_diff")
    base = [prompt_ids(model.tokenizer, p) for p in load_prompts("calibration")]
    width = min(len(p) for p in base)
    base = [p[-width:] for p in base]  # equal lengths: no padding for generate() to handle
    coeff = 0.3 * d.resid_norm
    hf = hf_model() if a.model == EMBEDDED else None
    v = d.vector.to(model.cfg.dtype)

    def hf_hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + coeff * v
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    print(f"model {a.model}, window {a.window}, prompt {width} tokens, threads {torch.get_num_threads()}, "
          f"hook {d.hook}, coefficient {coeff:.3g}")
    names = ["isokl-tl fast", "isokl-tl TL", "TL generate", "HF generate", "HF gen + KL"]
    print(f"{'batch':>5} | " + " | ".join(f"{n:>20}" for n in names))
    print(f"{'':>5} | " + " | ".join(f"{'tok/s   ms/step':>20}" for _ in names))
    for b in a.batches:
        prompts = (base * (b // len(base) + 1))[:b]
        tokens = torch.tensor(prompts)
        c = torch.full((b,), coeff)
        kw = dict(direction=d.vector, hook=d.hook, window=a.window, eos=[], rows_per_batch=b)
        fns = {"fast": lambda: rollout(model, prompts, c, decoder=FastDecoder, **kw),
               "tl": lambda: rollout(model, prompts, c, decoder=ReferenceDecoder, **kw)}

        def tl_generate():
            with torch.no_grad(), steer(model, d.hook, d.vector, coeff):
                model.generate(tokens, max_new_tokens=a.window, do_sample=False, stop_at_eos=False,
                               use_past_kv_cache=True, verbose=False)
        fns["tlgen"] = tl_generate
        if hf is not None:
            def hf_generate(kl: bool = False):
                handle = hf.model.layers[hook_layer(d.hook)].register_forward_hook(hf_hook)
                try:
                    with torch.no_grad():
                        out = hf.generate(tokens, attention_mask=torch.ones_like(tokens),
                                          max_new_tokens=a.window, min_new_tokens=a.window, do_sample=False,
                                          pad_token_id=0, output_logits=kl, return_dict_in_generate=kl)
                finally:
                    handle.remove()
                if kl:     # base model teacher-forced on the finished rollouts, then per-token KL
                    with torch.no_grad():
                        base = hf(out.sequences[:, :-1]).logits[:, width - 1:]
                        steered = torch.stack(out.logits, dim=1)
                        token_kl(steered, base)
            fns["hf"] = hf_generate
            fns["hfkl"] = lambda: hf_generate(kl=True)
        times = timed(fns, a.repeats)
        secs = {k: statistics.median(t) for k, t in times.items()}
        cells = []
        for k in ("fast", "tl", "tlgen", "hf", "hfkl"):
            s = secs.get(k)
            cells.append(f"{b * a.window / s:>8.1f} {1000 * s / a.window:>9.1f}" if s else f"{'n/a':>20}")
        print(f"{b:>5} | " + " | ".join(f"{x:>20}" for x in cells), flush=True)
        if "hf" in times:
            ratios = [h / f for f, h in zip(times["fast"], times["hf"])]
            print(f"{'':>5}   isokl-tl fast vs HF generate, per repeat: "
                  + ", ".join(f"{x:.2f}x" for x in ratios), flush=True)


if __name__ == "__main__":
    main()
