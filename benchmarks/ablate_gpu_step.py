"""What each of the GPU decode step's optimisations is worth: the rollout engine (batch 64 steered
rows + base partners, 48-token prompts, 512 new tokens, hook at block 14) with one optimisation
switched off at a time, interleaved over repeats; and the decode-attention kernel against SDPA on
this GPU.

    python benchmarks/ablate_gpu_step.py --shape qwen2.5-0.5b
"""

import argparse
import json
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import build_checkpoint, sync_time  # noqa: E402


def variant(**off):
    """A StaticDecoder factory with the named attributes set after construction."""
    from isokl_tl.graph_decode import StaticDecoder

    def make(model, steering, capacity):
        dec = StaticDecoder(model, steering, capacity)
        for k, v in off.items():
            setattr(dec, k, v)
        return dec
    return make


def attention_parity(dtype: torch.dtype) -> dict:
    """decode_attention against SDPA and a float64 reference over a half-used, partly masked cache
    (timings in CUDA graphs: `tune_attention.py`)."""
    from isokl_tl import attn_triton
    g = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv, d, cap = 128, 14, 2, 64, 560
    q = torch.randn(b, 1, hq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, hkv, cap, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, hkv, cap, d, device="cuda", generator=g).to(dtype)
    at = torch.tensor([300], device="cuda")
    mask = torch.zeros(b, cap, dtype=torch.long, device="cuda")
    mask[:, :301] = 1
    mask[::3, :17] = 0                                 # left padding on some rows
    z = attn_triton.decode_attention(q, k, v, mask, at, d ** -0.5)
    bias = torch.zeros(b, 1, 1, cap, device="cuda", dtype=dtype).masked_fill(mask[:, None, None] == 0, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=bias,
                                                           scale=d ** -0.5, enable_gqa=True).transpose(1, 2)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double(), v.double(), attn_mask=bias.double(), scale=d ** -0.5,
        enable_gqa=True).transpose(1, 2)
    name = str(dtype).split(".")[-1]
    return {f"attn_{name}_kernel_vs_sdpa_max_diff": float((z.float() - ref.float()).abs().max()),
            f"attn_{name}_kernel_vs_float64_max_diff": float((z.double() - exact).abs().max()),
            f"attn_{name}_sdpa_vs_float64_max_diff": float((ref.double() - exact).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="/tmp/ablate")
    a = ap.parse_args()
    from isokl_tl.hooks import hook_name
    from isokl_tl.models import load_model
    from isokl_tl.rollout import rollout

    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        results.update(attention_parity(dtype))
    for k, v in results.items():
        print(f"{k}: {v:.4g}", flush=True)

    ckpt = build_checkpoint(a.shape, Path("/tmp/isokl_ablate/ckpt"))
    model = load_model(str(ckpt), device="cuda", dtype="bfloat16")
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = v / v.norm()
    prompts = torch.randint(5, 600, (a.batch, 48), generator=g).tolist()
    c = torch.full((a.batch,), 3.0)
    from isokl_tl import block_triton
    no_add_norm = types.SimpleNamespace(**{k: getattr(block_triton, k) for k in ("rotate_store", "joined_views",
                                                                                 "silu_mul")},
                                        add_rms_norm=lambda *args: None)
    variants = {"all on": variant(),
                "rotary + cache writes as their own kernel (session 5)": variant(rotate_in_attention=False),
                "attention: SDPA over the whole cache": variant(attention=None),
                "residual add and RMSNorm as two kernels": variant(kernels=no_add_norm),
                "both off (session 3)": variant(attention=None, kernels=no_add_norm)}
    kw = dict(direction=v, hook=hook_name(a.layer), eos=[], rows_per_batch=a.batch)
    ref = None
    for name, dec in variants.items():
        r = rollout(model, prompts[:8], c[:8], decoder=dec, window=64, **kw)
        if ref is None:
            ref = r
        same = (r.tokens == ref.tokens).long().cumprod(1).bool()
        print(f"{name}: tokens as 'all on' {float((r.tokens == ref.tokens).float().mean()):.2f}, "
              f"max KL diff on the same prefix {float((r.kl - ref.kl).abs()[same].max()):.3g}", flush=True)
        rollout(model, prompts, c, decoder=dec, window=16, **kw)              # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.repeats):                                                # interleaved
        for name, dec in variants.items():
            secs = sync_time(lambda: rollout(model, prompts, c, decoder=dec, window=a.new, **kw))
            times[name].append(1000 * secs / a.new)
    for name, ts in times.items():
        results[f"ms_per_step: {name}"] = statistics.median(ts)
        print(f"{name}: {statistics.median(ts):.3f} ms/step ({', '.join(f'{t:.3f}' for t in ts)})", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ablate.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
