"""What the server loop checks about a round's updates beyond their shape: how much each site may weigh, and
whether its change to the model is believable.

A site that sends a well-formed update can still lie. Three rules bound what one such site can do, the same in
simulation and deployment (the loop applies them, whatever runs the clients):

- **Declared examples.** A site declares, when it joins, how many training examples it holds (a deployed site
  sends its data's size in its hello; see :class:`~fedloom.runtime.grid.Declaring`). Every ``num_examples`` it
  reports later is counted as at most that.
- **An update guard.** An update whose norm of change (``||reply - sent||`` over the whole model) is more than
  ``update_guard`` times the median of the round's update norms is refused, naming the site, its norm and the
  median. The median is the lower one (with two updates, the smaller), so one site of two cannot pull it up.
- **A cap on any one site's share** of the round's weight (``max_share``): the largest weights are lowered to a
  common level ``t`` with ``t = max_share * sum(weights)`` after the cap, so no site weighs more than
  ``max_share`` of the round. It applies where it can be met without making every weight equal: with more than
  ``1 / max_share`` updates (three or more for the default ``0.5``).

Caps and refusals are kept per site (:attr:`RoundScreen.capped`, :attr:`RoundScreen.refused`) for the round's
records. The guard and the share cap need the round's updates all at once, so while either is on the server
holds the round's accepted updates (their size once each) until the last is in, and only then folds them into
the aggregate, in the order their clients were asked: whenever no update is refused or capped, the aggregate is
bit for bit what an unscreened run folding them in that order gives (a simulation's), and it does not depend on
who answered first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from fedloom.core.params import Params
from fedloom.core.results import FitResult

__all__ = ["RoundScreen", "change_norm", "share_cap"]

_BLOCK = 1 << 17  # values per step of change_norm: 1 MiB of float64 scratch


def change_norm(sent: Params, reply: Params) -> float:
    """The L2 norm of ``reply - sent`` over every floating-point array both hold in the same shape, in float64, a
    block at a time (no temporary the size of a model) and scaled as it goes, so that a change near float64's
    largest value gives its norm rather than an overflow (``inf`` only where the difference itself overflows)."""
    scale, squares = 0.0, 1.0  # the norm is scale * sqrt(squares)
    scratch = np.empty(_BLOCK, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for name, before in sent.items():
            after = reply.get(name)
            if after is None or after.shape != before.shape or not np.issubdtype(after.dtype, np.floating):
                continue
            a, b = after.reshape(-1), before.reshape(-1)
            for start in range(0, a.size, _BLOCK):
                stop = min(start + _BLOCK, a.size)
                diff = scratch[: stop - start]
                np.subtract(a[start:stop], b[start:stop], out=diff, dtype=np.float64)
                np.abs(diff, out=diff)
                largest = float(diff.max(initial=0.0))
                if not math.isfinite(largest):
                    return math.inf
                if largest == 0.0:
                    continue
                if largest > scale:
                    squares = squares * (scale / largest) ** 2 if scale else 0.0
                    scale = largest
                diff /= scale
                squares += float(np.dot(diff, diff))
    return scale * math.sqrt(squares) if scale else 0.0


def share_cap(weights: Mapping[str, int], max_share: float) -> dict[str, int]:
    """The weights, the largest lowered so that none is more than ``max_share`` of their sum; only those that
    change are returned. Nothing changes where the cap holds already, or where it could hold only by making
    every weight equal (``len(weights) * max_share <= 1``).

    Water-filling: with the ``j`` largest weights lowered to ``t`` and the rest summing to ``R``,
    ``t = max_share * (j * t + R)``, so ``t = max_share * R / (1 - max_share * j)``, for the smallest ``j`` whose
    ``t`` is at least the next weight down. ``t`` is rounded down to a whole number of examples, at least 1.

    >>> share_cap({"a": 10**12, "b": 600, "c": 500}, 0.5)
    {'a': 1100}
    """
    total = sum(weights.values())
    if len(weights) * max_share <= 1 or total <= 0 or max(weights.values()) <= max_share * total:
        return {}
    order = sorted(weights, key=lambda cid: weights[cid], reverse=True)
    rest = total
    for j, cid in enumerate(order, start=1):
        rest -= weights[cid]
        if max_share * j >= 1 or rest <= 0:
            break  # only equal weights, or none but the capped, could meet the cap
        level = max_share * rest / (1 - max_share * j)
        following = weights[order[j]] if j < len(order) else 0
        if level >= following:
            cap = max(1, math.floor(level))
            return {c: cap for c in order[:j] if weights[c] > cap}
    return {}


class RoundScreen:
    """One round's screening of fit updates: :meth:`claim` caps a reply's examples at what its site declared;
    :meth:`measure` notes its norm of change and :meth:`hold` keeps it; :meth:`release` applies the update guard and
    the share cap to what was held and returns the rest, in the order they came, to be aggregated.

    ``declared`` gives what a site declared when it joined (``None``: nothing). ``update_guard`` and ``max_share``
    as the module says; with both ``None`` nothing is held (:attr:`holds` is false) and updates go straight on to
    the aggregate, as they arrive. ``measured=False`` (replies of another layout than what was sent) measures no
    norms, and so guards nothing."""

    def __init__(
        self,
        *,
        update_guard: float | None,
        max_share: float | None,
        declared: Callable[[str], int | None] | None = None,
        measured: bool = True,
    ) -> None:
        self.measured = measured  # whether a reply's change can be measured against what its client was sent
        self._guard = update_guard
        self._share = max_share
        self._declared = declared
        self._held: list[tuple[str, FitResult]] = []
        self.norms: dict[str, float] = {}  # client id -> its update's norm of change
        self.capped: dict[str, tuple[int, int, str]] = {}  # client id -> (claimed, counted, why)
        self.refused: dict[str, str] = {}  # client id -> why the guard refused its update

    @property
    def holds(self) -> bool:
        """Whether updates are held until the round's last is in (the guard or the share cap is on)."""
        return self._guard is not None or self._share is not None

    def claim(self, client_id: str, result: FitResult) -> FitResult:
        """``result`` with its ``num_examples`` capped at what ``client_id`` declared when it joined."""
        declared = self._declared(client_id) if self._declared is not None else None
        if declared is None or result.num_examples <= declared:
            return result
        self._cap(client_id, result.num_examples, declared, f"declared {declared} when it joined")
        return replace(result, num_examples=declared)

    def measure(self, client_id: str, sent: Params, result: FitResult) -> None:
        """Note the norm of ``result``'s change from ``sent``."""
        self.norms[client_id] = change_norm(sent, result.params)

    def hold(self, client_id: str, result: FitResult) -> None:
        """Keep an accepted update until :meth:`release` (its norm measured first, with :meth:`measure`)."""
        self._held.append((client_id, result))

    def release(self) -> list[tuple[str, FitResult]]:
        """The held updates that pass the guard, weights capped, in the order they came; the held ones let go."""
        passed, self._held = self._held, []
        if self._guard is not None and len(passed) >= 2:
            norms = {cid: self.norms.get(cid, 0.0) for cid, _ in passed}
            median = sorted(norms.values())[(len(norms) - 1) // 2]
            if median > 0:
                for cid, norm in norms.items():
                    if norm > self._guard * median:
                        self.refused[cid] = (
                            f"its update changes the model by {norm:.4g} (L2 norm), more than update_guard="
                            f"{self._guard:g} times the round's median of {median:.4g}"
                        )
                passed = [(cid, r) for cid, r in passed if cid not in self.refused]
        if self._share is not None:
            weights = {cid: r.num_examples for cid, r in passed}
            counted = share_cap(weights, self._share)
            for cid, cap in counted.items():
                self._cap(cid, weights[cid], cap, f"max_share={self._share:g} of the round's weight")
            passed = [(cid, replace(r, num_examples=counted[cid]) if cid in counted else r) for cid, r in passed]
        return passed

    def _cap(self, client_id: str, claimed: int, counted: int, why: str) -> None:
        first = self.capped.get(client_id)
        self.capped[client_id] = (first[0] if first else claimed, counted, why)

    def cap_detail(self, client_id: str) -> str | None:
        """What a capped site's record says about it: what it claimed, what counted, and why."""
        if client_id not in self.capped:
            return None
        claimed, counted, why = self.capped[client_id]
        return f"claimed {claimed} examples, counted {counted}: {why}"
