"""Free text from outside, made harmless where it ends up (a leaf: imports nothing of ours).

- `strip_controls` at every input point that stores free text (a run's trigger, an operator's
  note): a stored terminal escape would recolour or rewrite the screen of whoever lists it.
- `spreadsheet_cell` for every CSV the project writes: a text cell starting with `=`, `+`,
  `-` or `@` is run as a formula by spreadsheets (CSV injection).
"""

from __future__ import annotations

import re

# C0 and C1 control characters except tab and newline (a note may have lines), and the
# bidirectional overrides and isolates that make text read differently than it is stored.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")

# A spreadsheet runs a text cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def strip_controls(text: str) -> str:
    """`text` without control characters (tab and newline kept) or bidi overrides."""
    return _CONTROLS.sub("", text)


def spreadsheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: formula-like text gets a leading quote.

    Numbers pass unchanged (a negative delta stays a number); only text is neutralised.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
