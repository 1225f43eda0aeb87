"""Question: how do the iso-KL dose, the KL curvature, the direction's quality, the propagation of
the perturbation through later layers, and directional ablation at the same KL budget vary with
depth in the embedded SmolLM2-135M-Instruct (mean_diff, casual-vs-formal pairs)?

Regenerates figures/layers.png and figures/layers.md:

    python analyses/layer_sweep.py            # about 5 minutes on 2 CPU cores
"""

from pathlib import Path

from isokl_tl.layers import study_layers

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "figures"
    study = study_layers(None, out, layer_spec="0:30:5")
    print(study.to_markdown())
    for name in ("layers.csv", "layers_propagation.csv"):   # the README shows the figure and table
        (out / name).unlink(missing_ok=True)
