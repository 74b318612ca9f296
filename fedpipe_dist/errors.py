"""The two errors a user's input can raise (exit code 2 from the CLI), in a module of their own: every layer
raises them, and none of those layers should need the job's configuration for it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A job file or override is wrong. The message says which key and how to fix it.

    `key` (when known) is the dotted key at fault; load_job uses it to say whether the job file or an
    override set it.
    """

    def __init__(self, message: str, key: str | None = None, problems: list[ConfigError] | None = None):
        super().__init__(message)
        self.key = key
        self.problems = problems or [self]  # one error for several wrong keys: each of them, in order

    @classmethod
    def gathered(cls, problems: list[ConfigError]) -> ConfigError:
        """One error for every problem found (the single one itself when there is one)."""
        if len(problems) == 1:
            return problems[0]
        lines = "\n".join(f"  {i}. {e}" for i, e in enumerate(problems, 1))
        return cls(f"{len(problems)} problems in the job:\n{lines}", key=problems[0].key, problems=problems)


class UserInputError(ValueError):
    """Bad input other than config keys (data file, model path, empty data). Exit code 2."""
