"""Errors that the entry points report as one line (exit code 2) instead of a traceback."""


class ConfigError(ValueError):
    """A configuration value is wrong or cannot be satisfied; the message names the option and the fix."""
