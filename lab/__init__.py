"""lab: the group's methods as Lightning modules configured by Hydra.

Importing this package is cheap on purpose: `run.py --cfg job` and config validation run before torch loads.
"""
