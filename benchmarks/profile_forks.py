"""Where a fork's time goes on the GPU: the embedded model's headline sweep batch (64 steered rows
+ partners, bf16), one fork (`Decoder.fork`) after the prompt and after 256 decode steps, timed
with the device synchronised, against a decode step.

    python benchmarks/profile_forks.py
"""

import torch
from profile_gpu_step import timed  # a function's milliseconds on the GPU, synchronised

from isokl_tl import load_model
from isokl_tl.engine import make_decoder
from isokl_tl.hooks import Site, default_layer, hook_name, steer_sites
from isokl_tl.splice import Splice
from isokl_tl.prompts import load_prompts
from isokl_tl.tokens import left_pad, pad_id, prompt_ids


def main() -> None:
    model = load_model(device="cuda", dtype=torch.bfloat16)
    hook = hook_name(default_layer(model))
    v = torch.randn(model.cfg.d_model, device="cuda", dtype=model.cfg.dtype)
    v /= v.norm()
    prompts = [prompt_ids(model.tokenizer, p) for p in load_prompts("longform")[:8]] * 8
    tokens, mask = left_pad(prompts, pad_id(model.tokenizer), "cuda")
    b = len(prompts)
    tail = torch.tensor(Splice().token_ids(model.tokenizer), device="cuda")
    coeff = torch.cat([torch.full((b,), 30.0), torch.zeros(b)]).cuda()
    with steer_sites(model, [Site(hook, v)], [coeff]) as steering:
        dec = make_decoder(model, steering, tokens.shape[1] + 512 + len(tail) + 1)
        dec.share_prefix(b, torch.arange(b, device="cuda"), default_layer(model))
        logits = dec.prefill(torch.cat([tokens, tokens]), torch.cat([mask, mask]))
        nxt = logits.argmax(-1)
        print(f"decoder {dec.name}; tail {len(tail)} tokens; batch {b} steered + {b} partners")
        print(f"fork after the prompt: {timed(lambda: dec.fork(tail.expand(b, -1)), 10):.2f} ms")
        for _ in range(256):
            nxt = dec.step(nxt).argmax(-1)
        print(f"decode step: {timed(lambda: dec.step(nxt), 10):.2f} ms")
        print(f"fork after 256 steps: {timed(lambda: dec.fork(tail.expand(b, -1)), 10):.2f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            dec.fork(tail.expand(b, -1))
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
