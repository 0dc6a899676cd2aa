"""PNG plots of a scaling-law fit: loss against N, the steps-tokens hyperbolas, B_crit against L, and the curves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
import numpy as np  # noqa: E402

from lab.methods.scaling_law import laws  # noqa: E402

if TYPE_CHECKING:
    from lab.methods.scaling_law.fit import FitResult

log = logging.getLogger(__name__)

HELD_OUT_COLOR = "tab:red"


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_loss_vs_params(result: FitResult, path: Path) -> Path:
    """Converged-loss estimate and final loss of each ladder run against N, with the fitted L(N) (log-log)."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    held_out_paths = {run.path for run in result.held_out.runs} if result.held_out else set()
    ladder = result.ladder
    n_params = np.array([run.n_params for run in ladder], dtype=float)
    grid = np.geomspace(n_params.min() / 2, n_params.max() * 2, 100)
    constants = result.constants

    fitted = [run for run in ladder if run.path not in held_out_paths]
    axes.scatter([r.n_params for r in fitted], [r.converged_loss for r in fitted], color="tab:blue", zorder=3,
                 label="converged-loss estimates that step 2 fits")
    axes.scatter([r.n_params for r in fitted], [r.final_loss for r in fitted], color="tab:blue", marker="x",
                 zorder=3, label="final val loss")
    axes.plot(grid, laws.loss_from_params(grid, constants["N_c"].value, constants["alpha_N"].value), color="tab:blue",
              label=f"fit on all sizes: alpha_N={constants['alpha_N'].value:.4f}, N_c={constants['N_c'].value:.3g}")
    if result.held_out:
        held_out = result.held_out
        held_out_losses = [run.final_loss for run in held_out.runs]
        axes.scatter([run.n_params for run in held_out.runs], held_out_losses, color=HELD_OUT_COLOR, marker="*",
                     s=160, zorder=4, label=f"held-out N={held_out.n_params:.3g} (final val loss)")
        without = laws.loss_from_params(grid, held_out.constants["N_c"].value, held_out.constants["alpha_N"].value)
        axes.plot(grid, without, color=HELD_OUT_COLOR, linestyle="--", label="fit without it")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("non-embedding parameters N")
    axes.set_ylabel("loss")
    axes.set_title("L(N) = (N_c / N)^alpha_N")
    axes.legend(fontsize=8)
    return save(figure, path)


def plot_hyperbolas(result: FitResult, path: Path) -> Path:
    """Steps against tokens needed to reach each target loss, one hyperbola per loss (log-log)."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(result.hyperbolas)))
    for hyperbola, color in zip(result.hyperbolas, colors):
        batch = np.geomspace(hyperbola.batch_tokens.min() / 10, hyperbola.batch_tokens.max() * 10, 200)
        steps, tokens = laws.steps_on_hyperbola(batch, hyperbola.s_min.value, hyperbola.e_min.value)
        axes.plot(tokens, steps, color=color, label=f"L={hyperbola.loss:.3f}")
        axes.scatter(hyperbola.tokens, hyperbola.steps, color=color, s=18, zorder=3)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("tokens processed E")
    axes.set_ylabel("optimizer steps S")
    axes.set_title("(S / S_min - 1)(E / E_min - 1) = 1 per target loss")
    axes.legend(fontsize=7, ncol=2)
    return save(figure, path)


def plot_critical_batch(result: FitResult, path: Path) -> Path:
    """B_crit(L) from each hyperbola with its standard error, the fitted law and Kaplan et al. 2020's law."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    losses = np.array([h.loss for h in result.hyperbolas])
    b_crit = np.array([h.b_crit.value for h in result.hyperbolas])
    errors = np.nan_to_num(np.array([h.b_crit.stderr for h in result.hyperbolas]))
    axes.errorbar(losses, b_crit, yerr=errors, fmt="o", color="tab:blue", label="E_min / S_min per target loss")
    grid = np.geomspace(losses.min() * 0.95, losses.max() * 1.05, 100)
    if "alpha_B" in result.constants:
        alpha_b, b_star = result.constants["alpha_B"].value, result.constants["B_star"].value
        axes.plot(grid, laws.critical_batch(grid, b_star, alpha_b), color="tab:blue",
                  label=f"fit: B*={b_star:.3g}, alpha_B={alpha_b:.3f}")
    kaplan = laws.KAPLAN_2020
    axes.plot(grid, laws.critical_batch(grid, kaplan["B_star"], kaplan["alpha_B"]), color="gray", linestyle=":",
              label="Kaplan et al. 2020")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("loss L")
    axes.set_ylabel("critical batch size B_crit (tokens)")
    axes.set_title("B_crit(L) = B* / L^(1 / alpha_B)")
    axes.legend(fontsize=8)
    return save(figure, path)


def plot_loss_curves(result: FitResult, path: Path) -> Path:
    """Measured validation curves of the ladder against the predicted ones; the held-out model in red."""
    figure, axes = plt.subplots(figsize=(7, 5))
    constants = result.constants
    held_out_paths = {run.path for run in result.held_out.runs} if result.held_out else set()
    colors = plt.cm.Blues(np.linspace(0.4, 0.9, len(result.ladder)))
    for run, color in zip(sorted(result.ladder, key=lambda r: r.n_params), colors):
        if run.path in held_out_paths:
            continue
        steps, _, loss = run.after_warmup()
        axes.plot(steps, loss, color=color, linewidth=1, label=f"N={run.n_params:.3g} measured")
        predicted = laws.predict_loss_curve(
            run.n_params, steps, run.batch_tokens, n_c=constants["N_c"].value, alpha_n=constants["alpha_N"].value,
            s_c=constants["S_c"].value, alpha_s=constants["alpha_S"].value, **(result.batch_law or {}),
        )
        axes.plot(steps, predicted, color=color, linestyle="--", linewidth=1)
    if result.held_out:
        for curve in result.held_out.curves:
            axes.plot(curve["steps"], curve["measured"], color="black", linewidth=2,
                      label=f"held-out N={result.held_out.n_params:.3g} measured")
            axes.plot(curve["steps"], curve["predicted"], color=HELD_OUT_COLOR, linewidth=2, linestyle="--",
                      label=f"held-out predicted (MAPE {curve['mape_percent']:.2f}%)")
    axes.set_xscale("log")
    axes.set_xlabel("optimizer steps S (after warm-up)")
    axes.set_ylabel("validation loss")
    axes.set_title("measured (solid) and predicted (dashed) loss curves")
    axes.legend(fontsize=7)
    return save(figure, path)


def write_plots(result: FitResult, out_dir: Path) -> list[Path]:
    """Write the PNGs into out_dir; the two batch-sweep plots only when step 3 fitted any hyperbola."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_loss_vs_params(result, out_dir / "loss_vs_params.png")]
    if result.hyperbolas:
        written.append(plot_hyperbolas(result, out_dir / "batch_hyperbolas.png"))
        written.append(plot_critical_batch(result, out_dir / "critical_batch.png"))
    else:
        log.warning("no steps-tokens hyperbolas were fitted, so batch_hyperbolas.png and critical_batch.png "
                    "are not written")
    written.append(plot_loss_curves(result, out_dir / "loss_curves.png"))
    return written
