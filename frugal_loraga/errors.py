"""The errors a run reports to its user: each message says what went wrong and what to change.

ConfigError, DataError and OutOfMemory are bad input (the CLI exits with code 2); RunError is a failure during the run
that the user can act on (disk full, a loss that became NaN); the CLI exits with code 1 for it. No module here imports
torch, so that the CLI's --help stays instant.
"""


class ConfigError(ValueError):
    """A setting is invalid; the message says which and what to use instead."""


class DataError(ValueError):
    """The data file cannot be used; the message names the file, the line and what to fix."""


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory; the message says which settings to lower."""


class RunError(RuntimeError):
    """The run stopped on a failure it could not go past; the message says what is kept and what to do."""
