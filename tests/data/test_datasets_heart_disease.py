"""Fed-Heart-Disease from the shared UCI files: FLamby's row counts, features, split and standardization."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from fedloom.core.errors import DataError
from fedloom.data.base import Dataset
from fedloom.data.datasets import load_heart_disease
from fedloom.data.datasets.heart_disease import FEATURE_NAMES, FILES

# FLamby's published rows kept / train / test per center.
COUNTS = {"cleveland": (303, 199, 104), "hungary": (261, 172, 89), "switzerland": (46, 30, 16), "va": (130, 85, 45)}
# Positive (num > 0) rows kept per center, counted from the files.
POSITIVES = {"cleveland": 139, "hungary": 98, "switzerland": 45, "va": 101}


@pytest.fixture
def heart_dir(shared_data: Path) -> Path:
    return shared_data / "heart_disease"


@pytest.fixture
def dataset(heart_dir: Path, tmp_path: Path) -> Dataset:
    return load_heart_disease(data_dir=heart_dir, download=False, cache_dir=tmp_path)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLOOM_DATA", raising=False)
    monkeypatch.delenv("FEDLOOM_CACHE", raising=False)


def test_row_counts_per_center(dataset: Dataset) -> None:
    assert dataset.group_names == tuple(COUNTS)
    assert dataset.train_groups is not None
    assert dataset.test_groups is not None
    for center, (name, (kept, train, test)) in enumerate(COUNTS.items()):
        n_train = int((dataset.train_groups == center).sum())
        n_test = int((dataset.test_groups == center).sum())
        assert (n_train + n_test, n_train, n_test) == (kept, train, test), name
        positives = dataset.train.y[dataset.train_groups == center].sum()
        positives += dataset.test.y[dataset.test_groups == center].sum()
        assert positives == POSITIVES[name]
    assert len(dataset.train) + len(dataset.test) == 740
    # centers come one after the other
    assert np.all(np.diff(dataset.train_groups) >= 0)
    assert np.all(np.diff(dataset.test_groups) >= 0)


def test_shapes_types_and_labels(dataset: Dataset) -> None:
    assert dataset.name == "heart_disease"
    assert dataset.num_classes == 2
    assert len(FEATURE_NAMES) == 13
    for split in (dataset.train, dataset.test):
        assert split.x.shape == (len(split), 13)
        assert split.x.dtype == np.float32
        assert split.y.dtype == np.int64
        assert set(np.unique(split.y).tolist()) == {0, 1}
        assert np.isfinite(split.x).all()


def test_each_center_is_standardized_on_its_own_train_split(dataset: Dataset) -> None:
    assert dataset.train_groups is not None
    for center in range(4):
        x = dataset.train.x[dataset.train_groups == center].astype(np.float64)
        std = x.std(axis=0, ddof=1)
        constant = std < 1e-6  # e.g. Switzerland's chol, always 0 (= missing) in the file
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(std[~constant], 1.0, atol=1e-5)
        assert np.all(x[:, constant] == 0)
    assert FEATURE_NAMES.index("chol") in np.flatnonzero(dataset.train.x[dataset.train_groups == 2].std(axis=0) == 0)


def test_cleveland_matches_an_independent_derivation(dataset: Dataset, heart_dir: Path) -> None:
    # Cleveland has no missing value in the kept columns, so the FLamby recipe is short to restate here.
    raw = np.genfromtxt(heart_dir / "processed.cleveland.data", delimiter=",", usecols=range(10))
    num = np.genfromtxt(heart_dir / "processed.cleveland.data", delimiter=",", usecols=[13])
    y = (num > 0).astype(np.int64)
    train, test = train_test_split(np.arange(303), train_size=0.66, random_state=43, shuffle=True, stratify=y)
    plain = raw[:, [0, 1, 3, 4, 5, 7, 8, 9]]
    dummies = [raw[:, [2]] == [2, 3, 4], raw[:, [6]] == [1, 2]]
    x = np.hstack([plain, *dummies]).astype(np.float64)
    rows = np.sort(train)  # FLamby keeps file order within a split
    mean, std = x[rows].mean(axis=0), x[rows].std(axis=0, ddof=1)
    assert dataset.train_groups is not None
    assert dataset.test_groups is not None
    for split, got, groups in ((train, dataset.train, dataset.train_groups), (test, dataset.test, dataset.test_groups)):
        order = np.sort(split)
        np.testing.assert_allclose(got.x[groups == 0], (x[order] - mean) / (std + 1e-9), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.y[groups == 0], y[order])


def test_loading_is_deterministic(dataset: Dataset, heart_dir: Path, tmp_path: Path) -> None:
    again = load_heart_disease(data_dir=heart_dir, download=False, cache_dir=tmp_path)
    for a, b in ((dataset.train, again.train), (dataset.test, again.test)):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)


def test_found_through_fedloom_data(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLOOM_DATA", str(shared_data))  # the parent of heart_disease/
    assert len(load_heart_disease(download=False, cache_dir=tmp_path).train) == 486


def test_tampered_local_copy_is_rejected(heart_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "heart"
    local.mkdir()
    for name in FILES:
        shutil.copy(heart_dir / name, local / name)
    target = local / "processed.va.data"
    target.chmod(0o644)
    target.write_text(target.read_text().replace("63,1,4,140", "64,1,4,140", 1))
    with pytest.raises(DataError, match=r"processed\.va\.data.*" + FILES["processed.va.data"]):
        load_heart_disease(data_dir=local, download=False, cache_dir=tmp_path / "cache")


def test_missing_folder_or_file(heart_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_heart_disease(data_dir=tmp_path / "nope", download=False, cache_dir=tmp_path)
    local = tmp_path / "partial"
    local.mkdir()
    shutil.copy(heart_dir / "processed.cleveland.data", local)
    with pytest.raises(DataError, match=r"processed\.hungarian\.data"):
        load_heart_disease(data_dir=local, download=False, cache_dir=tmp_path / "cache")
