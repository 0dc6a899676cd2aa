"""Fit the Kaplan-form scaling laws to small-model runs and check them on a held-out larger model.

    python -m lab.methods.scaling_law.fit SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--holdout-largest | --no-holdout]
        [--no-refine] [--warmup-steps STEPS]

The method follows Su et al. 2024, "Unraveling the Mystery of Scaling Laws: Part I" (arXiv:2403.06563): the
laws of Kaplan et al. 2020 hold, but their constants depend on the setup (tokenizer, data, context length,
optimizer, schedule), so every constant is estimated again from small models of one setup:

1. Read the runs of every sweep or run directory given. Runs that did not finish are skipped with a warning,
   and runs of different setups (different `setup_hash`) are rejected.
2. alpha_N, N_c: a line through log(converged loss) against log(N) of the ladder runs (role "ladder"), where a
   run's converged loss starts as its final loss and is refined in step 4.
3. B*, alpha_B: from the batch-size sweep (role "batch", one N, several B). For several target losses L, the
   steps S and tokens E each run needed to first reach L on its smoothed curve give S_min(L) and E_min(L) by a
   fit of the hyperbola (S / S_min - 1)(E / E_min - 1) = 1, then B_crit(L) = E_min / S_min, then a line
   through log B_crit(L) against log L gives B_crit(L) = B* / L^(1 / alpha_B).
4. alpha_S, S_c: the ladder curves after warm-up, with S converted to S_min = S / (1 + B_crit(L) / B), fitted to
   L = (N_c / N)^alpha_N + (S_c / S_min)^alpha_S with alpha_N and N_c from step 2. A run that has not fully
   converged ends above its converged loss, so by default steps 2 and 4 alternate until the estimates settle.
   In each round, a run's converged loss becomes its loss minus the fitted steps term, averaged over the tail
   of its curve (fit_ladder). The option --no-refine keeps the final losses.
5. Standard errors of every constant come from the least-squares covariance (see UNCERTAINTY below).
6. With three or more ladder sizes, steps 2 and 4 are repeated without the largest N, and the result predicts
   that model's converged loss and whole validation curve, which are compared with its measured run.

Warm-up: points at or before a run's warm-up step are left out of steps 3 and 4. That step comes from
--warmup-steps, else from a numeric key containing "warmup" in setup.schedule, else it is the first 5% of the
logged steps (warmup_end). Without a batch sweep, step 3 is skipped with a warning and step 4 uses S_min = S.

The result is written to fit.json and four PNG plots (lab.methods.scaling_law.plots) in --out.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit

from lab.core.errors import ConfigError
from lab.methods.scaling_law import laws

# Named explicitly so that `python -m` logs under the module name too.
log = logging.getLogger("lab.methods.scaling_law.fit")

UNCERTAINTY = (
    "standard errors from the covariance of each least-squares fit: alpha_N and N_c from the log-log line through "
    "the ladder's converged losses, alpha_B and B* from the log-log line through B_crit(L), alpha_S and S_c from the "
    "nonlinear fit of the ladder curves; N_c, B* and S_c are fitted as logarithms and converted by the delta "
    "method. Points of one training curve are correlated, and neither B_crit(L) in step 4 nor the refined "
    "converged losses in step 2 carry their own errors into the next fit, so all errors are lower bounds."
)
KAPLAN_SOURCE = "Kaplan et al. 2020, Scaling Laws for Neural Language Models, arXiv:2001.08361"

# A job's role when results.json has no scaling.role, keyed by its task_name.
ROLE_BY_TASK = {"scaling_law": "ladder", "scaling_law_batch": "batch"}
# Without a warm-up key in setup.schedule, this fraction of each run's steps counts as warm-up.
DEFAULT_WARMUP_FRACTION = 0.05
# Step 3 smooths the batch-sweep curves with a centred moving average of at most SMOOTHING_WINDOW points.
# A neighbour joins a point's average only if its step is within SMOOTHING_SPAN (a fraction) of the point's step.
SMOOTHING_WINDOW = 5
SMOOTHING_SPAN = 0.1
# Target losses at which step 3 fits one steps-tokens hyperbola each.
TARGET_LOSS_COUNT = 8
# A run needs at least this many logged losses after warm-up to take part.
MIN_POINTS_AFTER_WARMUP = 3
# The refinement of the converged losses (fit_ladder) stops when no estimate moves by more than REFINE_TOLERANCE
# (relative), or after MAX_REFINE_ROUNDS rounds.
REFINE_TOLERANCE = 1e-6
MAX_REFINE_ROUNDS = 50
# Fraction of each ladder curve, at its end, over which the converged loss is estimated (see converged_estimates).
TAIL_FRACTION = 0.2
# A ladder run whose fitted steps term at its last step exceeds this fraction of its final loss was still
# improving, so its converged loss in step 2 rests on the fitted steps term.
CONVERGED_TOLERANCE = 0.01


@dataclass
class Estimate:
    """A fitted constant and its standard error (NaN when the fit has no residual degrees of freedom)."""

    value: float
    stderr: float = math.nan


@dataclass
class Run:
    """One finished run: its scaling record from results.json and its validation curve from csv/metrics.csv."""

    path: Path
    role: str  # "ladder" or "batch"
    n_params: int  # non-embedding parameters
    batch_tokens: int
    final_loss: float
    setup: dict
    setup_hash: str
    steps: np.ndarray  # optimizer steps of the logged losses
    tokens: np.ndarray  # tokens seen at those steps
    loss: np.ndarray  # validation loss, or training loss when the run logged no validation
    loss_column: str
    warmup_steps: int = 0
    warmup_rule: str = ""
    converged_loss: float = math.nan  # ladder runs: the estimate that step 2 fits (see fit_ladder)

    def after_warmup(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = self.steps > self.warmup_steps
        return self.steps[keep], self.tokens[keep], self.loss[keep]


@dataclass
class Hyperbola:
    """Step 3 at one target loss: the steps and tokens each batch size needed, and the fitted S_min, E_min."""

    loss: float
    n_params: int
    batch_tokens: np.ndarray
    steps: np.ndarray
    tokens: np.ndarray
    s_min: Estimate
    e_min: Estimate
    b_crit: Estimate


@dataclass
class HeldOut:
    """Step 6: constants fitted without the largest ladder model, and how well they predict it."""

    n_params: int
    runs: list[Run]
    constants: dict[str, Estimate]
    predicted_converged_loss: float
    measured_final_loss: float
    curves: list[dict]  # per held-out run: steps, measured and predicted loss after warm-up, MAPE

    @property
    def relative_error(self) -> float:
        return (self.predicted_converged_loss - self.measured_final_loss) / self.measured_final_loss

    @property
    def curve_mape(self) -> float:
        return float(np.mean([curve["mape_percent"] for curve in self.curves]))


@dataclass
class FitResult:
    """Everything fit.json and the plots report."""

    constants: dict[str, Estimate]
    runs: list[Run]
    skipped: list[tuple[Path, str]]
    setup: dict
    setup_hash: str
    hyperbolas: list[Hyperbola] = field(default_factory=list)
    batch_law_used: bool = False
    refined: bool = True
    held_out: HeldOut | None = None
    held_out_skipped: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def ladder(self) -> list[Run]:
        return [run for run in self.runs if run.role == "ladder"]

    @property
    def batch_law(self) -> dict[str, float] | None:
        """B* and alpha_B when step 4 used them, else None (S_min = S)."""
        if not self.batch_law_used:
            return None
        return {"b_star": self.constants["B_star"].value, "alpha_b": self.constants["alpha_B"].value}


class SkippedRun(Exception):
    """A run directory that cannot take part in the fit; the message is the reason."""


def warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


# ---------------------------------------------------------------------------------------------------------------
# Step 1: reading runs
# ---------------------------------------------------------------------------------------------------------------


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Expand sweep directories into their job directories (0/, 1/, ...); keep run directories as they are."""
    run_dirs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(
                f"{path} is not a directory; pass a sweep directory (logs/<task_name>/multiruns/<time>/) "
                "or a run directory that contains status.json."
            )
        if (path / "status.json").exists() or (path / "results.json").exists():
            run_dirs.append(path)
            continue
        jobs = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if not jobs:
            raise ConfigError(
                f"{path} contains neither status.json nor job directories named 0, 1, ...; pass a sweep "
                "directory (logs/<task_name>/multiruns/<time>/) or a run directory."
            )
        run_dirs.extend(jobs)
    unique = {run_dir.resolve(): run_dir for run_dir in run_dirs}
    return list(unique.values())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SkippedRun(f"{path.name} is not valid JSON ({err})") from err


