"""User-facing errors: the CLI prints them as one line (no traceback unless --debug)."""


class GistRayError(Exception):
    """A problem with the user's input or environment, stated so the user knows what to change."""


class ConfigError(GistRayError):
    """A config key has an unknown name or a value outside what is allowed."""


class DataError(GistRayError):
    """A dataset file, column or row is missing or invalid."""


class ModelError(GistRayError):
    """A model path or name does not exist or cannot be loaded."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or a termination signal (SIGTERM: a scheduler, ``ray job stop``).
    ``str()`` says where the command stopped; the CLI exits with 128 + ``signum`` (None: the
    signal that arrived, as the CLI saw it)."""

    def __init__(self, message: str = "", signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum
