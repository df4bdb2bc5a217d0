"""The one error class the CLI reports as a single line: a user's mistake, not a bug.

Anything else (a bug in this code, numpy or torch) keeps its traceback. It subclasses ValueError
so library callers that caught ValueError before still do.
"""


class UserError(ValueError):
    """Bad input or settings the user can fix: a missing file, a refused value, a bad layout."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named (or must provide) is not there."""
