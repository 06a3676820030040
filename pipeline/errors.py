"""The user-error type of every pairsel command: the CLI prints its message as one line and exits 2.

Apart from config.py so that the modules config.py itself uses (availability.py) can raise it too.
"""


class ConfigError(ValueError):
    """A config problem; the message starts with the offending key."""


def fail(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")
