"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class SiftError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI). The message is one line that names the
    bad value and what is allowed."""
