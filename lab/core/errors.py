"""The one exception type that lab raises for bad input."""


class ConfigError(ValueError):
    """Invalid user input: a config key, a path or a data file.

    The message names the key or path and what to do, so run.py prints it without a traceback.
    """
