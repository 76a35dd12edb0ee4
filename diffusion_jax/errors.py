"""Errors that are the user's to fix, as opposed to bugs.

A command-line entry point (`config_cli.run`) prints a `UserError` as one `error: ...` line and
exits with status 2, without a traceback (set DIFFUSION_JAX_TRACEBACK=1 to see it); anything
else is a bug and keeps its traceback. The subclasses also derive from the built-in error a
caller would catch (`except ValueError` keeps working).
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value (or combination) that cannot work."""


class InputError(UserError, ValueError):
    """An input file, folder or array of the wrong kind or shape."""


class MissingInputError(UserError, FileNotFoundError):
    """An input file or folder that does not exist."""


class DiskFullError(UserError, OSError):
    """A save that failed for lack of space; earlier checkpoints are intact."""
