"""Loss curves as a picture: one PNG per training run, next to its sample sheets, so that DVC shows it as an image
(its own charts load their library from a CDN and stay blank offline) and MLflow logs it with the run."""

from __future__ import annotations

import io


def loss_curves(history: list[dict], names: tuple[str, ...], title: str) -> bytes:
    """The smoothed losses of `history` (the rows the CSV holds) against the step, one panel per loss, as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    from matplotlib.figure import Figure

    present = [name for name in names if any(name in row for row in history)]
    width, height = 2.6 * max(1, len(present)), 2.4
    figure = Figure(figsize=(width, height), dpi=100)
    # Margins fixed in inches: constrained layout measures every label first, and each checkpoint redraws this.
    margins = {"left": 0.6 / width, "right": 1 - 0.1 / width, "bottom": 0.45 / height, "top": 1 - 0.55 / height}
    figure.subplots_adjust(**margins, wspace=0.35)
    for index, name in enumerate(present):
        axis = figure.add_subplot(1, len(present), index + 1)
        rows = [row for row in history if name in row]
        axis.plot([row["step"] for row in rows], [row[name] for row in rows], linewidth=1.2)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
