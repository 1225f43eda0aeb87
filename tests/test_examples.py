"""The README's Python examples and the quickstart notebook run as written (the notebook on small
settings, through the environment variables its first cell reads)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_python() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(readme_python()) >= 1


@pytest.mark.slow
def test_the_readme_python_examples_run_as_written(tmp_path):
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(readme_python()))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_the_quickstart_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    small = {"QUICKSTART_N_CALIB": "4", "QUICKSTART_CALIB_WINDOW": "16", "QUICKSTART_N_PROMPTS": "4",
             "QUICKSTART_WINDOW": "24"}
    old = {k: os.environ.get(k) for k in (*small, "MPLBACKEND")}
    os.environ.update(small, MPLBACKEND="module://matplotlib_inline.backend_inline")
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)       # the figure, inline
    assert any("c* = " in o.get("text", "") for o in outputs)
