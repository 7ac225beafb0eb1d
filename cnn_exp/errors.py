"""The one exception type for mistakes a user can fix (a bad setting, a missing file, a bad checkpoint), and the
type checks of config values that find them."""


class UserError(Exception):
    """Its message names the thing to fix; entry points print it alone, without a traceback."""


def is_whole(value: object) -> bool:
    """An int from a config, and not a bool: YAML's true/false would otherwise pass as 1/0."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float from a config, and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)
