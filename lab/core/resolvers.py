"""OmegaConf resolvers that the configs use; registered by run.py and by the tests before composing."""

from __future__ import annotations

import secrets

from omegaconf import OmegaConf


def register_resolvers() -> None:
    # A random suffix on run and sweep directories, so two launches in the same second never share one.
    # use_cache makes every reference within one config resolve to the same suffix.
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", lambda: secrets.token_hex(3), use_cache=True)
