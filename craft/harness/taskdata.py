"""Labelled text splits out of raw tables: reading local files, encoding labels, holding out splits.

The generic half of :mod:`craft.harness.tasks`: it knows nothing of GLUE or tweets. Every function raises
a one-line ``ValueError`` naming the split, the column or the label at fault, and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets

__all__ = [
    "LOCAL_FORMATS",
    "carve_splits",
    "column_values",
    "encode_splits",
    "error_reason",
    "local_files",
    "read_table",
    "require_columns",
    "seeded_subset",
]

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {"csv": ("csv",), "json": ("json", "jsonl"), "parquet": ("parquet",)}  # task prefix: file extensions


def error_reason(err: BaseException) -> str:
    """First line of the most telling message in an exception chain (datasets wraps the parser's)."""
    while type(err).__name__ == "DatasetGenerationError" and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def column_values(ds: datasets.Dataset, column: str) -> np.ndarray:
    """One column as a numpy array (object dtype for strings, None where missing)."""
    # The arrow format reads a whole column at once; the default formats go row by row.
    return ds.with_format("arrow")[:][column].to_numpy(zero_copy_only=False)


def require_columns(ds: datasets.Dataset, columns: list[str], where: str, fix: str) -> None:
    """Raise a ValueError naming the first missing column, the columns there are, and ``fix``."""
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"{where} has no column {column!r} (its columns: {ds.column_names}); {fix}")


def local_files(fmt: str, where: str) -> tuple[Path, dict[str, Path]]:
    """The file of each given split: PATH itself (train), or train/validation/test.<ext> in PATH."""
    if not where.strip():
        raise ValueError(f"{fmt}: needs a path, e.g. {fmt}:data/train.{fmt} or {fmt}:data/ (a directory)")
    path = Path(where).expanduser().resolve()
    if path.is_file():
        return path, {"train": path}
    if not path.is_dir():
        raise ValueError(f"no file or directory at {path}; give an existing path after {fmt}:")
    files = {}
    for split in ("train", "validation", "test"):
        found = [path / f"{split}.{ext}" for ext in LOCAL_FORMATS[fmt] if (path / f"{split}.{ext}").is_file()]
        if found:
            files[split] = found[0]
    if "train" not in files:
        ext = LOCAL_FORMATS[fmt][0]
        raise ValueError(
            f"{path} holds no train.{ext}; a task directory holds train.{ext}, optionally validation.{ext} and test.{ext}"
        )
    return path, files


def read_table(fmt: str, file: Path) -> datasets.Dataset:
    """One file as a Dataset, through datasets' csv / json / parquet builders; errors in one line."""
    import datasets

    # csv: only empty cells are missing (pandas would also read "NA" or "null" texts as missing);
    # stray non-UTF-8 bytes become U+FFFD as in the tweets corpus.
    options = {"keep_default_na": False, "na_values": [""], "encoding_errors": "replace"} if fmt == "csv" else {}
    try:  # datasets keeps an Arrow copy in its cache: a second load does not parse again
        return datasets.load_dataset(fmt, data_files=str(file), split="train", **options)
    except Exception as err:  # parser errors of pandas / pyarrow, wrapped by datasets
        reason = error_reason(err)
        if "corresponds to no data" in reason:
            raise ValueError(f"{file} holds no rows; give it labelled rows") from None
        raise ValueError(f"cannot read {file} as {fmt} ({reason}); check the file's format") from None


