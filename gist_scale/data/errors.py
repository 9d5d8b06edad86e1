"""`DataError`, the one error of the data path: every module of `gist_scale.data` raises it, and the trainer and the
tools turn it into one line for the user."""

__all__ = ["DataError"]


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file, the row, the field and the fix."""
