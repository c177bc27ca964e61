"""Synthetic(alpha, beta): the heterogeneous multinomial-logistic data of FedProx (Li et al., 2020)."""

from __future__ import annotations

import math

import numpy as np

from fedloom.core.counting import share_of
from fedloom.core.errors import ConfigError
from fedloom.data.base import ArrayData, Dataset

__all__ = ["load_synthetic"]


def load_synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    test_fraction: float = 0.1,
    *,
    iid: bool = False,
) -> Dataset:
    """Generate Synthetic(alpha, beta) (Li et al., "Federated Optimization in Heterogeneous Networks", 2020,
    after Shamir et al., 2014) as a :class:`Dataset` whose natural groups are the devices.

    Each device ``k`` labels its points with its own softmax-regression model and draws its points around its
    own centre:

    - ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)`` (``alpha`` and ``beta`` are standard deviations, as in
      the paper's reference code);
    - the model ``W_k`` (``num_classes x dim``) and ``b_k`` have entries ``~ N(u_k, 1)``;
    - the centre ``v_k`` has entries ``~ N(B_k, 1)``;
    - ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal, ``Sigma_jj = j ** -1.2`` (later features vary less);
    - ``y = argmax(softmax(W_k x + b_k))``.

    ``beta`` controls how much the devices' *inputs* differ (feature skew). ``alpha`` is meant to control how
    much their *models* differ, but as the paper defines it, it cannot: ``u_k`` is added to every entry of
    ``W_k`` and ``b_k``, which shifts all logits by the same ``u_k * (sum(x) + 1)``, and softmax ignores a
    common shift. So ``alpha`` leaves every label unchanged (here and in the paper's reference code); the
    devices' models still differ, through their own draws of ``W_k`` and ``b_k``. It is kept, faithfully, so
    that published settings such as Synthetic(0.5, 0.5) mean what they meant. With ``alpha = beta = 0``
    every device draws its model and centre from the same distribution, but each still has its own ``W_k``
    and ``v_k``. ``iid=True`` gives the
    paper's Synthetic-IID instead: one shared ``(W, b)`` with entries ``~ N(0, 1)`` and ``v_k = 0`` for all
    devices; ``alpha`` and ``beta`` must then be 0.

    Device sizes follow a power law, ``floor(lognormal(4, 2)) + 50`` as in the reference setup (no cap: a
    rare device can hold tens of thousands of points). Each device's points are split at random into train
    and test, ``n_k - floor((1 - test_fraction) * n_k)`` of them to test (at most ``n_k - 1``); the default
    0.1 is the 90/10 split of the FedProx reference code. Everything is drawn from one generator seeded
    with ``seed``, in an order that does not depend on ``alpha`` or ``beta``, so changing
    only them rescales the same draws.

    Returns:
        ``x`` float32 ``(n, dim)``, ``y`` int64 in ``[0, num_classes)``, ``train_groups``/``test_groups``
        the device ids, ``group_names`` ``"device-00"``, ``"device-01"``, ...; name ``"synthetic"``.

    Raises:
        ConfigError: ``alpha`` or ``beta`` negative or not finite (or non-zero with ``iid``), fewer than 1
            client or dimension, fewer than 2 classes, ``test_fraction`` outside ``[0, 1)``.
    """
    _check(alpha, beta, num_clients, dim, num_classes, test_fraction, iid)
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50
    u = alpha * rng.standard_normal(num_clients)
    centres = beta * rng.standard_normal(num_clients)
    shared_w = rng.standard_normal((num_classes, dim))
    shared_b = rng.standard_normal(num_classes)
    scale = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj = j ** -1.2

    devices = []
    for k in range(num_clients):
        v = centres[k] + rng.standard_normal(dim)
        w = u[k] + rng.standard_normal((num_classes, dim))
        b = u[k] + rng.standard_normal(num_classes)
        if iid:
            v, w, b = np.zeros(dim), shared_w, shared_b
        x = v + rng.standard_normal((int(sizes[k]), dim)) * scale
        # softmax is monotone, so the argmax of the logits is the argmax of the probabilities
        y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
        order = rng.permutation(len(y))
        n_test = min(len(y) - share_of(1.0 - test_fraction, len(y)), len(y) - 1)  # keep a train point
        test, train = order[:n_test], order[n_test:]
        devices.append(
            (ArrayData(x[train].astype(np.float32), y[train]), ArrayData(x[test].astype(np.float32), y[test]))
        )

    width = max(2, len(str(num_clients - 1)))
    names = tuple(f"device-{k:0{width}d}" for k in range(num_clients))
    return Dataset.from_groups("synthetic", devices, num_classes, names)


def _check(
    alpha: float, beta: float, num_clients: int, dim: int, num_classes: int, test_fraction: float, iid: bool
) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    if iid and (alpha != 0 or beta != 0):
        raise ConfigError("iid=True shares one model and centre, so alpha and beta must be 0")
    if num_clients < 1 or dim < 1:
        raise ConfigError(f"need num_clients >= 1 and dim >= 1, got {num_clients} and {dim}")
    if num_classes < 2:
        raise ConfigError(f"need num_classes >= 2, got {num_classes}")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
