"""On the GPU: fork pmass read while the sweep decodes (captured fork graphs of the CUDA-graph decoder)
against the reference `fork_pmass` over the finished rollouts, the embedded model (or a random-init
checkpoint, `--shape`) in float32 (or `--dtype`); prints the largest differences and the time each
way. The prompts repeat at four coefficients (their prefill shares blocks, `FastDecoder`'s distinct
rows), and the rollouts themselves are checked against TransformerLens's own forward
(`ReferenceDecoder`) too. A third pass reads an inline splice with thinking markers, two splices per
fork (`Forks.tails`: one captured graph per tail): the model has no `<think>` token, so " the" and
"." stand in for the markers, which makes forks fall inside and outside a "block" along every
rollout.

    python benchmarks/check_forks_gpu.py
    python benchmarks/check_forks_gpu.py --shape qwen2.5-0.5b --dtype bfloat16   # a random-init checkpoint

`--shape` builds a full-size random-init checkpoint of that shape (`isokl_tl.models.checkpoints.SHAPES`)
instead of the embedded model; its tokenizer is the tiny one, so the prompts are few tokens.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from isokl_tl import load_model
from isokl_tl.engine import ReferenceDecoder
from isokl_tl.hooks import default_layer, hook_name
from isokl_tl.pmass import ForkReader, fork_pmass, fork_schedule
from isokl_tl.splice import Splice
from isokl_tl.prompts import load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.thinking import thinking_report
from isokl_tl.tokens import prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser(description="fork pmass read while decoding against the reference, on the GPU")
    ap.add_argument("--shape", default=None, help="a random-init checkpoint of this shape, not the embedded model")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    if a.shape is None:
        model = load_model(device="cuda", dtype=a.dtype)
    else:
        from bench_gpu import build_checkpoint

        with tempfile.TemporaryDirectory() as tmp:         # the checkpoint goes once the model is loaded
            model = load_model(str(build_checkpoint(a.shape, Path(tmp) / "ckpt")), device="cuda", dtype=a.dtype)
    print(f"{a.shape or 'embedded model'}, {a.dtype}, {torch.cuda.get_device_name()}")
    hook = hook_name(default_layer(model))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = (v / v.norm()).cuda()
    prompts = [prompt_ids(model.tokenizer, p) for p in load_prompts("eval")[:8]] * 4
    coeffs = torch.tensor([0.0, 20.0, 40.0, 80.0]).repeat_interleave(8)
    forks = fork_schedule(128, every=8)
    marked = Splice(mode="inline", think_open=" the", think_close=".", close=" Done.")
    assert marked.markers(model.tokenizer) is not None
    for generated_only, splice in ((False, Splice()), (True, Splice()), (False, marked)):
        reader = ForkReader(model, forks, splice)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = rollout(model, prompts, coeffs, direction=v, hook=hook, window=128, forks=reader,
                    generated_only=generated_only)
        got = reader.result(r).frame
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        ref = fork_pmass(model, r, v, forks, splice).frame
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        same = (got[["row", "fork"]].values == ref[["row", "fork"]].values).all()
        marks = thinking_report(got, r, model.tokenizer, reader.splice)
        if marks:
            print(f"  {marks['forks_inside']} of {marks['forks']} forks inside a marked block")
        print(f"generated_only={generated_only}, splice {splice.mode} (close at {reader.splice['close_at']}): {len(got)} forks, same rows/forks {same}, argmax agree "
              f"{(got.argmax.values == ref.argmax.values).mean():.4f}, max |d pmass| "
              f"{(got.pmass - ref.pmass).abs().max():.2e}, max |d p_true| {(got.p_true - ref.p_true).abs().max():.2e}; "
              f"sweep with forks {t1 - t0:.2f} s, reference pmass {t2 - t1:.2f} s")
        plain = rollout(model, prompts, coeffs, direction=v, hook=hook, window=128, generated_only=generated_only,
                        decoder=ReferenceDecoder)
        agree = (r.tokens == plain.tokens).long().cumprod(1).bool()           # still on the same prefix
        print(f"  rollouts against TransformerLens's forward: tokens agree {(r.tokens == plain.tokens).float().mean():.4f}, "
              f"max |d KL| on the shared prefix {(r.kl - plain.kl).abs()[agree].nan_to_num().max():.2e}")


if __name__ == "__main__":
    main()
