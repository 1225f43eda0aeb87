"""Question: how do the iso-KL dose, the KL curvature and the direction's quality vary with depth
in the embedded SmolLM2-135M-Instruct (mean_diff, casual-vs-formal pairs)?

Regenerates figures/layers.png and figures/layers.md:

    python analyses/layer_sweep.py            # about 3 minutes on 2 CPU cores
"""

from pathlib import Path

from click.testing import CliRunner

from isokl_tl.cli.main import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "figures"
    res = CliRunner().invoke(main, ["layers", "--layers", "0:30:5", "--out", str(out)])
    print(res.output)
    (out / "layers.csv").unlink(missing_ok=True)   # the figure and the Markdown table are what the README shows
