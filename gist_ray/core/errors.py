"""User-facing errors: the CLI prints them as one line (no traceback unless --debug)."""


class GistRayError(Exception):
    """A problem with the user's input or environment, stated so the user knows what to change."""


class ConfigError(GistRayError):
    """A config key has an unknown name or a value outside what is allowed."""


class DataError(GistRayError):
    """A dataset file, column or row is missing or invalid."""


class ModelError(GistRayError):
    """A model path or name does not exist or cannot be loaded."""
