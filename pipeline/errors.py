"""The one exception type for a user's mistake: the CLI prints its message on one line, without a traceback."""


class UserError(Exception):
    """Bad params, a missing file or folder, an impossible request: something the user can fix."""
