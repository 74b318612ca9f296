"""The two errors a user's input can raise (exit code 2 from the CLI), in a module of their own: every layer
raises them, and none of those layers should need the job's configuration for it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A job file or override is wrong. The message says which key and how to fix it.

    `key` (when known) is the dotted key at fault; load_job uses it to say whether the job file or an
    override set it.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class UserInputError(ValueError):
    """Bad input other than config keys (data file, model path, empty data). Exit code 2."""
