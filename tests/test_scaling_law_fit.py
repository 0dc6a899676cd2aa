"""Scaling-law fit: recovery of known constants from fake run directories, and the ways the fit degrades.

The run directories follow the training side's contract (status.json, results.json with a scaling section,
csv/metrics.csv, .hydra/<time>/overrides.yaml). Their curves come from the Kaplan-form laws with known
constants, inverted explicitly: for a loss L, S(L) = S_min(L) (1 + B_crit(L) / B) with
S_min(L) = S_c / (L - L(N))^(1 / alpha_S), so the fit is checked against a generator that shares no solver
with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

import numpy as np
import pytest

from lab.core.errors import ConfigError
from lab.methods.scaling_law import laws
from lab.methods.scaling_law.fit import fit_scaling_laws, main

TRUE = {"alpha_N": 0.076, "N_c": 8.8e13, "alpha_B": 0.21, "B_star": 2e8, "alpha_S": 0.76, "S_c": 2.1e3}
SETUP = {
    "tokenizer": "gpt2",
    "train_data": "tinystories",
    "context_length": 256,
    "optimizer": {"name": "adamw", "lr": 3e-4},
    "schedule": {"name": "constant", "warmup_steps": 300},
}
LADDER_SIZES = (1e6, 3e6, 1e7, 3e7)
LADDER_BATCH = 262_144  # tokens
SWEEP_SIZE = 1e6
SWEEP_BATCHES = (16_384, 65_536, 262_144, 1_048_576, 4_194_304)  # tokens
VAL_POINTS = 400  # validation rows per run
INITIAL_LOSS = 10.4  # about ln(32000): the loss of a uniform guess, a cap on the early curve


def true_loss_curve(n_params: float, batch_tokens: float, steps: np.ndarray) -> np.ndarray:
    """Return the exact law's loss at each step, capped at INITIAL_LOSS."""
    converged = laws.loss_from_params(n_params, TRUE["N_c"], TRUE["alpha_N"])
    losses = converged + np.geomspace(1e-5, 30, 20_000)
    s_min = TRUE["S_c"] / (losses - converged) ** (1 / TRUE["alpha_S"])
    needed = s_min * (1 + laws.critical_batch(losses, TRUE["B_star"], TRUE["alpha_B"]) / batch_tokens)
    # `needed` falls as the loss rises, so reverse both for np.interp.
    curve = np.interp(np.log(np.maximum(steps, 1)), np.log(needed[::-1]), losses[::-1])
    return np.minimum(curve, INITIAL_LOSS)


def steps_to_reach(n_params: float, batch_tokens: float, excess: float) -> int:
    """Return the steps the exact law needs to come within `excess` of the converged loss."""
    loss = laws.loss_from_params(n_params, TRUE["N_c"], TRUE["alpha_N"]) + excess
    s_min = TRUE["S_c"] / excess ** (1 / TRUE["alpha_S"])
    return int(s_min * (1 + laws.critical_batch(loss, TRUE["B_star"], TRUE["alpha_B"]) / batch_tokens))


def setup_hash(setup: dict) -> str:
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()


