"""On a GPU: sampled rollouts are the same through the CUDA-graph decoder and the reference
decoder (which drops finished rows), with EOS inside the window; and greedy ones on the
embedded-shape tiny model. Prints one line per check.

    python benchmarks/check_sampling_gpu.py
"""

import torch

from isokl_tl.engine import GraphDecoder, ReferenceDecoder, Sampling
from isokl_tl.models import TINY, load_model
from isokl_tl.prompts import load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.tokens import prompt_ids

model = load_model(TINY, device="cuda")
prompts = [prompt_ids(model.tokenizer, p) for p in load_prompts("eval")[:6]]
v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
coeff = torch.tensor([0.0, 3.0, 6.0, 9.0, 12.0, 15.0])
kw = dict(direction=v / v.norm(), hook="blocks.2.hook_resid_post", window=40)
for name, sampling in (("greedy", Sampling()), ("sampled", Sampling(temperature=1.0, seed=5))):
    ref = rollout(model, prompts, coeff, decoder=ReferenceDecoder, sampling=sampling, **kw)
    eos = ref.eos.tolist()
    got = rollout(model, prompts, coeff, decoder=GraphDecoder, sampling=sampling, **kw)
    same = torch.equal(got.tokens, ref.tokens)
    kl = (got.kl - ref.kl).abs().nan_to_num().max().item()
    print(f"{name}: same tokens {same}, max KL diff {kl:.2e}, rows ending at EOS {sum(eos)} of {len(eos)}")
