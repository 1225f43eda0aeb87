"""Checks shared by several test modules: the same rollouts as TransformerLens's own forward (every
fast decoder), and a run directory's result files (runs that must agree byte for byte)."""

import json
from pathlib import Path

import torch

from isokl_tl.engine import ReferenceDecoder
from isokl_tl.rollout import Rollouts, rollout


def same_as_reference(model, decoder, prompts, coeffs, *, atol: float = 1e-4, **kw) -> tuple[Rollouts, Rollouts]:
    """Roll out with `decoder` and with `ReferenceDecoder`; assert the same tokens, lengths and
    EOS flags, and per-token KL within `atol`. Returns (got, reference)."""
    got = rollout(model, prompts, coeffs, decoder=decoder, **kw)
    ref = rollout(model, prompts, coeffs, decoder=ReferenceDecoder, **kw)
    assert torch.equal(got.tokens, ref.tokens), (decoder, got.tokens, ref.tokens)
    assert torch.equal(got.gen_len, ref.gen_len) and torch.equal(got.eos, ref.eos)
    torch.testing.assert_close(got.kl, ref.kl, atol=atol, rtol=0, equal_nan=True)
    return got, ref


def result_files(run: Path) -> dict[str, bytes]:
    """Every result file of a run directory; the manifest (timings, command line) and the
    calibration's timings excluded."""
    out = {}
    for p in sorted(Path(run).iterdir()):
        if p.is_dir() or p.name == "manifest.json":
            continue
        data = p.read_bytes()
        if p.name == "calibration.json":
            cal = json.loads(data)
            for h in cal["history"]:
                del h["seconds"]
            data = json.dumps(cal, sort_keys=True).encode()
        out[p.name] = data
    return out
