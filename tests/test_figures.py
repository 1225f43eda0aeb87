"""Figure plumbing that can go wrong without an error: quantile bands, and what a saved figure keeps."""

import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from PIL import Image  # noqa: E402

from isokl_tl.plots import save_figure  # noqa: E402
from isokl_tl.plots.quantiles import nan_quantiles  # noqa: E402

QS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]


@pytest.mark.parametrize("seed", range(40))
def test_nan_quantiles_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 12)), int(rng.integers(1, 30))
    x = rng.standard_exponential((n, m)) * 10.0 ** int(rng.integers(-3, 3))
    x[rng.random((n, m)) < rng.random()] = np.nan          # rollouts that ended early
    x[:, 0] = np.nan if seed % 3 == 0 else x[:, 0]           # a column past every rollout's end
    if seed % 5 == 0:
        x[:, -1] = 0.0                                         # ties
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanquantile(x, QS, axis=0)
    np.testing.assert_allclose(nan_quantiles(x, QS), ref, rtol=1e-12, atol=0, equal_nan=True)


def test_nan_quantiles_of_no_rows_are_nan():
    assert np.isnan(nan_quantiles(np.empty((0, 3)), QS)).all()


def _size(path):
    with Image.open(path) as im:
        return im.size


def test_save_figure_lays_a_legend_outside_the_axes_into_the_image(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1], label="alpha 1")
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(ax, tmp_path / "a.png")
    inside = fig.bbox
    box = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 + 0.5         # laid out, not cut off
    assert _size(tmp_path / "a.png") == (round(4 * 130), round(3 * 130))


def test_save_figure_crops_to_a_legend_too_wide_to_lay_out(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1], label="a legend entry far too long to fit beside these axes")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(ax, tmp_path / "a.png")
    assert _size(tmp_path / "a.png")[0] > 4 * 130                    # widened to what was drawn


def test_save_figure_crops_to_a_text_of_the_whole_figure(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    fig.text(0.5, -0.05, "a note below the axes", ha="center", va="top")
    save_figure(ax, tmp_path / "b.png")
    w, h = _size(tmp_path / "b.png")
    assert h > 3 * 130 - 60 and (w, h) != (round(4 * 130), round(3 * 130))   # cropped to what was drawn
