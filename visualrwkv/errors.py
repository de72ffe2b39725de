"""Errors a user can fix. The CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, bad record, wrong checkpoint, no GPU)."""
