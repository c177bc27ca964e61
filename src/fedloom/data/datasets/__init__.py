"""Dataset loaders, each returning a :class:`fedloom.data.base.Dataset`.

Real datasets are read from a local folder (``data_dir`` or ``$FEDLOOM_DATA``) or downloaded once into a
cache (``$FEDLOOM_CACHE``, default ``~/.cache/fedloom``), with every file checksum-verified; see
:mod:`fedloom.data.datasets.download`.
"""

from fedloom.data.datasets.digits import load_digits
from fedloom.data.datasets.heart_disease import load_heart_disease
from fedloom.data.datasets.mnist import load_mnist
from fedloom.data.datasets.synthetic import load_synthetic

__all__ = ["load_digits", "load_heart_disease", "load_mnist", "load_synthetic"]
