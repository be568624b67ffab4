"""FeatureSchema: fitted on public data only, shipped as JSON, strict about bank data."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfin.common.errors import CheckpointError, DataError
from fedfin.common.schema import FeatureSchema
from fedfin.common.synthetic import GROUP_COLUMN, LABEL, PUBLIC_GROUP, generate_credit_data

BANK_SOURCE = "bank-00.csv"


@pytest.fixture(scope="module")
def loans() -> pd.DataFrame:
    return generate_credit_data(3_000, 2, shift=1.0, seed=0)


@pytest.fixture
def public(loans: pd.DataFrame) -> pd.DataFrame:
    return loans[loans[GROUP_COLUMN] == PUBLIC_GROUP].reset_index(drop=True)


@pytest.fixture
def bank(loans: pd.DataFrame) -> pd.DataFrame:
    return loans[loans[GROUP_COLUMN] == "bank-00"].reset_index(drop=True)


@pytest.fixture
def schema(public: pd.DataFrame) -> FeatureSchema:
    return FeatureSchema.fit(public, LABEL, exclude=(GROUP_COLUMN,), source="public pool")


def categorical_codes(schema: FeatureSchema, frame: pd.DataFrame, column: str) -> np.ndarray:
    position = [c.name for c in schema.categorical].index(column)
    return schema.transform(frame, BANK_SOURCE).categorical[:, position]


def numeric_values(schema: FeatureSchema, frame: pd.DataFrame, column: str) -> np.ndarray:
    position = [f.name for f in schema.numeric].index(column)
    return schema.transform(frame, BANK_SOURCE).numeric[:, position]


# --- fitted on public data only ---------------------------------------------------------


def test_transforming_a_bank_does_not_change_the_schema(
    schema: FeatureSchema, bank: pd.DataFrame
) -> None:
    before = schema.to_json()

    schema.transform(bank, BANK_SOURCE)

    assert schema.to_json() == before


def test_category_vocabularies_come_from_public_data(
    schema: FeatureSchema, public: pd.DataFrame, bank: pd.DataFrame
) -> None:
    bank = bank.assign(purpose="yacht")
    schema.transform(bank, BANK_SOURCE)

    purpose = next(c for c in schema.categorical if c.name == "purpose")
    assert purpose.vocabulary == tuple(sorted(public["purpose"].unique()))
    assert "yacht" not in purpose.vocabulary


def test_a_category_the_public_data_never_saw_maps_to_the_unknown_bucket_0(
    schema: FeatureSchema, bank: pd.DataFrame
) -> None:
    bank = bank.copy()
    bank.loc[:9, "purpose"] = "yacht"

    codes = categorical_codes(schema, bank, "purpose")

    assert (codes[:10] == 0).all()
    assert (codes[10:] > 0).all()


def test_a_missing_category_maps_to_the_unknown_bucket_0(
    schema: FeatureSchema, bank: pd.DataFrame
) -> None:
    bank = bank.copy()
    bank.loc[:4, "home_ownership"] = np.nan

    assert (categorical_codes(schema, bank, "home_ownership")[:5] == 0).all()


def test_a_pandas_categorical_column_encodes_exactly_like_its_text(
    schema: FeatureSchema, bank: pd.DataFrame
) -> None:
    text = bank.copy()
    text.loc[:9, "purpose"] = "yacht"
    text.loc[10:14, "purpose"] = np.nan
    categorical = text.astype({"purpose": "category", "home_ownership": "category"})

    np.testing.assert_array_equal(
        categorical_codes(schema, categorical, "purpose"),
        categorical_codes(schema, text, "purpose"),
    )
    np.testing.assert_array_equal(
        schema.transform(categorical, BANK_SOURCE).categorical,
        schema.transform(text, BANK_SOURCE).categorical,
    )


def test_categories_rarer_than_five_public_rows_stay_out_of_the_vocabulary(
    public: pd.DataFrame,
) -> None:
    public = public.copy()
    public.loc[:3, "purpose"] = "wedding"  # four rows: too rare to learn an embedding for

    schema = FeatureSchema.fit(public, LABEL, exclude=(GROUP_COLUMN,))

    purpose = next(c for c in schema.categorical if c.name == "purpose")
    assert "wedding" not in purpose.vocabulary


def test_missing_numeric_values_are_imputed_with_the_public_median(
    schema: FeatureSchema, public: pd.DataFrame, bank: pd.DataFrame
) -> None:
    public_median = float(public["dti"].median())
    assert public_median != pytest.approx(float(bank["dti"].median()))
    with_gap, with_median = bank.head(3).copy(), bank.head(3).copy()
    with_gap.loc[0, "dti"] = np.nan
    with_median.loc[0, "dti"] = public_median

    np.testing.assert_array_equal(
        numeric_values(schema, with_gap, "dti"), numeric_values(schema, with_median, "dti")
    )


def test_excluded_columns_and_the_label_are_not_features(schema: FeatureSchema) -> None:
    assert GROUP_COLUMN not in schema.feature_names
    assert LABEL not in schema.feature_names
    assert "annual_income" in schema.feature_names
    assert "grade" in schema.feature_names


def test_transform_gives_model_ready_arrays(schema: FeatureSchema, bank: pd.DataFrame) -> None:
    table = schema.transform(bank, BANK_SOURCE)

    assert table.numeric.dtype == np.float32
    assert table.numeric.shape == (len(bank), len(schema.numeric))
    assert np.isfinite(table.numeric).all()
    assert table.categorical.dtype == np.int64
    assert table.categorical.shape == (len(bank), len(schema.categorical))
    assert table.label is not None
    np.testing.assert_array_equal(table.label, bank[LABEL].to_numpy(dtype=np.float32))


def test_rows_to_score_need_no_label(schema: FeatureSchema, bank: pd.DataFrame) -> None:
    table = schema.transform(bank.drop(columns=[LABEL]), BANK_SOURCE, require_label=False)

    assert table.label is None
    assert len(table.numeric) == len(bank)


# --- labels ---------------------------------------------------------------------------


def test_a_text_label_needs_to_be_told_which_value_means_default(public: pd.DataFrame) -> None:
    public = public.assign(**{LABEL: public[LABEL].map({0: "good", 1: "bad"})})

    with pytest.raises(DataError, match="--positive-label"):
        FeatureSchema.fit(public, LABEL, exclude=(GROUP_COLUMN,))
    schema = FeatureSchema.fit(public, LABEL, positive_label="bad", exclude=(GROUP_COLUMN,))

    assert (schema.positive_label, schema.negative_label) == ("bad", "good")
    np.testing.assert_array_equal(
        schema.encode_label(pd.Series(["bad", "good", "good"]), "x"), [1.0, 0.0, 0.0]
    )


def test_a_positive_label_that_is_not_a_label_value_is_a_data_error(
    public: pd.DataFrame,
) -> None:
    with pytest.raises(DataError, match="--positive-label '7'"):
        FeatureSchema.fit(public, LABEL, positive_label="7", exclude=(GROUP_COLUMN,))


# --- bad bank data: one DataError naming the source and the column ----------------------


def _drop(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda frame: frame.drop(columns=[column])


def _set(
    column: str, value: object, rows: int | None = None
) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def damage(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        if rows is None:
            frame[column] = value
            return frame
        if isinstance(value, str):
            frame[column] = frame[column].astype(object)
        elif isinstance(value, float):
            frame[column] = frame[column].astype(float)
        frame.loc[: rows - 1, column] = value
        return frame

    return damage


BAD_BANK_DATA = {
    "missing-label-column": (_drop(LABEL), LABEL, "is missing"),
    "missing-feature-column": (_drop("annual_income"), "annual_income", "is missing"),
    "label-with-three-values": (_set(LABEL, 2, rows=1), LABEL, "has value '2'"),
    "missing-label-value": (_set(LABEL, np.nan, rows=1), LABEL, "missing values"),
    "text-in-numeric-column": (_set("annual_income", "52k", rows=1), "annual_income", "52k"),
    "all-missing-numeric-column": (_set("dti", np.nan), "dti", "entirely missing"),
    "all-missing-categorical-column": (_set("grade", np.nan), "grade", "entirely missing"),
    "infinite-value": (_set("revol_util", np.inf, rows=1), "revol_util", "Inf"),
    "negative-infinite-value": (_set("revol_util", -np.inf, rows=1), "revol_util", "Inf"),
}


@pytest.mark.parametrize(("damage", "column", "problem"), BAD_BANK_DATA.values(), ids=BAD_BANK_DATA)
def test_bad_bank_data_is_one_data_error_naming_the_source_and_column(
    schema: FeatureSchema,
    bank: pd.DataFrame,
    damage: Callable[[pd.DataFrame], pd.DataFrame],
    column: str,
    problem: str,
) -> None:
    with pytest.raises(DataError) as error:
        schema.transform(damage(bank), BANK_SOURCE)

    message = str(error.value)
    assert message.startswith(f"{BANK_SOURCE}: ")
    assert f"'{column}'" in message
    assert problem in message
    assert "\n" not in message


BAD_PUBLIC_DATA = {
    "missing-label-column": (_drop(LABEL), LABEL, "is missing"),
    "label-with-three-values": (_set(LABEL, 2, rows=1), LABEL, "exactly 2 values"),
    "all-missing-column": (_set("dti", np.nan), "dti", "entirely missing"),
    "infinite-value": (_set("revol_util", np.inf, rows=1), "revol_util", "Inf"),
}


@pytest.mark.parametrize(
    ("damage", "column", "problem"), BAD_PUBLIC_DATA.values(), ids=BAD_PUBLIC_DATA
)
def test_bad_public_data_cannot_be_fitted(
    public: pd.DataFrame,
    damage: Callable[[pd.DataFrame], pd.DataFrame],
    column: str,
    problem: str,
) -> None:
    with pytest.raises(DataError) as error:
        FeatureSchema.fit(damage(public), LABEL, exclude=(GROUP_COLUMN,), source="public.csv")

    message = str(error.value)
    assert message.startswith("public.csv: ")
    assert f"'{column}'" in message
    assert problem in message


def test_an_empty_bank_table_is_a_data_error(schema: FeatureSchema, bank: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=f"{BANK_SOURCE}: table has no rows"):
        schema.transform(bank.head(0), BANK_SOURCE)


# --- persistence ------------------------------------------------------------------------


def test_json_round_trip_gives_an_equal_schema(schema: FeatureSchema, tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    schema.save(path)

    loaded = FeatureSchema.load(path)

    assert loaded == schema
    assert loaded.fingerprint == schema.fingerprint


def test_a_loaded_schema_transforms_exactly_like_the_fitted_one(
    schema: FeatureSchema, bank: pd.DataFrame, tmp_path: Path
) -> None:
    schema.save(tmp_path / "schema.json")
    loaded = FeatureSchema.load(tmp_path / "schema.json")

    original, again = schema.transform(bank, BANK_SOURCE), loaded.transform(bank, BANK_SOURCE)

    np.testing.assert_array_equal(original.numeric, again.numeric)
    np.testing.assert_array_equal(original.categorical, again.categorical)


def test_a_missing_schema_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        FeatureSchema.load(tmp_path / "schema.json")


@pytest.mark.parametrize(
    "content",
    ["not json at all", "[]", "null", '{"version": 99}', '{"version": 1}'],
    ids=["not-json", "a-list", "null", "future-version", "no-fields"],
)
def test_a_file_that_is_not_a_fedfin_schema_is_a_checkpoint_error(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "schema.json"
    path.write_text(content)

    with pytest.raises(CheckpointError, match="not a valid fedfin schema") as error:
        FeatureSchema.load(path)
    assert str(path) in str(error.value)


# --- column kinds from in-memory frames (common/cells.py's rule) -------------------------


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (lambda n: np.arange(n) % 2 == 0, "categorical"),  # bool dtype
        (lambda n: np.where(np.arange(n) % 2 == 0, "True", "False"), "categorical"),
        (lambda n: (np.arange(n) % 50).astype(str), "numeric"),  # numbers stored as text
        (lambda n: [f"{1000 + 7 * (i % 50):,}" for i in range(n)], "numeric"),  # "1,000"
        (lambda n: [f"${1000 + 7 * (i % 50):,.2f}" for i in range(n)], "numeric"),
    ],
    ids=["bool", "True/False text", "text numbers", "thousands", "currency"],
)
def test_bool_and_text_number_columns_fit_without_an_index_error(
    public: pd.DataFrame, bank: pd.DataFrame, values: Callable[[int], object], kind: str
) -> None:
    frame = public.assign(extra=values(len(public)))
    schema = FeatureSchema.fit(frame, LABEL, exclude=(GROUP_COLUMN,), source="public pool")

    names = [f.name for f in (schema.numeric if kind == "numeric" else schema.categorical)]
    assert "extra" in names
    schema.transform(bank.assign(extra=values(len(bank))), BANK_SOURCE)


def test_a_category_named_by_a_number_is_the_same_in_text_int_and_float_columns(
    public: pd.DataFrame, bank: pd.DataFrame
) -> None:
    codes = np.where(np.arange(len(public)) % 3 == 0, "X", (np.arange(len(public)) % 2).astype(str))
    schema = FeatureSchema.fit(public.assign(code=codes), LABEL, exclude=(GROUP_COLUMN,))
    as_float = bank.assign(code=np.where(bank.index % 2 == 0, 1.0, np.nan))

    assert set(categorical_codes(schema, as_float, "code")) == {0, ["0", "1", "X"].index("1") + 1}


def test_a_word_among_public_numbers_is_one_data_error_naming_the_value(
    public: pd.DataFrame,
) -> None:
    dti = public["dti"].astype(object)
    dti[3] = "twelve"

    with pytest.raises(DataError, match=r"'dti' must be numeric, but row 4 has 'twelve'"):
        FeatureSchema.fit(public.assign(dti=dti), LABEL, exclude=(GROUP_COLUMN,))


# --- row identifiers ----------------------------------------------------------------------


def _with_identifiers(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = len(frame)
    return frame.assign(
        **{
            "Unnamed: 0": np.arange(rows),  # a saved pandas index
            "LoanID": rng.permutation(rows) * 7 + 100_000,  # named, shuffled, sparse
            "SK_ID_CURR": rng.permutation(rows) + 5,
            "application_key": [f"A{rng.integers(1e12):013d}" for _ in range(rows)],
            "row": rng.permutation(np.arange(3 * rows))[:rows],  # named, a split's subset
        }
    ).sample(frac=1.0, random_state=seed)  # also out of row order


def test_row_identifiers_are_not_features_and_each_is_named_with_why(
    public: pd.DataFrame,
) -> None:
    fitted = FeatureSchema.fit(_with_identifiers(public, 1), LABEL, exclude=(GROUP_COLUMN,))
    found = dict(fitted.identifier_columns)
    assert set(found) == {"Unnamed: 0", "LoanID", "SK_ID_CURR", "application_key", "row"}
    assert not set(found) & set(fitted.feature_names)
    plain = FeatureSchema.fit(public, LABEL, exclude=(GROUP_COLUMN,))
    assert fitted.feature_names == plain.feature_names
    assert plain.identifier_columns == () and plain.identifier_notes() == []
    notes = fitted.identifier_notes()
    assert len(notes) == 5 and all("not used as a feature" in n for n in notes)
    assert FeatureSchema.from_json(fitted.to_json()) == fitted


def test_features_that_merely_look_like_identifiers_stay_features(
    public: pd.DataFrame,
) -> None:
    rng = np.random.default_rng(3)
    rows = len(public)
    frame = public.assign(
        paid_amount=rng.integers(0, 10 * rows, rows),  # 'paid' holds no 'id' token
        branch_id=rng.integers(0, 20, rows),  # named, but a code shared by many loans
        income_exact=rng.normal(50_000, 9_000, rows).round(2),  # distinct, not whole
        grid=rng.choice(["A", "B", "C"], rows),
    )
    fitted = FeatureSchema.fit(frame, LABEL, exclude=(GROUP_COLUMN,))
    assert fitted.identifier_columns == ()
    assert {"paid_amount", "branch_id", "income_exact", "grid"} <= set(fitted.feature_names)


def test_a_bank_table_may_carry_its_own_identifier_but_no_other_unknown_column(
    schema: FeatureSchema, bank: pd.DataFrame
) -> None:
    with_id = bank.assign(customer_id=np.arange(len(bank)) + 9_000)
    plain = schema.transform(bank, BANK_SOURCE, strict_columns=True)
    kept = schema.transform(with_id, BANK_SOURCE, strict_columns=True)
    assert np.array_equal(plain.numeric, kept.numeric)
    with pytest.raises(DataError, match="column 'internal_score' is not in the encoder's"):
        schema.transform(
            with_id.assign(internal_score=bank.index % 7), BANK_SOURCE, strict_columns=True
        )


def test_a_schema_without_identifiers_keeps_its_fingerprint(schema: FeatureSchema) -> None:
    assert "identifier_columns" not in schema.to_json()