def read_loss_curve(csv_path: Path, batch_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Read steps, tokens and loss from a Lightning CSV log; `tokens` and `train/loss` may be missing.

    Rows without a value in the loss column are skipped. When a step appears twice (a resumed run), the later
    row wins. Validation loss is used when the log has any, else training loss. A NaN or infinite loss skips
    the whole run.
    """
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        columns = reader.fieldnames or []
    if "step" not in columns:
        raise SkippedRun(f"{csv_path} has no 'step' column")

    for column in ("val/loss", "train/loss"):
        by_step: dict[int, tuple[float, float]] = {}
        for line_number, row in enumerate(rows, start=2):
            value = row.get(column) or ""
            if not value.strip():
                continue
            try:
                step = int(float(row["step"]))
                tokens = row.get("tokens") or ""
                by_step[step] = (float(tokens) if tokens.strip() else float(step * batch_tokens), float(value))
            except ValueError as err:
                raise SkippedRun(f"{csv_path} line {line_number} has an invalid number ({err})") from err
            if not math.isfinite(by_step[step][1]):
                raise SkippedRun(f"{csv_path} line {line_number}: {column} is {value} (the run diverged)")
        if by_step:
            steps = np.array(sorted(by_step), dtype=float)
            tokens_seen = np.array([by_step[int(s)][0] for s in steps])
            loss = np.array([by_step[int(s)][1] for s in steps])
            return steps, tokens_seen, loss, column
    raise SkippedRun(f"{csv_path} has no values in 'val/loss' or 'train/loss'")


def read_run(path: Path) -> Run:
    """Read one run directory; raise SkippedRun with the reason when it cannot be used."""
    status_file = path / "status.json"
    if not status_file.is_file():
        raise SkippedRun("no status.json (the job never started, or this is not a run directory)")
    status_record = read_json(status_file)
    status = status_record.get("status", "unknown")
    if status != "finished":
        reason = f"status {status}"
        error_lines = str(status_record.get("error") or "").strip().splitlines()
        if error_lines:  # the last line of a traceback names the exception
            reason += f" ({error_lines[-1].strip()})"
        raise SkippedRun(reason)
    if not (path / "results.json").is_file():
        raise SkippedRun("status finished but results.json is missing")
    results = read_json(path / "results.json")
    scaling = results.get("scaling")
    if not isinstance(scaling, dict):
        raise SkippedRun("results.json has no 'scaling' section, so it is not a scaling-law run")
    for key in ("n_params", "batch_tokens"):
        if scaling.get(key) is None:
            raise SkippedRun(f"results.json has no scaling.{key}")
    role = scaling.get("role") or ROLE_BY_TASK.get(results.get("task_name"), "ladder")
    if role not in ("ladder", "batch"):
        raise SkippedRun(f"scaling.role is {role!r}, expected 'ladder' or 'batch'")
    csv_path = path / "csv" / "metrics.csv"
    if not csv_path.is_file():
        raise SkippedRun("csv/metrics.csv is missing")

    batch_tokens = int(scaling["batch_tokens"])
    steps, tokens, loss, column = read_loss_curve(csv_path, batch_tokens)
    final_loss = (results.get("metrics") or {}).get("loss")
    setup = scaling.get("setup") or {}
    setup_hash = scaling.get("setup_hash") or hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()
    return Run(
        path=path, role=role, n_params=int(scaling["n_params"]), batch_tokens=batch_tokens,
        final_loss=float(final_loss if final_loss is not None else loss[-1]),
        setup=setup, setup_hash=setup_hash, steps=steps, tokens=tokens, loss=loss, loss_column=column,
    )


def read_runs(paths: list[str | Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    runs, skipped = [], []
    for run_dir in find_run_dirs(paths):
        try:
            runs.append(read_run(run_dir))
        except SkippedRun as reason:
            log.warning("skipping run %s: %s", run_dir, reason)
            skipped.append((run_dir, str(reason)))
    return runs, skipped


def flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_one_setup(runs: list[Run]) -> None:
    """Raise ConfigError when the runs were trained with different setups: their constants are not comparable."""
    reference = runs[0]
    for run in runs[1:]:
        if run.setup_hash == reference.setup_hash:
            continue
        first, second = flatten(reference.setup), flatten(run.setup)
        differing = sorted(key for key in first.keys() | second.keys() if first.get(key) != second.get(key))
        detail = ", ".join(f"{key}: {first.get(key)!r} vs {second.get(key)!r}" for key in differing)
        raise ConfigError(
            f"runs {reference.path} and {run.path} have different setups "
            f"(setup_hash {reference.setup_hash[:12]} vs {run.setup_hash[:12]}; differing setup keys: "
            f"{detail or 'none in the stored setup'}). Scaling-law constants depend on the setup, so fit each "
            "setup separately: pass only the sweep directories of one setup."
        )


def warmup_end(run: Run, override: int | None) -> tuple[int, str]:
    """Return the last warm-up step of a run and the rule that decided it.

    The first rule that applies wins: --warmup-steps, then a numeric key containing "warmup" in setup.schedule,
    then DEFAULT_WARMUP_FRACTION of the last logged step. A schedule value below 1 is a fraction of the run's
    steps, which come from schedule.max_steps or else the last logged step.
    """
    if override is not None:
        return int(override), "--warmup-steps"
    schedule = run.setup.get("schedule") or {}
    total = schedule.get("max_steps") or schedule.get("total_steps") or float(run.steps[-1])
    for key, value in schedule.items():
        if "warmup" in key.lower() and isinstance(value, (int, float)) and not isinstance(value, bool):
            if 0 < value < 1:
                return int(value * total), f"setup.schedule.{key} x total steps"
            return int(value), f"setup.schedule.{key}"
    return int(DEFAULT_WARMUP_FRACTION * float(run.steps[-1])), (
        f"no warm-up key in setup.schedule: the first {DEFAULT_WARMUP_FRACTION:.0%} of the logged steps"
    )


# ---------------------------------------------------------------------------------------------------------------
# Step 2: alpha_N and N_c
# ---------------------------------------------------------------------------------------------------------------


def linear_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit y = intercept + slope * x by weighted least squares; return [intercept, slope] and its covariance.

    The covariance is scaled by the residual variance, so it is NaN with only two points.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    weights = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    design = np.column_stack([np.ones_like(x), x])
    normal = (design.T * weights) @ design
    coef = np.linalg.solve(normal, (design.T * weights) @ y)
    dof = len(x) - 2
    if dof <= 0:
        return coef, np.full((2, 2), np.nan)
    residual_variance = float(np.sum(weights * (y - design @ coef) ** 2) / dof)
    return coef, residual_variance * np.linalg.inv(normal)


def fit_params_law(n_params: np.ndarray, losses: np.ndarray) -> dict[str, Estimate]:
    """Fit log L = alpha_N log N_c - alpha_N log N to converged losses; return alpha_N and N_c."""
    (intercept, slope), cov = linear_fit(np.log(n_params), np.log(losses))
    alpha_n = -slope
    log_n_c = intercept / alpha_n
    # log N_c = -intercept / slope: gradient with respect to (intercept, slope).
    gradient = np.array([1.0 / alpha_n, intercept / alpha_n**2])
    log_n_c_stderr = math.sqrt(gradient @ cov @ gradient) if np.all(np.isfinite(cov)) else math.nan
    n_c = math.exp(log_n_c)
    return {
        "alpha_N": Estimate(alpha_n, math.sqrt(cov[1, 1])),
        "N_c": Estimate(n_c, n_c * log_n_c_stderr),
    }


# ---------------------------------------------------------------------------------------------------------------
# Step 3: B_crit(L) from the batch-size sweep
# ---------------------------------------------------------------------------------------------------------------


def smooth_curve(steps: np.ndarray, loss: np.ndarray, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    """Return a centred moving average made monotone by a running minimum.

    Each point averages the same number of neighbours on both sides: at most window // 2, and only those within
    SMOOTHING_SPAN of its step. So the window shrinks at the ends and early on, where the points are sparse
    relative to the step and the curve bends fast, because a one-sided or wide window would shift a curved loss.
    The running minimum makes "the first step at which the curve reaches L" well defined on a noisy curve.
    """
    index = np.arange(len(loss))
    low = np.searchsorted(steps, steps * (1 - SMOOTHING_SPAN), side="left")
    high = np.searchsorted(steps, steps * (1 + SMOOTHING_SPAN), side="right") - 1
    half = np.minimum.reduce([np.full(len(loss), window // 2), index - low, high - index, len(loss) - 1 - index])
    cumulative = np.concatenate([[0.0], np.cumsum(loss)])
    mean = (cumulative[index + half + 1] - cumulative[index - half]) / (2 * half + 1)
    return np.minimum.accumulate(mean)


def first_crossing(steps: np.ndarray, tokens: np.ndarray, smoothed: np.ndarray, target: float) -> tuple[float, float]:
    """Return the steps and tokens at which a falling curve first reaches `target`, interpolated in log steps.

    NaN when the curve never reaches it or starts below it (the crossing is not resolved).
    """
    below = np.flatnonzero(smoothed <= target)
    if below.size == 0 or below[0] == 0:
        return math.nan, math.nan
    i = below[0]
    fraction = (smoothed[i - 1] - target) / (smoothed[i - 1] - smoothed[i])
    log_steps = np.log(steps[i - 1]) + fraction * (np.log(steps[i]) - np.log(steps[i - 1]))
    log_tokens = np.log(tokens[i - 1]) + fraction * (np.log(tokens[i]) - np.log(tokens[i - 1]))
    return float(np.exp(log_steps)), float(np.exp(log_tokens))


def choose_target_losses(smoothed_curves: list[np.ndarray], count: int = TARGET_LOSS_COUNT) -> np.ndarray:
    """Return `count` losses, evenly spaced in log, that every smoothed curve crosses before its end.

    Each crossing also lies after the curve's first SMOOTHING_WINDOW points, where the points are sparse
    relative to the step and interpolating between them is coarse.
    """
    usable = [curve for curve in smoothed_curves if len(curve) > SMOOTHING_WINDOW + 1]
    if len(usable) < 2:
        return np.array([])
    upper = min(curve[SMOOTHING_WINDOW] for curve in usable)
    lower = max(curve[-1] for curve in usable)
    if not upper > lower:
        return np.array([])
    log_low, log_high = math.log(lower), math.log(upper)
    margin = 0.05 * (log_high - log_low)
    return np.exp(np.linspace(log_low + margin, log_high - margin, count))


def fit_hyperbola(batch_tokens: np.ndarray, steps: np.ndarray) -> tuple[Estimate, Estimate, Estimate] | None:
    """Fit S_min and E_min of (S / S_min - 1)(E / E_min - 1) = 1 to the steps each batch size needed.

    With E = B * S the hyperbola is S = S_min + E_min / B, a line in 1 / B; residuals are weighted by 1 / S so
    each run counts by its relative error. Returns S_min, E_min and B_crit = E_min / S_min, or None when the fit
    gives a non-positive S_min or E_min (the batch sizes do not bracket B_crit).
    """
    (s_min, e_min), cov = linear_fit(1.0 / batch_tokens, steps, weights=1.0 / steps**2)
    if s_min <= 0 or e_min <= 0:
        return None
    log_b_crit_variance = cov[0, 0] / s_min**2 + cov[1, 1] / e_min**2 - 2 * cov[0, 1] / (s_min * e_min)
    b_crit = e_min / s_min
    return (
        Estimate(s_min, math.sqrt(cov[0, 0])),
        Estimate(e_min, math.sqrt(cov[1, 1])),
        Estimate(b_crit, b_crit * math.sqrt(max(log_b_crit_variance, 0.0))),
    )


def fit_hyperbolas(batch_runs: list[Run], warnings: list[str]) -> list[Hyperbola]:
    """Fit one steps-tokens hyperbola per target loss and per model size of the batch-size sweep."""
    hyperbolas = []
    for n_params in sorted({run.n_params for run in batch_runs}):
        group = [run for run in batch_runs if run.n_params == n_params]
        if len({run.batch_tokens for run in group}) < 2:
            warn(warnings, f"batch sweep at N={n_params} has only one batch size ({group[0].batch_tokens} tokens); "
                           "a hyperbola needs two or more, three or more for its standard errors")
            continue
        curves = []
        for run in group:
            steps, tokens, loss = run.after_warmup()
            curves.append((run, steps, tokens, smooth_curve(steps, loss)))
        targets = choose_target_losses([smoothed for *_, smoothed in curves])
        if targets.size == 0:
            warn(warnings, f"the batch-sweep curves at N={n_params} share no loss range after warm-up; "
                           "train the large-batch runs longer or the small-batch runs to a lower loss")
            continue
        dropped = []
        for target in targets:
            crossings = [(run.batch_tokens, *first_crossing(steps, tokens, smoothed, target))
                         for run, steps, tokens, smoothed in curves]
            crossings = [c for c in crossings if math.isfinite(c[1])]
            batch_tokens = np.array([c[0] for c in crossings], dtype=float)
            if len(set(batch_tokens)) < 2:
                continue
            steps = np.array([c[1] for c in crossings])
            fitted = fit_hyperbola(batch_tokens, steps)
            if fitted is None:
                dropped.append(f"{target:.4f}")
                continue
            hyperbolas.append(Hyperbola(
                loss=float(target), n_params=n_params, batch_tokens=batch_tokens, steps=steps,
                tokens=np.array([c[2] for c in crossings]), s_min=fitted[0], e_min=fitted[1], b_crit=fitted[2],
            ))
            log.info("L=%.4f N=%d: S_min=%.4g E_min=%.4g B_crit=%.4g tokens from %d batch sizes",
                     target, n_params, fitted[0].value, fitted[1].value, fitted[2].value, len(batch_tokens))
        if dropped:
            warn(warnings, f"hyperbolas at N={n_params}, L={', '.join(dropped)} gave a non-positive S_min or E_min "
                           "(the batch sizes do not bracket B_crit there), so these losses are dropped")
    return hyperbolas


def fit_critical_batch_law(hyperbolas: list[Hyperbola]) -> dict[str, Estimate]:
    """Fit log B_crit = log B* - (1 / alpha_B) log L; return alpha_B and B*."""
    losses = np.array([h.loss for h in hyperbolas])
    b_crit = np.array([h.b_crit.value for h in hyperbolas])
    (intercept, slope), cov = linear_fit(np.log(losses), np.log(b_crit))
    b_star = math.exp(intercept)
    return {
        "alpha_B": Estimate(-1.0 / slope, math.sqrt(cov[1, 1]) / slope**2),
        "B_star": Estimate(b_star, b_star * math.sqrt(cov[0, 0])),
    }


# ---------------------------------------------------------------------------------------------------------------
# Step 4: alpha_S and S_c
# ---------------------------------------------------------------------------------------------------------------


def min_steps_of(batch_tokens: np.ndarray, steps: np.ndarray, loss: np.ndarray, batch_law: dict | None) -> np.ndarray:
    """Convert steps to S_min with B_crit at the measured loss; S_min = S without a batch law."""
    if batch_law is None:
        return steps.astype(float)
    return laws.min_steps(steps, batch_tokens, laws.critical_batch(loss, batch_law["b_star"], batch_law["alpha_b"]))


def fit_steps_law(ladder: list[Run], params_law: dict[str, Estimate], batch_law: dict | None) -> dict[str, Estimate]:
    """Fit (S_c / S_min)^alpha_S to L - (N_c / N)^alpha_N over the ladder curves after warm-up."""
    # NOTE: L(N, S) has no term for the learning-rate schedule. Under a decaying schedule such as cosine, the end
    # of each curve falls faster than the power law, so alpha_S and S_c describe that schedule and run length.
    n_params, batch, steps, loss = [], [], [], []
    for run in ladder:
        run_steps, _, run_loss = run.after_warmup()
        n_params.append(np.full(len(run_steps), run.n_params, dtype=float))
        batch.append(np.full(len(run_steps), run.batch_tokens, dtype=float))
        steps.append(run_steps)
        loss.append(run_loss)
    n_params, batch, steps, loss = map(np.concatenate, (n_params, batch, steps, loss))

    log_s_min = np.log(min_steps_of(batch, steps, loss, batch_law))
    excess = loss - laws.loss_from_params(n_params, params_law["N_c"].value, params_law["alpha_N"].value)
    positive = excess > 0
    if positive.sum() < 3:
        raise ConfigError(
            f"after warm-up only {positive.sum()} validation points of the ladder runs lie above the fitted "
            "converged loss (N_c / N)^alpha_N, too few to fit alpha_S and S_c; log validation more often "
            "(trainer.val_check_interval) or check the warm-up length."
        )

    # Start from a log-log line through the points above L(N), then fit in loss space, where noise is even.
    (intercept, slope), _ = linear_fit(log_s_min[positive], np.log(excess[positive]))
    alpha_start = -slope if slope < 0 else 0.5
    log_s_c_start = intercept / alpha_start if slope < 0 else float(np.median(log_s_min))

    def steps_term(log_s_min_, log_s_c, alpha_s):
        with np.errstate(over="ignore"):  # trial parameters far off can overflow; curve_fit then steps back
            return np.exp(alpha_s * (log_s_c - log_s_min_))

    try:
        (log_s_c, alpha_s), cov = curve_fit(steps_term, log_s_min, excess, p0=[log_s_c_start, alpha_start],
                                            maxfev=20000)
    except RuntimeError as err:
        raise ConfigError(
            f"the fit of alpha_S and S_c to the ladder curves did not converge ({err}); check that each ladder "
            "run's val/loss in csv/metrics.csv falls after warm-up, or set --warmup-steps."
        ) from err
    s_c = math.exp(log_s_c)
    return {
        "alpha_S": Estimate(float(alpha_s), math.sqrt(cov[1, 1])),
        "S_c": Estimate(s_c, s_c * math.sqrt(cov[0, 0])),
    }


def steps_term_at_end(ladder: list[Run], constants: dict[str, Estimate], batch_law: dict | None) -> np.ndarray:
    """Return the fitted steps term (S_c / S_min)^alpha_S at each run's last step, with B_crit at its final loss."""
    batch = np.array([run.batch_tokens for run in ladder], dtype=float)
    last_steps = np.array([run.steps[-1] for run in ladder])
    final = np.array([run.final_loss for run in ladder])
    s_min = min_steps_of(batch, last_steps, final, batch_law)
    return (constants["S_c"].value / s_min) ** constants["alpha_S"].value


def converged_estimates(ladder: list[Run], constants: dict[str, Estimate], batch_law: dict | None) -> np.ndarray:
    """Return each run's loss minus the fitted steps term, averaged over the last TAIL_FRACTION of its points.

    Averaging over the tail, where the steps term is small, keeps the noise of a single final value out.
    """
    estimates = []
    for run in ladder:
        steps, _, loss = run.after_warmup()
        tail = slice(min(int(len(steps) * (1 - TAIL_FRACTION)), len(steps) - 1), None)
        s_min = min_steps_of(np.full(len(steps[tail]), float(run.batch_tokens)), steps[tail], loss[tail], batch_law)
        term = (constants["S_c"].value / s_min) ** constants["alpha_S"].value
        estimates.append(float(np.mean(loss[tail] - term)))
    return np.array(estimates)


def fit_ladder(ladder: list[Run], batch_law: dict | None, refine: bool,
               warnings: list[str]) -> tuple[dict[str, Estimate], np.ndarray]:
    """Run steps 2 and 4 on the ladder; return the constants and each run's converged-loss estimate.

    Step 2 needs converged losses, but a run's final loss still contains the steps term at its last step, and
    subtracting a too-high L(N) in step 4 bends the tail of every curve. With `refine`, steps 2 and 4 therefore
    alternate: each run's converged loss becomes its loss minus the fitted steps term (converged_estimates),
    until these estimates change by less than REFINE_TOLERANCE (relative). Without it, step 2 uses the final
    losses once, which suits runs trained to convergence.
    """
    n_params = np.array([run.n_params for run in ladder], dtype=float)
    final = np.array([run.final_loss for run in ladder])
    converged = final.copy()
    for round_number in range(1, MAX_REFINE_ROUNDS + 1):
        constants = fit_params_law(n_params, converged)
        constants.update(fit_steps_law(ladder, constants, batch_law))
        if not refine:
            break
        updated = converged_estimates(ladder, constants, batch_law)
        if np.any(updated <= 0):
            warn(warnings, "refining the converged losses gave a non-positive loss; the last fit is kept")
            break
        change = float(np.max(np.abs(updated - converged) / converged))
        converged = updated
        if change < REFINE_TOLERANCE:
            log.info("converged losses refined in %d rounds", round_number)
            break
    else:
        warn(warnings, f"refining the converged losses did not settle in {MAX_REFINE_ROUNDS} rounds "
                       f"(last relative change {change:.2g}); the last fit is kept")
    return constants, converged


def warn_unconverged(ladder: list[Run], constants: dict[str, Estimate], batch_law: dict | None,
                     warnings: list[str]) -> None:
    """Warn about ladder runs whose fitted steps term at the last step is a visible part of the final loss."""
    remaining = steps_term_at_end(ladder, constants, batch_law)
    unconverged = [f"{run.path} (N={run.n_params}: {term:.4f} of {run.final_loss:.4f})"
                   for run, term in zip(ladder, remaining) if term > CONVERGED_TOLERANCE * run.final_loss]
    if unconverged:
        warn(warnings, "ladder runs still improving at their last step, by the fitted steps term: "
                       + "; ".join(unconverged) + ". Their converged loss in step 2 rests on that fitted term; "
                       "train the ladder longer for a fit that depends less on it.")


# ---------------------------------------------------------------------------------------------------------------
# Step 6: held-out prediction of the largest model
# ---------------------------------------------------------------------------------------------------------------


def predict_curve(run: Run, constants: dict[str, Estimate], batch_law: dict | None,
                  steps: np.ndarray | None = None) -> np.ndarray:
    """Predict a run's loss at each step (default: its logged steps after warm-up) from fitted constants."""
    if steps is None:
        steps = run.after_warmup()[0]
    return laws.predict_loss_curve(
        run.n_params, steps, run.batch_tokens,
        n_c=constants["N_c"].value, alpha_n=constants["alpha_N"].value,
        s_c=constants["S_c"].value, alpha_s=constants["alpha_S"].value,
        **(batch_law or {}),
    )


def check_held_out(ladder: list[Run], batch_law: dict | None, refine: bool, warnings: list[str]) -> HeldOut:
    """Fit steps 2 and 4 without the largest ladder model, then predict its converged loss and its curve."""
    largest = max(run.n_params for run in ladder)
    train = [run for run in ladder if run.n_params < largest]
    held_out_runs = [run for run in ladder if run.n_params == largest]
    constants, _ = fit_ladder(train, batch_law, refine, warnings)

    curves = []
    for run in held_out_runs:
        steps, _, measured = run.after_warmup()
        predicted = predict_curve(run, constants, batch_law, steps)
        curves.append({
            "dir": run.path, "steps": steps, "measured": measured, "predicted": predicted,
            "mape_percent": float(np.mean(np.abs(predicted - measured) / measured) * 100),
            "predicted_final_loss": float(predicted[-1]), "measured_final_loss": run.final_loss,
        })
    return HeldOut(
        n_params=largest, runs=held_out_runs, constants=constants,
        predicted_converged_loss=float(laws.loss_from_params(largest, constants["N_c"].value,
                                                             constants["alpha_N"].value)),
        measured_final_loss=float(np.mean([run.final_loss for run in held_out_runs])),
        curves=curves,
    )


# ---------------------------------------------------------------------------------------------------------------
# All steps
# ---------------------------------------------------------------------------------------------------------------


def fit_scaling_laws(paths: list[str | Path], holdout: bool = True, warmup_steps: int | None = None,
                     refine: bool = True) -> FitResult:
    """Run steps 1 to 6 on the runs under `paths` and return the result; raise ConfigError on unusable input."""
    warnings: list[str] = []
    runs, skipped = read_runs(paths)
    for path, reason in skipped:
        warnings.append(f"skipping run {path}: {reason}")
    if not runs:
        raise ConfigError(f"no finished scaling-law runs under {', '.join(map(str, paths))} "
                          "(see the skipped runs above); run the ladder sweep first "
                          "(python run.py -m experiment=scaling_law).")
    check_one_setup(runs)
    for run in runs:
        if run.loss_column != "val/loss":
            warn(warnings, f"run {run.path} logged no val/loss; its train/loss curve is used instead")
        run.warmup_steps, run.warmup_rule = warmup_end(run, warmup_steps)
        log.info("run %s: %s, N=%d, B=%d tokens, final loss %.4f, warm-up %d steps (%s)", run.path, run.role,
                 run.n_params, run.batch_tokens, run.final_loss, run.warmup_steps, run.warmup_rule)
    for run in list(runs):
        points = len(run.after_warmup()[0])
        if points < MIN_POINTS_AFTER_WARMUP:
            reason = (f"only {points} logged losses after its warm-up step {run.warmup_steps} "
                      f"({run.warmup_rule}), fewer than {MIN_POINTS_AFTER_WARMUP}")
            warn(warnings, f"skipping run {run.path}: {reason}")
            skipped.append((run.path, reason))
            runs.remove(run)

    ladder = [run for run in runs if run.role == "ladder"]
    batch_runs = [run for run in runs if run.role == "batch"]
    sizes = sorted({run.n_params for run in ladder})
    log.info("%d ladder runs at %d model sizes, %d batch-sweep runs", len(ladder), len(sizes), len(batch_runs))
    if len(sizes) < 2:
        found = f"one model size (N={sizes[0]})" if sizes else "no ladder runs"
        raise ConfigError(
            f"found {found} among the finished runs under {', '.join(map(str, paths))}; fitting alpha_N and N_c "
            "needs finished ladder runs (scaling.role 'ladder', task_name scaling_law) at two or more model sizes, "
            "and the held-out check needs three. Run the ladder sweep over more model sizes "
            "(python run.py -m experiment=scaling_law) and pass its sweep directory."
        )

    # Step 3 comes first because step 4 needs B_crit(L), and steps 2 and 4 are fitted together (fit_ladder).
    constants: dict[str, Estimate] = {}
    result = FitResult(constants=constants, runs=runs, skipped=skipped, setup=runs[0].setup,
                       setup_hash=runs[0].setup_hash, refined=refine, warnings=warnings)
    if not batch_runs:
        warn(warnings, "no batch-size sweep among the runs, so B_crit is not fitted and step 4 uses S_min = S "
                       "(as if every batch were far above B_crit). To fit it, run the batch sweep at one model "
                       "size and several batch sizes (python run.py -m experiment=scaling_law_batch).")
    else:
        result.hyperbolas = fit_hyperbolas(batch_runs, warnings)
        if len({h.loss for h in result.hyperbolas}) >= 2:
            constants.update(fit_critical_batch_law(result.hyperbolas))
            log.info("step 3: alpha_B=%.4f B*=%.4g tokens", constants["alpha_B"].value, constants["B_star"].value)
            result.batch_law_used = constants["alpha_B"].value > 0
            if not result.batch_law_used:
                warn(warnings, f"fitted alpha_B={constants['alpha_B'].value:.4f} <= 0: B_crit does not fall as the "
                               "loss rises, so step 4 uses S_min = S; check the batch sweep's curves")
        else:
            warn(warnings, "the batch sweep gave fewer than two target losses with a hyperbola fit, so B_crit is "
                           "not fitted and step 4 uses S_min = S")

    # Steps 2 and 4.
    ladder_constants, converged = fit_ladder(ladder, result.batch_law, refine, warnings)
    constants.update(ladder_constants)
    for run, loss in zip(ladder, converged):
        run.converged_loss = float(loss)
    log.info("step 2: alpha_N=%.4f N_c=%.4g", constants["alpha_N"].value, constants["N_c"].value)
    log.info("step 4: alpha_S=%.4f S_c=%.4g steps", constants["alpha_S"].value, constants["S_c"].value)
    if constants["alpha_N"].value <= 0:
        warn(warnings, f"fitted alpha_N={constants['alpha_N'].value:.4f} <= 0: the loss does not fall with N")
    warn_unconverged(ladder, constants, result.batch_law, warnings)
    poor = []
    for name, estimate in constants.items():
        if estimate.stderr > abs(estimate.value):
            poor.append(f"{name}={estimate.value:.4g} +- {estimate.stderr:.2g}")
    if poor:
        warn(warnings, f"poorly determined constants (standard error above the value): {', '.join(poor)}; "
                       "more model sizes, longer runs or more validation points would narrow them")

    # Step 6.
    if not holdout:
        result.held_out_skipped = "disabled by --no-holdout"
    elif len(sizes) < 3:
        result.held_out_skipped = f"needs three or more ladder sizes, found {len(sizes)}"
        log.info("held-out check skipped: %s", result.held_out_skipped)
    else:
        held_out = check_held_out(ladder, result.batch_law, refine, warnings)
        result.held_out = held_out
        log.info("held-out N=%d: predicted converged loss %.4f, measured final loss %.4f (relative error %+.2f%%), "
                 "curve MAPE after warm-up %.2f%%", held_out.n_params, held_out.predicted_converged_loss,
                 held_out.measured_final_loss, 100 * held_out.relative_error, held_out.curve_mape)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def json_ready(value):
    """Convert numpy values and paths for JSON; NaN and infinity become null."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def constants_record(constants: dict[str, Estimate]) -> dict:
    return {name: {"value": estimate.value, "stderr": estimate.stderr, "kaplan_2020": laws.KAPLAN_2020[name]}
            for name, estimate in constants.items()}


def result_record(result: FitResult) -> dict:
    """Build the fit.json record."""
    record = {
        "constants": constants_record(result.constants),
        "constants_not_fitted": sorted(set(laws.KAPLAN_2020) - set(result.constants)),
        "uncertainty": UNCERTAINTY,
        "kaplan_2020_source": KAPLAN_SOURCE,
        "setup": result.setup,
        "setup_hash": result.setup_hash,
        "step4_min_steps": "S / (1 + B_crit(L) / B)" if result.batch_law_used else "S (no usable B_crit fit)",
        "converged_losses": (
            f"loss minus the fitted steps term, averaged over the last {TAIL_FRACTION:.0%} of the points"
            if result.refined else "final loss (--no-refine)"
        ),
        "runs_used": [
            {"dir": run.path, "role": run.role, "n_params": run.n_params, "batch_tokens": run.batch_tokens,
             "final_loss": run.final_loss, "last_step": int(run.steps[-1]), "loss_column": run.loss_column,
             "converged_loss": run.converged_loss, "warmup_steps": run.warmup_steps, "warmup_rule": run.warmup_rule}
            for run in result.runs
        ],
        "runs_skipped": [{"dir": path, "reason": reason} for path, reason in result.skipped],
        "batch_sweep": [
            {"loss": h.loss, "n_params": h.n_params, "s_min": vars(h.s_min), "e_min": vars(h.e_min),
             "b_crit": vars(h.b_crit), "batch_tokens": h.batch_tokens, "steps": h.steps, "tokens": h.tokens}
            for h in result.hyperbolas
        ],
        "warnings": result.warnings,
    }
    held_out = result.held_out
    if held_out is None:
        record["holdout"] = {"skipped": result.held_out_skipped}
    else:
        record["holdout"] = {
            "n_params": held_out.n_params,
            "runs": [run.path for run in held_out.runs],
            "fitted_without_it": constants_record(held_out.constants),
            "predicted_converged_loss": held_out.predicted_converged_loss,
            "measured_final_loss": held_out.measured_final_loss,
            "relative_error": held_out.relative_error,
            "curve_mape_percent": held_out.curve_mape,
            "curves": [{key: value for key, value in curve.items() if key not in ("steps", "measured", "predicted")}
                       for curve in held_out.curves],
        }
    return json_ready(record)


def write_fit_json(result: FitResult, out_dir: Path) -> Path:
    """Write fit.json, with the constants first, through a temporary file so a crash leaves no half-written file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fit.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result_record(result), indent=2) + "\n")
    temporary.replace(path)
    return path


