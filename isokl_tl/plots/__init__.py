"""Figures. Each `plot_x(data, *, ax=None) -> Axes` draws into `ax` (or a new one); families of
panels (`plot_spaghetti`, `plot_aggregate`, `plot_dose_response`, `plot_methods`, `plot_methods_dose_response`,
`plot_layers`)
take a figure-level `fig` instead and return their axes. Saving is the caller's business
(`save_figure`). Importing this package changes no global matplotlib or seaborn setting: every
function draws inside its own style context (`style.styled`).

`cell`: one run's calibration and KL figures; `survival`: its survival figures; `studies`: figures
that compare methods or layers.
"""

from isokl_tl.plots.cell import plot_aggregate, plot_calibration, plot_kl_bands, plot_spaghetti
from isokl_tl.plots.studies import plot_layers, plot_methods, plot_methods_dose_response, plot_study, plot_study_facets
from isokl_tl.plots.style import save_figure
from isokl_tl.plots.survival import plot_dose_response, plot_survival, plot_threshold_sweep

__all__ = ["plot_aggregate", "plot_calibration", "plot_dose_response", "plot_kl_bands", "plot_layers",
           "plot_methods", "plot_methods_dose_response", "plot_spaghetti", "plot_study", "plot_study_facets", "plot_survival", "plot_threshold_sweep", "save_figure"]
