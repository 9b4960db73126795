"""Errors that mean "the input is wrong", each with a message a user can act on.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class MobileMoEError(Exception):
    """Base class: a problem with the user's input, package, checkpoint or settings."""


class PackageError(MobileMoEError):
    """A mobilemoe package is missing, malformed, tampered with or of another format version."""


class BudgetError(MobileMoEError):
    """The memory budget cannot hold what the model needs."""


class ExportError(MobileMoEError):
    """A checkpoint cannot be exported (unsupported, incomplete, or not found)."""