def constants_table(result: FitResult) -> str:
    def number(value: float) -> str:
        return f"{value:.4g}" if math.isfinite(value) else "n/a"

    lines = [f"{'constant':<9} {'fitted':>10} {'stderr':>10} {'Kaplan 2020':>12}"]
    for name, reference in laws.KAPLAN_2020.items():
        estimate = result.constants.get(name, Estimate(math.nan))
        lines.append(f"{name:<9} {number(estimate.value):>10} {number(estimate.stderr):>10} {reference:>12.4g}")
    if result.held_out is not None:
        held_out = result.held_out
        lines.append(f"held-out N={held_out.n_params}: "
                     f"converged loss predicted {held_out.predicted_converged_loss:.4f}, "
                     f"measured final {held_out.measured_final_loss:.4f} ({100 * held_out.relative_error:+.2f}%), "
                     f"curve MAPE {held_out.curve_mape:.2f}%")
    else:
        lines.append(f"held-out check skipped: {result.held_out_skipped}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="SWEEP_DIR",
                        help="sweep directories (logs/<task_name>/multiruns/<time>/) or run directories, in any mix")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for fit.json and the plots (default: the first SWEEP_DIR)")
    parser.add_argument("--holdout-largest", dest="holdout", action="store_true", default=True,
                        help="fit without the largest ladder model and predict it (default; needs three ladder sizes)")
    parser.add_argument("--no-holdout", dest="holdout", action="store_false", help="skip the held-out check")
    parser.add_argument("--no-refine", dest="refine", action="store_false",
                        help="take the final losses as converged in step 2 instead of refining them (see fit_ladder)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="optimizer steps to leave out of each curve as warm-up (default: from setup.schedule)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    try:
        result = fit_scaling_laws(args.paths, holdout=args.holdout, warmup_steps=args.warmup_steps,
                                  refine=args.refine)
    except ConfigError as err:
        log.error("%s", err)
        return 2

    from lab.methods.scaling_law import plots

    out_dir = args.out or args.paths[0]
    fit_path = write_fit_json(result, out_dir)
    plot_paths = plots.write_plots(result, out_dir)
    log.info("wrote %s and %d plots in %s", fit_path, len(plot_paths), out_dir)
    print(f"\nScaling-law constants ({fit_path})\n\n{constants_table(result)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
