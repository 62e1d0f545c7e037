"""Analysis of a run store: verdicts and tables (pandas, scipy), figures (matplotlib,
imported only when a figure is drawn) and the suite report."""

from loopdiag.analysis.analyzer import explain, run_verdict
from loopdiag.analysis.plots import (
    plot_loop_residuals,
    plot_loop_scaling,
    plot_loss_curves,
    plot_lr_sensitivity,
    plot_oscillation_vs_loops,
    plot_stability_map,
    save_figure,
)
from loopdiag.analysis.report import write_report
from loopdiag.analysis.tables import (
    Comparison,
    compare,
    compare_tables,
    run_table,
    stability_summary,
    stable_lr_range,
    suite_table,
    with_cells,
)

__all__ = [
    "Comparison",
    "compare",
    "compare_tables",
    "explain",
    "plot_loop_residuals",
    "plot_loop_scaling",
    "plot_loss_curves",
    "plot_lr_sensitivity",
    "plot_oscillation_vs_loops",
    "plot_stability_map",
    "run_table",
    "run_verdict",
    "save_figure",
    "stability_summary",
    "stable_lr_range",
    "suite_table",
    "with_cells",
    "write_report",
]
