"""Kaplan-form scaling laws as vectorised numpy functions.

Source of the forms: Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361).
Symbols: N non-embedding parameters, B batch size in tokens, S optimizer steps, E = B * S tokens processed,
L loss in nats per token. Every function broadcasts over numpy arrays and scalars.
"""

from __future__ import annotations

import numpy as np

# Constants published by Kaplan et al. 2020 for their setup (WebText2, their tokenizer and schedule).
# Checked only against text transcriptions of their figures: the loss-against-parameters figure draws
# L = (N / 8.8e13)^-0.076, and the critical-batch figure draws B_crit = 2.1e8 tokens * L^-4.8, which matches
# B* = 2e8 and alpha_B = 0.21 (1 / 0.21 = 4.76).
# NOTE: alpha_S and S_c (their L(N, S_min) fit) were not checked against the paper.
KAPLAN_2020 = {
    "alpha_N": 0.076,
    "N_c": 8.8e13,  # non-embedding parameters
    "alpha_B": 0.21,
    "B_star": 2e8,  # tokens
    "alpha_S": 0.76,
    "S_c": 2.1e3,  # optimizer steps
}


def loss_from_params(n_params, n_c, alpha_n):
    """Return the converged loss L(N) = (N_c / N)^alpha_N."""
    return (n_c / np.asarray(n_params, dtype=float)) ** alpha_n


def critical_batch(loss, b_star, alpha_b):
    """Return the critical batch size B_crit(L) = B* / L^(1 / alpha_B), in tokens."""
    return b_star / np.asarray(loss, dtype=float) ** (1.0 / alpha_b)


def min_steps(steps, batch_tokens, b_crit):
    """Return S_min = S / (1 + B_crit / B): the steps a batch far above B_crit would need for the same loss."""
    return np.asarray(steps, dtype=float) / (1.0 + b_crit / np.asarray(batch_tokens, dtype=float))


def min_tokens(tokens, batch_tokens, b_crit):
    """Return E_min = E / (1 + B / B_crit): the tokens a batch far below B_crit would need for the same loss."""
    return np.asarray(tokens, dtype=float) / (1.0 + np.asarray(batch_tokens, dtype=float) / b_crit)


def steps_on_hyperbola(batch_tokens, s_min, e_min):
    """Return the steps S and tokens E = B * S that reach one loss at batch size B.

    The pair lies on the hyperbola (S / S_min - 1)(E / E_min - 1) = 1, which for E = B * S gives
    S = S_min + E_min / B.
    """
    batch_tokens = np.asarray(batch_tokens, dtype=float)
    steps = s_min + e_min / batch_tokens
    return steps, batch_tokens * steps


def hyperbola_residual(steps, tokens, s_min, e_min):
    """Return (S / S_min - 1)(E / E_min - 1) - 1, which is zero on the steps-tokens hyperbola."""
    return (np.asarray(steps, dtype=float) / s_min - 1.0) * (np.asarray(tokens, dtype=float) / e_min - 1.0) - 1.0


def loss_from_params_steps(n_params, s_min, n_c, alpha_n, s_c, alpha_s):
    """Return L(N, S_min) = (N_c / N)^alpha_N + (S_c / S_min)^alpha_S."""
    return loss_from_params(n_params, n_c, alpha_n) + (s_c / np.asarray(s_min, dtype=float)) ** alpha_s


def predict_loss_curve(n_params, steps, batch_tokens, n_c, alpha_n, s_c, alpha_s, b_star=None, alpha_b=None,
                       iterations: int = 100):
    """Return the loss at each step: the root L of L = (N_c / N)^alpha_N + (S_c / S_min(S, L))^alpha_S.

    S_min(S, L) = S / (1 + B_crit(L) / B) depends on L itself, so each step is solved by bisection.
    The right-hand side falls as L rises (B_crit(L) falls when alpha_B > 0), so the root is unique and lies
    between L(N) and L(N) + (S_c / S_min(S, L(N)))^alpha_S. Without b_star and alpha_b, S_min = S and the
    loss is explicit. Steps <= 0 give NaN.
    """
    steps = np.asarray(steps, dtype=float)
    floor = loss_from_params(n_params, n_c, alpha_n) + np.zeros_like(steps)
    valid = steps > 0
    safe_steps = np.where(valid, steps, 1.0)

    def steps_term(loss):
        if b_star is None or alpha_b is None:
            return (s_c / safe_steps) ** alpha_s
        s_min = min_steps(safe_steps, batch_tokens, critical_batch(loss, b_star, alpha_b))
        return (s_c / s_min) ** alpha_s

    if b_star is None or alpha_b is None:
        return np.where(valid, floor + steps_term(floor), np.nan)
    if alpha_b <= 0:
        raise ValueError(f"alpha_B={alpha_b} must be > 0 for the bisection bracket to hold")

    lower = floor.copy()
    upper = floor + steps_term(floor)
    for _ in range(iterations):
        middle = 0.5 * (lower + upper)
        above_root = middle - floor - steps_term(middle) > 0
        upper = np.where(above_root, middle, upper)
        lower = np.where(above_root, lower, middle)
    return np.where(valid, 0.5 * (lower + upper), np.nan)
