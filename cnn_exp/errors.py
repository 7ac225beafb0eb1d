"""The one exception type for mistakes a user can fix (a bad setting, a missing file, a bad checkpoint), the type
checks of config values that find them, config values as plain Python, and text from a file as one printable line."""

import unicodedata
from typing import Any

from omegaconf import OmegaConf


class UserError(Exception):
    """Its message names the thing to fix; entry points print it alone, without a traceback."""


def first_line(err: BaseException) -> str:
    """An error's own words in one line: its first, and the next where the first only introduces it (Hydra's
    "Error loading 'x':" before the ModuleNotFoundError that says why)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def is_whole(value: object) -> bool:
    """An int from a config, and not a bool: YAML's true/false would otherwise pass as 1/0."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float from a config, and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def plain(value: Any) -> Any:
    """A config value as plain Python (dicts, lists, numbers, strings), resolved: what settings are kept as, in a
    checkpoint, a record or a tracker."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class _Escapes(dict):
    """str.translate's table for `shown`, filled as characters are met: what a terminal or a text renderer acts on
    (control characters C0 and C1, DEL; format characters such as the right-to-left override U+202E, which would
    show text reversed; the line and paragraph separators) becomes its escape, anything else stays itself."""

    def __missing__(self, code: int) -> str | int:
        named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(chr(code))
        if named is None and unicodedata.category(chr(code)) in ("Cc", "Cf", "Zl", "Zp"):
            named = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
        self[code] = code if named is None else named
        return self[code]


_ESCAPES = _Escapes()
# The same for text shown over several lines (the lab report): its line breaks and tabs stay.
LINES_ESCAPES = _Escapes({ord("\n"): ord("\n"), ord("\t"): ord("\t")})


def shown(value: object, limit: int = 200) -> str:
    """Text read from a file (a checkpoint, a file name, a record) as it may be printed: one line, control and format
    characters escaped (an escape sequence would retitle or clear the terminal, a right-to-left override would show
    the text reversed, a newline would forge a line of its own), and at most `limit` characters. Rich markup and
    matplotlib's `$` stay literal only where the printer is told so (`markup=False`, `plots.literal`)."""
    text = str(value).translate(_ESCAPES)
    # The bytes of a file name that is not UTF-8, which Python holds as lone surrogates no printer can encode: \udcff.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"
