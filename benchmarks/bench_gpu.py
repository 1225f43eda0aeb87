"""GPU benchmark: decode speed of the rollout engine against TransformerLens and Hugging Face
`generate`, the weight-streaming floor, bf16 parity, and the wall time of a full `run` cell.

    python benchmarks/bench_gpu.py --shape qwen2.5-0.5b --out /tmp/bench

The model is random-init (no hub here) with the named shape, built as a Hugging Face model, saved to
a local checkpoint directory and loaded through `isokl_tl.models.load_model` (so the HF baseline and
the HookedTransformer share the weights). Its tokenizer is the tiny BPE one (ids fit any vocab).
Prints one line per measurement and writes them as JSON to OUT/bench.json.
"""

import argparse
import functools
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from isokl_tl.models.checkpoints import SHAPES, make_checkpoint


def build_checkpoint(shape: str, where: Path, seed: int = 0) -> Path:
    """A random-init bf16 checkpoint of `shape` (`isokl_tl.models.checkpoints`, full size)."""

    spec = dict(SHAPES[shape])      # full-size configs, `isokl_tl.models.checkpoints.SHAPES`
    family = spec.pop("family")
    return make_checkpoint(family, where, seed=seed, dtype=torch.bfloat16, max_position_embeddings=4096,
                           initializer_range=0.05, **spec)


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def kernel_parity(model, batch: int) -> dict:
    """Scoring kernel vs PyTorch ops on random logits; rotary + cache-write kernel vs Rotary and
    index_copy_, silu(gate) * up and add + RMSNorm, on one block's joined projections; decode
    attention vs SDPA on a random cache."""
    from isokl_tl.engine import fusion
    from isokl_tl.engine.kernels import block as block_triton
    from isokl_tl.engine.scoring import greedy_scores, greedy_scores_torch

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(2 * batch, model.cfg.d_vocab, device="cuda", generator=g)).to(model.cfg.dtype)
    base_row = torch.arange(batch, 2 * batch, device="cuda")
    got, ref = greedy_scores(logits, base_row), greedy_scores_torch(logits, base_row)
    out = {"kernel_score_same_tokens_and_agreement": bool(torch.equal(got[0], ref[0]) and torch.equal(got[3], ref[3])),
           "kernel_score_max_kl_diff": float((got[1] - ref[1]).abs().max()),
           "kernel_score_max_logprob_diff": float((got[2] - ref[2]).abs().max())}
    block, rot = model.blocks[0], fusion.Rotary(model)
    x = torch.randn(2 * batch, 1, model.cfg.d_model, device="cuda", generator=g).to(model.cfg.dtype)
    q, k, v = fusion.qkv(block.attn, fusion.join(block), x)
    cos, sin = rot.rows(torch.randint(0, 500, (2 * batch, 1), device="cuda", generator=g))[0]
    at = torch.tensor([37], device="cuda")
    shape = (2 * batch, k.shape[2], 64, k.shape[3])
    kc, vc, rk, rv = (torch.zeros(shape, dtype=k.dtype, device="cuda") for _ in range(4))
    got_q = block_triton.rotate_store(q, k, v, cos, sin, kc, vc, at)
    ref_q, ref_k = rot.rotate_qk(q, k, cos, sin)
    rk.index_copy_(2, at, ref_k.transpose(1, 2))
    rv.index_copy_(2, at, v.transpose(1, 2))
    for name, a, b in (("q", got_q, ref_q), ("k", kc, rk), ("v", vc, rv)):
        out[f"kernel_rotary_{name}_elements_differing"] = f"{int((a != b).sum())} of {a.numel()}"
        out[f"kernel_rotary_{name}_max_diff"] = float((a.float() - b.float()).abs().max())
    mlp = block.mlp
    gate, up = torch.nn.functional.linear(x, fusion.join(block).gate_up).chunk(2, dim=-1)
    diff = block_triton.silu_mul(gate, up).float() - (mlp.act_fn(gate) * up).float()
    out["kernel_silu_mul_elements_differing"] = f"{int((diff != 0).sum())} of {diff.numel()}"
    out["kernel_silu_mul_max_diff"] = float(diff.abs().max())
    ln = model.blocks[0].ln2
    total, normed = block_triton.add_rms_norm(x, 2 * x.flip(0), ln.w, ln.eps)
    ref = torch.rms_norm(x + 2 * x.flip(0), (x.shape[-1],), ln.w, ln.eps)
    out["kernel_add_rms_norm_sum_identical"] = bool(torch.equal(total, x + 2 * x.flip(0)))
    out["kernel_add_rms_norm_elements_differing"] = f"{int((normed != ref).sum())} of {ref.numel()}"
    out["kernel_add_rms_norm_max_rel_diff"] = float(((normed.float() - ref.float()).abs() / ref.float().abs().clamp(min=1e-3)).max())
    # decode attention over 301 of 560 cache slots, some rows left-padded, against SDPA over all
    from isokl_tl.engine.kernels import attn as attn_triton
    cap, hkv = 560, k.shape[2]
    kc, vc = (torch.randn((2 * batch, hkv, cap, k.shape[3]), device="cuda", generator=g).to(k.dtype) for _ in range(2))
    mask = torch.zeros(2 * batch, cap, dtype=torch.long, device="cuda")
    mask[:, :301] = 1
    mask[::3, :17] = 0
    bias = torch.zeros(mask.shape, dtype=k.dtype, device="cuda").masked_fill(mask == 0, float("-inf"))[:, None, None]
    scale = q.shape[-1] ** -0.5
    z = attn_triton.decode_attention(got_q, kc, vc, mask, torch.tensor([300], device="cuda"), scale)
    ref = torch.nn.functional.scaled_dot_product_attention(got_q.transpose(1, 2), kc, vc, attn_mask=bias, scale=scale,
                                                           enable_gqa=hkv != q.shape[2]).transpose(1, 2)
    out["kernel_attention_max_diff_vs_sdpa"] = float((z.float() - ref.float()).abs().max())
    out["kernel_attention_elements_differing"] = f"{int((z != ref).sum())} of {z.numel()}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--baseline-new", type=int, default=None,
                    help="tokens for the TL/HF baselines (default: --new, the engine's workload)")
    ap.add_argument("--layer", type=int, default=None, help="steered block [default: the middle one]")
    ap.add_argument("--engines", default="graph,graph_unfused,fast",
                    help="which engines to time (graph: the CUDA-graph decoder the pipeline uses)")
    ap.add_argument("--cell", action="store_true", help="also time a full run cell")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement (median reported)")
    ap.add_argument("--out", default="/tmp/bench", help="where bench.json (and the cell summary) go")
    ap.add_argument("--work", default="/tmp/isokl_bench", help="scratch: checkpoint and cell run dir")
    a = ap.parse_args()
    a.baseline_new = a.baseline_new or a.new
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"shape": a.shape, "batch": a.batch, "device": torch.cuda.get_device_name()}

    def report(key, value, unit=""):
        results[key] = value
        print(f"{key}: {value:.4g} {unit}" if isinstance(value, float) else f"{key}: {value} {unit}", flush=True)

    from transformers import AutoModelForCausalLM

    from isokl_tl.engine import FastDecoder, GraphDecoder, ReferenceDecoder, unsupported_reason
    from isokl_tl.hooks import hook_name, steer
    from isokl_tl.models import load_model
    from isokl_tl.rollout import rollout

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = build_checkpoint(a.shape, work / "ckpt")
    model = load_model(str(ckpt), device="cuda", dtype="bfloat16")
    why = unsupported_reason(model)
    report("fast_path", why or "supported")
    unfused = functools.partial(GraphDecoder, fuse=False)   # TransformerLens's modules inside the graph
    engines = ([("graph", GraphDecoder), ("graph_unfused", unfused), ("fast", FastDecoder)]
               if why is None else [("tl", ReferenceDecoder)])
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    a.layer = model.cfg.n_layers // 2 if a.layer is None else a.layer
    engines = [e for e in engines if e[0] in a.engines.split(",") or e[0] == "tl"]
    hook = hook_name(a.layer)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = v / v.norm()
    prompts_t = torch.randint(5, 600, (a.batch, a.prompt_len), generator=g)
    prompts = prompts_t.tolist()
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts_t[:8].cuda(), names_filter=hook)
    coeff = 0.5 * float(cache[hook].float().norm(dim=-1).median())
    report("coeff", coeff)

    # (d) floor: the bytes of every weight over the measured device bandwidth
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    bw = 2 * buf.numel() / min(sync_time(lambda: dst.copy_(buf)) for _ in range(5))  # read + write
    del buf, dst
    report("weights_MB", nbytes / 2**20)
    report("bandwidth_TB_per_s", bw / 1e12)
    report("floor_ms_per_step", 1000 * nbytes / bw, "ms (weights read once at that bandwidth)")

    # the Triton kernels against the PyTorch arithmetic they replace, on this GPU, in bf16
    c = model.cfg            # (the checks take a Llama-like block: rotary, gated MLP, RMSNorm)
    if c.positional_embedding_type == "rotary" and c.gated_mlp and c.normalization_type == "RMS":
        for key, value in kernel_parity(model, a.batch).items():
            report(key, value)

    # parity in bf16: fast paths against TransformerLens's own forward
    c8 = torch.full((8,), coeff)
    kw = dict(direction=v, hook=hook, window=64, eos=[])
    ref = rollout(model, prompts[:8], c8, decoder=ReferenceDecoder, **kw)
    for name, dec in [e for e in engines if e[0] != "tl"]:
        r = rollout(model, prompts[:8], c8, decoder=dec, **kw)
        same = (r.tokens == ref.tokens).long().cumprod(1).bool()   # still on the same prefix
        diff = (r.kl - ref.kl).abs()[same]
        report(f"parity_{name}_token_agreement", float((r.tokens == ref.tokens).float().mean()))
        report(f"parity_{name}_same_prefix_fraction", float(same.float().mean()))
        report(f"parity_{name}_max_kl_diff_on_same_prefix", float(diff.max()) if diff.numel() else float("nan"))
        report(f"parity_{name}_mean_kl_diff_on_same_prefix", float(diff.mean()) if diff.numel() else float("nan"))

    # a decoder kept from a rollout (KV caches, CUDA graph) serving the next rollout of its shape,
    # with other prompts, coefficients and direction: exactly what a fresh decoder gives
    if why is None:
        from isokl_tl.engine import pool
        other = dict(kw, direction=torch.roll(v, 5))
        pool.release(model)
        rollout(model, prompts[:8], c8, decoder=GraphDecoder, **kw)
        again = rollout(model, prompts[8:16], 2 * c8, decoder=GraphDecoder, **other)
        reused = pool.kept_count(model) == 1
        pool.release(model)
        fresh = rollout(model, prompts[8:16], 2 * c8, decoder=GraphDecoder, **other)
        report("reuse_kept_decoder_served_it", reused)
        report("reuse_identical_tokens", bool(torch.equal(again.tokens, fresh.tokens)))
        report("reuse_max_kl_diff", float((again.kl - fresh.kl).abs().nan_to_num().max()))

    # parity in float32 on the GPU: the same comparison without bf16 rounding
    if why is None:
        m32 = load_model(str(ckpt), device="cuda", dtype="float32")
        ref = rollout(m32, prompts[:8], c8, decoder=ReferenceDecoder, **kw)
        r = rollout(m32, prompts[:8], c8, decoder=GraphDecoder, **kw)
        same = (r.tokens == ref.tokens).long().cumprod(1).bool()
        report("parity_graph_fp32_token_agreement", float((r.tokens == ref.tokens).float().mean()))
        report("parity_graph_fp32_max_kl_diff_on_same_prefix", float((r.kl - ref.kl).abs()[same].max()))
        del m32

    # (a) the engine, batch x new tokens, steered, with per-token KL against base partners
    c = torch.full((a.batch,), coeff)
    for name, dec in engines:
        rollout(model, prompts, c, decoder=dec, direction=v, hook=hook, window=16, eos=[],
                rows_per_batch=a.batch)   # warm-up
        torch.cuda.reset_peak_memory_stats()
        times = [sync_time(lambda: rollout(model, prompts, c, decoder=dec, direction=v, hook=hook,
                                           window=a.new, eos=[], rows_per_batch=a.batch))
                 for _ in range(a.repeats if name == "graph" else 1)]
        secs = statistics.median(times)
        report(f"engine_{name}_ms_per_step", 1000 * secs / a.new, f"ms ({a.batch} steered rows + partners)")
        report(f"engine_{name}_ms_per_step_all", ", ".join(f"{1000 * t / a.new:.3f}" for t in times))
        report(f"engine_{name}_tok_per_s", a.batch * a.new / secs)
        report(f"engine_{name}_peak_GB", torch.cuda.max_memory_allocated() / 2**30)

    # (b) TransformerLens generate with the same hook
    tokens = prompts_t.cuda()

    def tl_gen(n):
        with torch.no_grad(), steer(model, hook, v, coeff):
            model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                           use_past_kv_cache=True, verbose=False)
    tl_gen(4)
    times = [sync_time(lambda: tl_gen(a.baseline_new)) for _ in range(a.repeats)]
    report("tl_generate_ms_per_step", 1000 * statistics.median(times) / a.baseline_new,
           f"ms (over {a.baseline_new} tokens)")
    report("tl_generate_ms_per_step_all", ", ".join(f"{1000 * t / a.baseline_new:.2f}" for t in times))

    # (c) Hugging Face generate with a forward hook on the same block
    vv = v.to(torch.bfloat16).cuda()

    def hf_hook(module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] + coeff * vv, *output[1:])
        return output + coeff * vv

    def hf_gen(n):
        base = hf.base_model         # its blocks: .layers (Llama, Gemma, GPT-NeoX, ...), .h (GPT-2)
        blocks = getattr(base, "layers", None) or getattr(base, "h", None) or base.decoder.layers
        h = blocks[a.layer].register_forward_hook(hf_hook)
        try:
            with torch.no_grad():
                hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0)
        finally:
            h.remove()
    hf_gen(4)
    times = [sync_time(lambda: hf_gen(a.baseline_new)) for _ in range(a.repeats)]
    report("hf_generate_ms_per_step", 1000 * statistics.median(times) / a.baseline_new,
           f"ms (over {a.baseline_new} tokens)")
    report("hf_generate_ms_per_step_all", ", ".join(f"{1000 * t / a.baseline_new:.2f}" for t in times))
    for base in ("tl", "hf") if "engine_graph_ms_per_step" in results else ():
        report(f"speedup_vs_{base}", results[f"{base}_generate_ms_per_step"] / results["engine_graph_ms_per_step"])

    if a.cell:
        from isokl_tl.config import RunConfig
        from isokl_tl.run import Run

        cfg = RunConfig(model="tiny-random", device="cuda", dtype="bfloat16", layer=a.layer,
                        n_calib=8, calib_window=64, n_prompts=8, window=512,
                        alphas=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0), fork_every=8,
                        keep_weak=True, bootstrap=100, rows_per_batch=64)
        run = Run(work / "cell", cfg, model=model, progress=False, log=lambda m: print(m, flush=True))
        start = time.perf_counter()
        try:
            run.run_all()
            report("cell_seconds", time.perf_counter() - start)
        except Exception as e:  # report what finished; the stage timings below still print
            report("cell_error", f"{type(e).__name__}: {str(e)[:300]}")
        if (work / "cell" / "summary.md").exists():
            (out / "cell_summary.md").write_text((work / "cell" / "summary.md").read_text())
        if (work / "cell" / "manifest.json").exists():
            man = json.loads((work / "cell" / "manifest.json").read_text())
            for stage, rec in man["stages"].items():
                report(f"cell_{stage}_seconds_recorded", rec["seconds"])
    (out / "bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
