"""Question: which decoder families load from a local checkpoint, match `transformers`' logits,
and which decode path does each get on this device, how exactly?

For every family in `isokl_tl.models.checkpoints.FAMILIES` a small random-init checkpoint is made
offline, loaded with `load_model`, compared with `transformers`' own forward (float32), and
checked with `check_model` (decode path, and its max |logit difference| from TransformerLens's
forward on a steered sequence). Prints a Markdown table and writes it to
figures/coverage_<device>.md:

    python analyses/family_coverage.py [--device cuda]      # about a minute on 2 CPU cores
"""

import argparse
import tempfile
from pathlib import Path

import torch

from isokl_tl.model_check import check_model
from isokl_tl.models import load_model
from isokl_tl.models.checkpoints import FAMILIES, make_checkpoint


def row(family: str, root: Path, device: str) -> str:
    from transformers import AutoModelForCausalLM

    where = make_checkpoint(family, root / family)
    try:
        model = load_model(str(where), device=device)
    except ValueError as e:
        return f"| {family} | {FAMILIES[family][1]} | no: {e} | | | | |"
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).to(device).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        diff = float((model(tokens) - hf(tokens).logits).abs().max())
    c = check_model(str(where), device=device)
    return (f"| {family} | {c.architecture} | yes | {diff:.1e} | {c.decode_path} | {c.reason or ''} | "
            f"{c.parity_max_abs_logit_diff:.1e} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    lines = [f"| family | architecture | loads | max abs logit diff vs transformers | decode path ({a.device}) "
             "| why the reference path | decode path vs TL forward, steered |",
             "|---|---|---|---:|---|---|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            lines.append(row(family, Path(tmp), a.device))
            print(lines[-1], flush=True)
    out = Path(__file__).resolve().parent.parent / "figures" / f"coverage_{a.device.split(':')[0]}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"-> {out}")