def write_run(run_dir, n_params, batch_tokens, max_steps, role, noise, rng, setup=SETUP):
    """Write one finished run directory with the contract's files."""
    val_every = max(max_steps // VAL_POINTS, 1)
    steps = np.arange(0, max_steps + 1, val_every)
    loss = true_loss_curve(n_params, batch_tokens, steps) * (1 + noise * rng.standard_normal(len(steps)))
    task_name = "scaling_law" if role == "ladder" else "scaling_law_batch"

    (run_dir / "csv").mkdir(parents=True)
    lines = ["epoch,step,tokens,train/loss,val/loss,lr-AdamW"]
    for step, value in zip(steps, loss):
        if step > 0:  # a training row halfway to each validation row, without a tokens value
            train_step = step - val_every // 2
            lines.append(f"0,{train_step},,{value * 1.01:.6f},,0.0003")
        lines.append(f"0,{step},{step * batch_tokens},,{value:.6f},")
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")

    results = {
        "task_name": task_name,
        "metrics": {"loss": float(loss[-1])},
        "scaling": {
            "role": role, "n_params": int(n_params), "n_params_embedding": 8_192_000,
            "batch_tokens": int(batch_tokens), "context_length": 256, "tokens_seen": int(steps[-1] * batch_tokens),
            "setup": setup, "setup_hash": setup_hash(setup),
        },
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "status.json").write_text(json.dumps({"status": "finished", "error": None}))
    (run_dir / ".hydra" / "2024-01-01_00-00-00").mkdir(parents=True)
    (run_dir / ".hydra" / "2024-01-01_00-00-00" / "overrides.yaml").write_text(
        f"- experiment={task_name}\n- scaling.n_params={int(n_params)}\n"
    )


def write_ladder(root, noise, seed=0, sizes=LADDER_SIZES, setup=SETUP, name="ladder"):
    """Write a ladder sweep; each run trains until its steps term is 0.2% of its converged loss."""
    rng = np.random.default_rng(seed)
    sweep = root / "scaling_law" / "multiruns" / f"2024-01-01_00-00-00_{name}"
    for job, n_params in enumerate(sizes):
        converged = laws.loss_from_params(n_params, TRUE["N_c"], TRUE["alpha_N"])
        max_steps = steps_to_reach(n_params, LADDER_BATCH, 0.002 * converged)
        write_run(sweep / str(job), n_params, LADDER_BATCH, max_steps, "ladder", noise, rng, setup)
    return sweep


def write_batch_sweep(root, noise, seed=1):
    """Write a batch-size sweep at one model size; each run trains until 0.13 above the converged loss."""
    rng = np.random.default_rng(seed)
    sweep = root / "scaling_law_batch" / "multiruns" / "2024-01-01_00-00-00_batch"
    for job, batch_tokens in enumerate(SWEEP_BATCHES):
        max_steps = steps_to_reach(SWEEP_SIZE, batch_tokens, 0.13)
        write_run(sweep / str(job), SWEEP_SIZE, batch_tokens, max_steps, "batch", noise, rng)
    return sweep


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """Ladder and batch sweep with 0.1% multiplicative noise on every loss, and their fit."""
    root = tmp_path_factory.mktemp("noisy")
    sweeps = [write_ladder(root, noise=1e-3), write_batch_sweep(root, noise=1e-3)]
    return sweeps, fit_scaling_laws(sweeps)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Noise-free ladder and batch sweep, and their fit."""
    root = tmp_path_factory.mktemp("clean")
    sweeps = [write_ladder(root, noise=0.0), write_batch_sweep(root, noise=0.0)]
    return sweeps, fit_scaling_laws(sweeps)


def true_converged_loss(n_params: float) -> float:
    return float(laws.loss_from_params(n_params, TRUE["N_c"], TRUE["alpha_N"]))


def test_generator_matches_law_solver():
    steps = np.array([1_000, 10_000, 100_000, 1_000_000])
    solved = laws.predict_loss_curve(3e6, steps, 65_536, TRUE["N_c"], TRUE["alpha_N"], TRUE["S_c"], TRUE["alpha_S"],
                                     b_star=TRUE["B_star"], alpha_b=TRUE["alpha_B"])
    np.testing.assert_allclose(solved, true_loss_curve(3e6, 65_536, steps), rtol=1e-6)


@pytest.mark.parametrize("name", ["alpha_N", "alpha_B", "alpha_S"])
def test_fit_recovers_exponents(noisy, name):
    _, result = noisy
    assert result.constants[name].value == pytest.approx(TRUE[name], rel=0.05)


@pytest.mark.parametrize("name", ["N_c", "B_star", "S_c"])
def test_fit_recovers_scales(noisy, name):
    # The scales are extrapolations (B* is B_crit at L = 1, far outside the fitted losses), so their relative
    # error is several times that of the exponents.
    _, result = noisy
    assert result.constants[name].value == pytest.approx(TRUE[name], rel=0.2)


def test_fit_reports_stderr(noisy):
    _, result = noisy
    for name, estimate in result.constants.items():
        assert math.isfinite(estimate.stderr), name
        assert estimate.stderr > 0, name


def test_hyperbola_holds_for_fits(clean):
    _, result = clean
    assert len(result.hyperbolas) >= 5
    for hyperbola in result.hyperbolas:
        s_min, e_min = hyperbola.s_min.value, hyperbola.e_min.value
        measured = laws.hyperbola_residual(hyperbola.steps, hyperbola.tokens, s_min, e_min)
        assert np.max(np.abs(measured)) < 0.05, f"measured points at L={hyperbola.loss:.3f}: {measured}"
        steps, tokens = laws.steps_on_hyperbola(hyperbola.batch_tokens, s_min, e_min)
        assert np.max(np.abs(laws.hyperbola_residual(steps, tokens, s_min, e_min))) < 1e-9


def test_critical_batch_falls_with_loss(noisy):
    _, result = noisy
    alpha_b, b_star = result.constants["alpha_B"].value, result.constants["B_star"].value
    assert alpha_b > 0
    by_loss = sorted(result.hyperbolas, key=lambda h: h.loss)
    assert all(np.diff([h.b_crit.value for h in by_loss]) < 0), [h.b_crit.value for h in by_loss]
    assert np.all(np.diff(laws.critical_batch(np.linspace(2.0, 8.0, 20), b_star, alpha_b)) < 0)


def test_holdout_predicts_clean_largest(clean):
    _, result = clean
    held = result.held_out
    assert held is not None
    assert held.n_params == int(LADDER_SIZES[-1])
    assert held.predicted_converged_loss == pytest.approx(true_converged_loss(LADDER_SIZES[-1]), rel=0.01)
    assert held.curve_mape < 1.0


def test_mixed_setups_raise(tmp_path):
    other_setup = {**SETUP, "optimizer": {"name": "adamw", "lr": 1e-3}}
    first = write_ladder(tmp_path, noise=0.0, sizes=(1e6, 3e6), name="a")
    second = write_ladder(tmp_path, noise=0.0, sizes=(1e6, 3e6), setup=other_setup, name="b")
    with pytest.raises(ConfigError) as raised:
        fit_scaling_laws([first, second])
    message = str(raised.value)
    assert str(first / "0") in message
    assert str(second / "0") in message
    assert "optimizer.lr" in message
    assert "fit each setup separately" in message


def test_failed_run_skipped(tmp_path, caplog):
    ladder = write_ladder(tmp_path, noise=0.0, sizes=LADDER_SIZES[:3])
    failed = ladder / "3"
    failed.mkdir()
    (failed / "status.json").write_text(json.dumps(
        {"status": "failed", "error": "Traceback (most recent call last):\nRuntimeError: out of memory"}))
    out = tmp_path / "out"

    with caplog.at_level(logging.WARNING, logger="lab.methods.scaling_law.fit"):
        assert main([str(ladder), "--out", str(out)]) == 0

    warned = [r.getMessage() for r in caplog.records if str(failed) in r.getMessage()]
    assert len(warned) == 1
    assert "status failed" in warned[0]
    assert "out of memory" in warned[0]
    record = json.loads((out / "fit.json").read_text())
    assert [s["dir"] for s in record["runs_skipped"]] == [str(failed)]
    assert "status failed" in record["runs_skipped"][0]["reason"]
    assert len(record["runs_used"]) == 3


def test_cli_writes_fit_and_plots(noisy, tmp_path):
    sweeps, _ = noisy
    out = tmp_path / "out"
    assert main([str(path) for path in sweeps] + ["--out", str(out)]) == 0

    record = json.loads((out / "fit.json").read_text())
    for name, reference in laws.KAPLAN_2020.items():
        assert set(record["constants"][name]) == {"value", "stderr", "kaplan_2020"}, name
        assert record["constants"][name]["kaplan_2020"] == reference
    assert record["setup"] == SETUP
    assert len(record["runs_used"]) == len(LADDER_SIZES) + len(SWEEP_BATCHES)
    assert record["holdout"]["n_params"] == int(LADDER_SIZES[-1])
    assert {"relative_error", "curve_mape_percent"} <= set(record["holdout"])
    for name in ("loss_vs_params.png", "batch_hyperbolas.png", "critical_batch.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_cli_default_out_is_first_sweep(tmp_path):
    ladder = write_ladder(tmp_path, noise=0.0, sizes=LADDER_SIZES[:3])
    assert main([str(ladder), "--no-holdout"]) == 0
    record = json.loads((ladder / "fit.json").read_text())
    assert record["holdout"] == {"skipped": "disabled by --no-holdout"}


def test_no_batch_sweep_uses_steps(tmp_path, caplog):
    ladder = write_ladder(tmp_path, noise=0.0)
    with caplog.at_level(logging.WARNING, logger="lab.methods.scaling_law.fit"):
        result = fit_scaling_laws([ladder])
    assert any("no batch-size sweep" in r.getMessage() for r in caplog.records)
    assert "alpha_B" not in result.constants
    assert result.batch_law is None
    assert result.held_out is not None


def test_two_size_ladder_writes_fit(tmp_path):
    ladder = write_ladder(tmp_path, noise=0.0, sizes=LADDER_SIZES[:2])
    batch = write_batch_sweep(tmp_path, noise=0.0)
    assert main([str(ladder), str(batch)]) == 0
    record = json.loads((ladder / "fit.json").read_text())
    assert record["constants"]["alpha_N"]["value"] == pytest.approx(TRUE["alpha_N"], rel=0.05)
    assert record["constants"]["alpha_N"]["stderr"] is None  # two points leave no residual degrees of freedom
    assert "three or more ladder sizes" in record["holdout"]["skipped"]


def test_one_size_ladder_exits_nonzero(tmp_path, caplog):
    ladder = write_ladder(tmp_path, noise=0.0, sizes=LADDER_SIZES[:1])
    with caplog.at_level(logging.ERROR, logger="lab.methods.scaling_law.fit"):
        assert main([str(ladder)]) != 0
    message = caplog.records[-1].getMessage()
    assert "one model size" in message
    assert "two or more model sizes" in message
    assert not (ladder / "fit.json").exists()


def test_minimal_csv_is_read(tmp_path):
    ladder = write_ladder(tmp_path, noise=0.0, sizes=LADDER_SIZES[:3])
    for job in ("0", "1", "2"):
        csv_path = ladder / job / "csv" / "metrics.csv"
        rows = [line.split(",") for line in csv_path.read_text().splitlines()]
        validation_lines = ["step,val/loss"] + [f"{row[1]},{row[4]}" for row in rows[1:] if row[4]]
        csv_path.write_text("\n".join(validation_lines) + "\n")
    result = fit_scaling_laws([ladder])
    assert result.constants["alpha_N"].value == pytest.approx(TRUE["alpha_N"], rel=0.05)
    assert all(np.array_equal(run.tokens, run.steps * LADDER_BATCH) for run in result.runs)
