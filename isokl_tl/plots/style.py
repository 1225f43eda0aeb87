"""The look every figure shares, applied inside a style context (no global setting changes),
and saving."""

import functools
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.ticker import FuncFormatter
from PIL import Image

from isokl_tl.manifest import write_atomic

ALIVE, DEAD = "#3b75af", "#d1495b"


def styled(f=None, *, fixed_titles: bool = False):
    """Draw inside the package's style (seaborn's whitegrid, paper context), leaving the caller's
    global settings as they were. With `fixed_titles`, every title sits at the top of its axes
    instead of being moved, at every draw, above what may lie there (labels on top, an axis'
    offset text such as "1e-7"): a quarter of a many-panel figure's drawing time. Only for figures
    whose axes have nothing there (log, symlog or bounded axes, no labels on top)."""
    if f is None:
        return functools.partial(styled, fixed_titles=fixed_titles)
    titles = {"axes.titley": 1.0} if fixed_titles else {}

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("paper"), plt.rc_context(titles):
            return f(*args, **kwargs)
    return wrapper


def _ax(ax: Axes | None, size=(5, 3.5)) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=size)[1]


def _symlog(ax: Axes, linthresh: float = 1e-2) -> None:
    """A symlog y axis with a labelled tick at 0 and at every power of ten from `linthresh` on."""
    ax.set_yscale("symlog", linthresh=linthresh)
    top = 10.0 ** math.ceil(math.log10(max(ax.get_ylim()[1], 10 * linthresh)))   # a power of ten above the data
    ticks = [0.0] + [10.0 ** k for k in range(int(math.floor(math.log10(linthresh))),
                                              int(math.log10(top)) + 1)]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_locator(plt.NullLocator())
    ax.set_ylim(-0.3 * linthresh, top)              # no empty band of negative values below 0


def _plain_log_ticks(ax: Axes) -> None:
    """Log axes labelled 20, 50, 100 rather than 2 x 10^1."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


_JOBS: list = []        # the figures `save_figures` hands to its forked workers (read after the fork)


def _child() -> None:
    """A forked figure worker: default signal handlers (a parent under a job scheduler may ignore
    SIGTERM, which the pool uses to stop its workers), one thread."""
    import signal

    import torch

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    torch.set_num_threads(1)          # a forked worker does not share the parent's thread pool


def _draw(i: int) -> None:
    draw, path = _JOBS[i]
    save_figure(draw(), path)


def save_figures(jobs: list[tuple[Callable[[], object], Path]], meanwhile: Callable[[], None] | None = None) -> None:
    """Draw and save figures, `jobs` = [(function returning the axes, path), ...], each in a
    process of its own forked from this one (so they share the data already in memory and
    matplotlib, fonts included, already loaded) where the platform forks safely (Linux), one by
    one elsewhere or for a single figure; `meanwhile()` runs here while the workers draw. A
    worker's error is raised here. Put the slowest figures first: workers take them in order."""
    import multiprocessing as mp
    import sys

    if len(jobs) < 2 or not sys.platform.startswith("linux"):
        for draw, path in jobs:
            save_figure(draw(), path)
        if meanwhile is not None:
            meanwhile()
        return
    global _JOBS
    _JOBS = jobs
    pool = mp.get_context("fork").Pool(min(len(jobs), max(1, len(os.sched_getaffinity(0)))), initializer=_child)
    try:
        drawn = pool.map_async(_draw, range(len(jobs)), chunksize=1)
        if meanwhile is not None:
            meanwhile()
        drawn.get()
        pool.close()                  # the workers finish and exit
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        _JOBS = []


DPI = 130


def save_figure(ax_or_axes, path) -> None:
    """Lay the figure out (`tight_layout`, which makes room for every axes' labels and legends),
    draw it once and write that image as a PNG; a figure with something outside its edges (a
    key or note of the whole figure, a label too long for the room) is drawn again, cropped to
    everything drawn (`bbox_inches="tight"`). Working out where everything goes costs nearly as
    much as drawing, so a figure that fits is neither measured nor drawn twice."""
    fig = (ax_or_axes.flat[0] if isinstance(ax_or_axes, np.ndarray) else ax_or_axes).get_figure(root=True)
    fig.set_dpi(DPI)
    if not fig.subfigs:                 # figures of subfigures are laid out by their own rows
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tight layout not applied")   # then it is cropped
            fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    drawn, room = fig.get_tightbbox(canvas.get_renderer()), fig.bbox_inches.padded(0.5 / DPI)   # half a pixel
    if room.x0 <= drawn.x0 and room.y0 <= drawn.y0 and drawn.x1 <= room.x1 and drawn.y1 <= room.y1:
        image = Image.fromarray(np.asarray(canvas.buffer_rgba()))
        write_atomic(Path(path), lambda p: image.save(p, format="png", dpi=(DPI, DPI)))
    else:
        write_atomic(Path(path), lambda p: fig.savefig(p, format="png", dpi=DPI, bbox_inches="tight",
                                                       metadata={"Software": None}))
    plt.close(fig)
