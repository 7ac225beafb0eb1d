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


# What a terminal would act on: C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {0x2028: "\\u2028", 0x2029: "\\u2029"}
_CONTROL |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def shown(value: object, limit: int = 200) -> str:
    """Text read from a file (a checkpoint, a file name, a record) as it may be printed: one line, control characters
    escaped (an escape sequence would retitle or clear the terminal; a newline would forge a line of its own), and at
    most `limit` characters. Rich markup and matplotlib's `$` stay literal only where the printer is told so
    (`markup=False`, `plots.literal`)."""
    text = str(value).translate(_CONTROL)
    return text if len(text) <= limit else text[: limit - 1] + "…"
