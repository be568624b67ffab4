"""How fedfin reads a table's cells: missing values, booleans, and numbers written as text.

The rule, the same for CSV and Parquet, for the public pool and for every bank:
- Missing: an empty or whitespace-only cell, or a word pandas reads as missing in a CSV
  ("NA", "N/A", "null", "NaN", "None", ...) or "?". Text cells are trimmed of surrounding
  whitespace.
- Booleans (a bool column, or text "true"/"false" in any case) become the categories
  "True" and "False". ("yes"/"no" stay the categories they are.)
- A text column becomes numeric when every present value is a number as people write
  them: plain ("1250", "-3.5", "1e3"), with commas between groups of three digits ("1,250",
  "1,250,000.50"), a currency sign ("$1,250.00", "€12", "£3"), a trailing percent ("12%"
  reads as 12, the number written), or an accounting negative ("(1,250)" = -1250).
- A column where at least 90% of the present values look like numbers but some are not
  numbers fedfin reads ("twelve", "-", "1.250,00", "1,5") is a data error naming the
  column, the value and its row, not a category.
"""

import re

import numpy as np
import pandas as pd

from fedfin.common.errors import DataError

MOSTLY_NUMERIC = 0.9
MISSING_WORDS = frozenset(
    {
        "",
        "?",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
_NUMBER = re.compile(
    r"(?P<sign>[-+])?(?P<currency>[$€£¥])?(?P<sign2>[-+])?"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
    r"(?P<percent>%)?"
)
_NUMBER_SHAPED = re.compile(r"[-+(]?\s*[$€£¥]?\s*[-+]?[\d.,'’ ]*\d[\d.,'’ ]*\s*%?\s*\)?|-+")
_BOOLEANS = {"true": "True", "false": "False"}


def parse_number(text: str) -> float | None:
    """The number a person wrote in `text`, or None when it is not one fedfin reads."""
    text = text.strip()
    negative = text.startswith("(") and text.endswith(")")
    if negative:
        text = text[1:-1].strip()
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    sign = (match["sign"] or "") + (match["sign2"] or "")
    if len(sign) > 1 or (negative and sign):
        return None
    value = float(match["body"].replace(",", ""))
    return -value if negative or sign == "-" else value


def is_text(column: pd.Series) -> bool:
    """True for columns of text or mixed Python objects (not numbers, bools or dates)."""
    return not (
        pd.api.types.is_numeric_dtype(column)
        or pd.api.types.is_bool_dtype(column)
        or pd.api.types.is_datetime64_any_dtype(column)
        or isinstance(column.dtype, pd.CategoricalDtype)
    )


def clean_column(column: pd.Series, name: str, source: str) -> pd.Series:
    """One column read by the rule in the module docstring (numbers, text or booleans)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype(object)
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_datetime64_any_dtype(column):
        return category_text(column).astype("str")
    if not is_text(column):
        return column
    text = _present_text(column)
    numbers = numbers_in_text(text, name, source)
    if numbers is not None:
        return numbers
    lowered = text.dropna().str.lower()
    if len(lowered) and lowered.isin(list(_BOOLEANS)).all():
        return text.map({v: _BOOLEANS[v.lower()] for v in pd.unique(text.dropna())}).astype("str")
    return text.astype("str")


def _present_text(column: pd.Series) -> pd.Series:
    """Every value as trimmed text (bools as True/False), missing words and blanks as NaN."""

    def one(value: object) -> object:
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            return np.nan
        if isinstance(value, bool | np.bool_):
            return "True" if value else "False"
        text = str(value).strip()
        return np.nan if text in MISSING_WORDS else text

    values = column.astype(object)
    mapping = {value: one(value) for value in pd.unique(values) if not _is_missing(value)}
    return values.map(mapping)


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def numbers_in_text(text: pd.Series, name: str, source: str) -> pd.Series | None:
    """The column as float64 if every present value is a number; None if it is text.

    Raises a `DataError` for a mostly-numeric column with values that are not numbers.
    """
    present = text.dropna()
    if present.empty:
        return None
    parsed = {value: parse_number(value) for value in pd.unique(present)}
    if all(v is not None for v in parsed.values()):
        return text.map(parsed).astype(np.float64)
    numbers = {v for v, number in parsed.items() if number is not None}
    shaped = numbers | {v for v in parsed if _NUMBER_SHAPED.fullmatch(v) is not None}
    numeric = present.isin(numbers)
    if numbers and present.isin(shaped).mean() >= MOSTLY_NUMERIC:
        bad = present[~numeric]
        row = _row_number(bad.index[0], text.index)
        raise DataError(
            f"{source}: column '{name}' must be numeric, but row {row} has '{bad.iloc[0]}'"
            + (f" (and {len(bad) - 1} more such cells)" if len(bad) > 1 else "")
            + "; write a plain number (1250.5, 1,250.50) or leave the cell empty for missing"
        )
    return None


def _row_number(label: object, index: pd.Index) -> int:
    """1-based position of a row among the table's data rows (the header not counted)."""
    return int(index.get_loc(label)) + 1


def category_text(column: pd.Series) -> pd.Series:
    """A column's values as category names: whole numbers without '.0', bools as
    True/False, text trimmed; missing values stay missing.

    The same name whatever the file type: 3 in a Parquet int column, 3.0 in a CSV column
    with blanks and "3" in text all name category "3".
    """

    def one(value: object) -> object:
        if _is_missing(value):
            return np.nan
        if isinstance(value, bool | np.bool_):
            return "True" if value else "False"
        if isinstance(value, float | np.floating) and float(value).is_integer():
            return str(int(value))
        if isinstance(value, pd.Timestamp):
            return value.isoformat()
        return str(value).strip()

    values = column.astype(object)
    mapping = {value: one(value) for value in pd.unique(values) if not _is_missing(value)}
    return values.map(mapping).astype(object)
