"""UCI Heart Disease as FLamby's Fed-Heart-Disease: four hospitals, a natural cross-silo federation.

The preprocessing reproduces FLamby's (described in ``shared/data/heart_disease/README.md``), so results can be
compared with its benchmark: drop slope, ca and thal; drop rows with a missing value; label ``num > 0`` as 1;
split each center 66/34 (scikit-learn ``train_test_split``, ``random_state=43``, stratified on the label only
when both classes occur more than twice); one-hot ``cp`` and ``restecg`` over the pooled centers, dropping
the first category; standardize each center with its own train split's mean and unbiased std, plus 1e-9.
Within a split, rows keep their file order, as in FLamby's ``FedHeartDisease(center, train)``.

Rows kept / train / test: Cleveland 303/199/104, Hungary 261/172/89, Switzerland 46/30/16, VA 130/85/45.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import DataError
from fedloom.data.base import ArrayData, Dataset
from fedloom.data.datasets.download import obtain_files

__all__ = ["FEATURE_NAMES", "FILES", "GROUP_NAMES", "MIRRORS", "load_heart_disease"]

#: The four centers' files, in center order, with their md5 digests.
FILES = {
    "processed.cleveland.data": "2d91a8ff69cfd9616aa47b59d6f843db",
    "processed.hungarian.data": "22e96bee155b5973568101c93b3705f6",
    "processed.switzerland.data": "9a87f7577310b3917730d06ba9349e20",
    "processed.va.data": "4249d03ca7711e84f4444768c9426170",
}
GROUP_NAMES = ("cleveland", "hungary", "switzerland", "va")
MIRRORS = ("https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/",)

# The 14 columns of a processed.*.data file.
_COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip
_KEPT = tuple(c for c in _COLUMNS if c not in ("slope", "ca", "thal", "num"))
_CATEGORICAL = ("cp", "restecg")
_PLAIN = tuple(c for c in _KEPT if c not in _CATEGORICAL)
#: The 13 features, in column order (pandas ``get_dummies`` order: plain columns, then the dummies).
FEATURE_NAMES = (*_PLAIN, "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")

_TRAIN_FRACTION = 0.66
_SPLIT_SEED = 43
_EPSILON = 1e-9


def load_heart_disease(
    data_dir: str | Path | None = None, download: bool = True, cache_dir: str | Path | None = None
) -> Dataset:
    """Fed-Heart-Disease as a :class:`Dataset` named ``"heart_disease"``: 13 features, 2 classes, 4 groups.

    ``train`` is the four centers' train splits one after the other (``train_groups`` holds the center id,
    0-3, in :data:`GROUP_NAMES` order), and likewise ``test``. ``x`` is float32 with columns
    :data:`FEATURE_NAMES`; ``y`` is int64, 1 for heart disease. Files come from ``data_dir`` (or
    ``$FEDLOOM_DATA``, with or without a ``heart_disease/`` subfolder), else the cache, else the UCI
    repository when ``download`` is true; every file's md5 is checked.

    Raises:
        DataError: a folder or file is missing, a file fails its checksum, cannot be downloaded, or cannot be
            parsed.
    """
    paths = obtain_files(
        FILES,
        dataset="heart_disease",
        data_dir=data_dir,
        cache_dir=cache_dir,
        mirrors=MIRRORS,
        download=download,
    )
    centers = [_complete_rows(_parse(path)) for path in paths.values()]
    # Categories come from the pooled frame, so every center gets the same dummy columns.
    categories = {c: np.unique(np.concatenate([x[:, _KEPT.index(c)] for x, _ in centers])) for c in _CATEGORICAL}
    names = (*_PLAIN, *(f"{c}_{v:g}" for c in _CATEGORICAL for v in categories[c][1:]))
    if names != FEATURE_NAMES:  # only possible with files other than the verified originals
        raise DataError(f"heart disease features came out as {names}, expected {FEATURE_NAMES}")

    splits = []
    for raw_x, y in centers:
        # FLamby computes the statistics on float32 features; doing the same keeps results within float32 rounding.
        x = _encode(raw_x, categories).astype(np.float32)
        train, test = _split(y)
        mean = x[train].mean(axis=0, dtype=np.float64)
        std = x[train].std(axis=0, ddof=1, dtype=np.float64)
        standardized = ((x - mean) / (std + _EPSILON)).astype(np.float32)
        splits.append((ArrayData(standardized[train], y[train]), ArrayData(standardized[test], y[test])))
    return Dataset.from_groups("heart_disease", splits, num_classes=2, group_names=GROUP_NAMES)


def _parse(path: Path) -> npt.NDArray[np.float64]:
    """A processed.*.data file as a float64 table of 14 columns, ``?`` read as NaN."""
    rows: list[list[float]] = []
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        if len(fields) != len(_COLUMNS):
            raise DataError(f"{path}:{number}: {len(fields)} fields, expected {len(_COLUMNS)}")
        try:
            rows.append([math.nan if f.strip() == "?" else float(f) for f in fields])
        except ValueError as exc:
            raise DataError(f"{path}:{number}: {exc}") from exc
    return np.array(rows, dtype=np.float64).reshape(-1, len(_COLUMNS))


def _complete_rows(table: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Kept features and binary labels of the rows with no missing value (after dropping slope, ca, thal)."""
    columns = [_COLUMNS.index(c) for c in (*_KEPT, "num")]
    kept = table[:, columns]
    kept = kept[~np.isnan(kept).any(axis=1)]
    return kept[:, :-1], (kept[:, -1] > 0).astype(np.int64)


def _encode(x: npt.NDArray[np.float64], categories: dict[str, npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
    """Plain columns, then one 0/1 column per category of cp and restecg except the first."""
    plain = x[:, [_KEPT.index(c) for c in _PLAIN]]
    dummies = [(x[:, [_KEPT.index(c)]] == categories[c][1:]).astype(np.float64) for c in _CATEGORICAL]
    return np.hstack([plain, *dummies])


def _split(y: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Train and test row indices of one center, each in file order (as FLamby keeps them)."""
    # Stratifying needs a few rows of each class; Switzerland has too few negatives.
    stratify = y if (np.bincount(y, minlength=2) > 2).all() else None
    from sklearn.model_selection import train_test_split  # imported late: slow, and only loading needs it

    train, test = train_test_split(
        np.arange(len(y)),
        train_size=_TRAIN_FRACTION,
        random_state=_SPLIT_SEED,
        shuffle=True,
        stratify=stratify,
    )
    return np.sort(train), np.sort(test)
