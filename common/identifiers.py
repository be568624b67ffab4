"""Row identifiers: columns that name a loan or a customer rather than describe it.

A loan number, customer id or saved row index is not a feature. Used as one it lets the
model key on individual rows, which spends privacy budget on memorisation and carries
nothing that transfers between banks (each numbers its loans its own way). Real credit
tables often carry one (`ID`, `SK_ID_CURR`, `loan_id`, `Unnamed: 0`, `rownames`), so the
schema recognises them and leaves them out, saying so, instead of standardising them.

The rule, applied to the public pool when the schema is fitted and to a bank's own
columns the schema does not know:
- a name that says identifier (a token `id`, `ids`, `uuid` or `guid`, e.g. `loan_id`,
  `CustomerID`, `SK_ID_CURR`; or `index`, `rownames`, `row_number`, `Unnamed: 0`) and at
  least 90% of present values distinct;
- or, whatever the name, at least 50 present values, all distinct, that are text (a key,
  a name) or whole numbers in row order or filling at least half their range (a row
  number, also after a split kept only some rows). A real integer feature passes that
  only by chance: 50 distinct draws from at most 100 values, about 1 in 250,000.
"""

import re

import pandas as pd

_ID_TOKENS = frozenset({"id", "ids", "uuid", "guid"})
_INDEX_NAMES = frozenset(
    {"index", "rownames", "rowname", "row", "rownum", "row_number", "row_num", "row_no"}
)
_TOKEN = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_MIN_ROWS = 50
_DISTINCT_SHARE = 0.9


def name_says_identifier(name: str) -> bool:
    """True for names like `id`, `loan_id`, `CustomerID`, `SK_ID_CURR`, `Unnamed: 0`."""
    text = name.strip()
    if text.lower() in _INDEX_NAMES or text.lower().startswith("unnamed:"):
        return True
    return any(token.lower() in _ID_TOKENS for token in _TOKEN.findall(text))


def identifier_reason(name: str, column: pd.Series) -> str | None:
    """Why `column` is a row identifier, or None when it may be a feature.

    `column` is the cleaned column (`common.cells.clean_column`): numbers as numbers,
    blanks and NA words as missing.
    """
    present = column.dropna()
    if len(present) < 2:
        return None
    distinct = int(present.nunique())
    share = distinct / len(present)
    if name_says_identifier(name) and share >= _DISTINCT_SHARE:
        return f"its name marks an identifier and {share:.0%} of its values are distinct"
    if distinct != len(present) or len(present) < _MIN_ROWS:
        return None
    if pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present):
        values = present.astype("float64")
        if not bool((values == values.round()).all()):
            return None
        dense = values.max() - values.min() + 1 <= 2 * len(present)
        if dense or values.is_monotonic_increasing:
            return "its values are distinct whole numbers numbering the rows"
        return None
    if pd.api.types.is_bool_dtype(present):
        return None
    return "every value is distinct text (a key or a name, not a category)"
