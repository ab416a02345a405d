"""The configuration's error, below everything that checks a setting (no project imports)."""


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


__all__ = ["ConfigError"]
