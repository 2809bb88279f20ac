"""Errors that `tq` reports as one clear line instead of a traceback."""


class UserError(Exception):
    """Something the user can act on: a missing tool, a wrong hash, a patch that does not apply."""
