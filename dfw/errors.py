"""The one exception type for bad input: the entry points print its message as one line and exit 2."""


class ConfigError(ValueError):
    """A setting, file or resource the user named is wrong or missing; the message says what to do."""
