"""The one exception type for mistakes a user can fix: a bad setting, a missing file, a bad checkpoint."""


class UserError(Exception):
    """Its message names the thing to fix; entry points print it alone, without a traceback."""