def _label_key(value: Any) -> str:
    """The class name of a label value: 1, 1.0 and "1" are all class "1"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))


def encode_splits(
    raw: dict[str, datasets.Dataset],
    text_fields: tuple[str, ...],
    label_column: str,
    task: str,
    label_names: tuple[str, ...] | None = None,
) -> tuple[dict[str, datasets.Dataset], tuple[str, ...] | None]:
    """In-memory splits of the text fields and an encoded ``label``; and the class names.

    Args:
        raw: the splits as read, ``train`` among them.
        text_fields: the text columns, kept under their names (as strings).
        label_column: the column of labels, renamed ``label``.
        task: the task's name, for errors.
        label_names: the classes in id order, or None to take them from the training labels:
            numbers that are not all integral mean regression (names None); anything else means
            classes named by the sorted unique labels (numerically when all are numbers), so
            1, 1.0 and "1" are class "1".

    Returns:
        The splits (``label``: ``ClassLabel`` or float32) and the class names (None: regression).
        Rows whose text is empty are dropped, with a logged warning.

    Raises:
        ValueError: a missing column, a missing label, an empty split, one class only, or a label
            outside the training labels (regression: one that is not a number).
    """
    from datasets import ClassLabel, Dataset, Features, Value

    columns: dict[str, tuple[list[list[str]], list[Any]]] = {}
    for split, ds in raw.items():
        where = f"split {split!r} of {task}"
        require_columns(ds, list(text_fields), where, "set data.text_columns to one or two of them")
        require_columns(ds, [label_column], where, "set data.label_column to the column of labels")
        texts = [["" if _is_missing(v) else str(v) for v in column_values(ds, c)] for c in text_fields]
        labels = list(column_values(ds, label_column))
        keep = [all(t[i].strip() for t in texts) for i in range(len(ds))]
        if not all(keep):
            logger.warning("%s: dropped %d row(s) with empty text", where, keep.count(False))
        missing = [i for i, v in enumerate(labels) if keep[i] and _is_missing(v)]
        if missing:
            raise ValueError(
                f"{len(missing)} row(s) of {where} have no label in column {label_column!r} "
                f"(first: data row {missing[0] + 1}); fill in or remove those rows"
            )
        columns[split] = ([[t[i] for i in range(len(ds)) if keep[i]] for t in texts], [v for v, k in zip(labels, keep) if k])
        if not columns[split][1]:
            raise ValueError(f"{where} is empty; give it labelled rows with text")

    train_labels = columns["train"][1]
    numeric = all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in train_labels
    )
    integral = numeric and all(float(v).is_integer() for v in train_labels)
    if label_names is None and integral:
        label_names = tuple(str(k) for k in sorted({int(v) for v in train_labels}))
    elif label_names is None and not numeric:
        label_names = tuple(sorted({_label_key(v) for v in train_labels}))
    feature: Any = Value("float32")  # regression: numbers that are not all integral
    if label_names is not None:
        if len(label_names) < 2:
            raise ValueError(f"the training labels of {task} hold one class only {label_names}; a task needs at least two")
        feature = ClassLabel(names=list(label_names))
        ids = {name: i for i, name in enumerate(label_names)}

    out = {}
    for split, (texts, labels) in columns.items():
        if label_names is not None:
            unknown = next((v for v in labels if _label_key(v) not in ids), None)
            if unknown is not None:
                raise ValueError(
                    f"label {_label_key(unknown)!r} in split {split!r} of {task} is not a training label "
                    f"{list(label_names)}; fix the label or add examples of it to the training data"
                )
            labels = [ids[_label_key(v)] for v in labels]
        else:
            bad = next((v for v in labels if isinstance(v, (str, bool))), None)
            if bad is not None:
                raise ValueError(f"label {bad!r} in split {split!r} of {task} is not a number; {task} is a regression task")
        features = Features({**{c: Value("string") for c in text_fields}, "label": feature})
        out[split] = Dataset.from_dict({**dict(zip(text_fields, texts)), "label": labels}, features=features)
    return out, label_names


def _index_split(n: int, fraction: float, labels: np.ndarray | None, seed: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices of a seeded (stratified when ``labels`` are given) two-way split."""
    # sklearn on indices: datasets' own stratified train_test_split formats every row in Python.
    from sklearn.model_selection import train_test_split

    try:
        keep, held = train_test_split(np.arange(n), test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as err:
        how = " stratified by label" if labels is not None else ""
        raise ValueError(
            f"cannot split {n} training rows of {task}{how} ({err}); give validation/test files or more data"
        ) from None
    return np.sort(keep), np.sort(held)


def carve_splits(
    splits: dict[str, datasets.Dataset], validation_fraction: float, test_fraction: float, seed: int, stratify: bool, task: str
) -> dict[str, datasets.Dataset]:
    """Add the validation and test splits that ``splits`` lacks, held out of its training split.

    Args:
        splits: ``train`` and any given ``validation`` / ``test``, each with a ``label`` column.
        validation_fraction, test_fraction: shares of the training rows to hold out for a
            missing split (0: no test split; a missing validation split needs a share).
        seed: seeds the split (sklearn's ``train_test_split``: ceil(share * rows) held out).
        stratify: keep the class proportions (classification labels).
        task: the task's name, for errors.

    Returns:
        ``train``, ``validation`` and, where there is one, ``test``; rows kept in file order.
    """
    frac = {
        "validation": validation_fraction if "validation" not in splits else 0.0,
        "test": test_fraction if "test" not in splits else 0.0,
    }
    if "validation" not in splits and frac["validation"] == 0:
        raise ValueError(
            f"{task} has no validation split and data.validation_fraction is 0; give one or set the fraction above 0"
        )
    held = frac["validation"] + frac["test"]
    if held == 0:
        return splits
    train = splits["train"]
    labels = column_values(train, "label") if stratify else None
    keep, rest = _index_split(len(train), held, labels, seed, task)
    out = {**splits, "train": train.select(keep)}
    if frac["validation"] and frac["test"]:
        sub = labels[rest] if stratify else None
        val, test = _index_split(len(rest), frac["test"] / held, sub, seed, task)
        out["validation"], out["test"] = train.select(rest[val]), train.select(rest[test])
    else:
        out["validation" if frac["validation"] else "test"] = train.select(rest)
    return {split: out[split] for split in ("train", "validation", "test") if split in out}


def seeded_subset(ds: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """``n`` rows of ``ds`` drawn with ``seed``, in their original order (all of it for None)."""
    if n is None or n >= len(ds):
        return ds
    return ds.select(np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False)))
