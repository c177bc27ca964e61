"""The one exception hierarchy of fedloom.

Every error that fedloom raises on purpose derives from :class:`FedloomError`. The command line turns any of
them into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

__all__ = [
    "ConfigError",
    "DataError",
    "DecodeError",
    "DivergedError",
    "FedloomError",
    "InvalidUpdateError",
    "JobError",
    "NoSpaceError",
    "NotEnoughClientsError",
    "RoundFailedError",
    "RunStoreError",
    "StopRunError",
    "TransportError",
    "user_code",
]


class FedloomError(Exception):
    """Base class of every error fedloom raises on purpose."""


class ConfigError(FedloomError, ValueError):
    """A setting is invalid (out of range, wrong type, contradicting another setting)."""


class DataError(FedloomError):
    """A dataset cannot be found, downloaded, verified or parsed."""


class DecodeError(FedloomError, ValueError):
    """Bytes are not a valid fedloom message (wrong version, bad dtype, truncated data, bad metadata)."""


class DivergedError(FedloomError):
    """The global model holds NaN or infinity after a round. ``server_round`` is that round; ``norms`` maps each
    client whose update was aggregated in it to that update's norm of change (``None`` where it is not known:
    under secure aggregation). ``suspects`` are the clients whose updates stood out (more than twice the round's
    median), largest first: empty where none did, as when the model diverges by itself. The round is not
    recorded: a resume starts after the one before it. ``hint`` (how to resume, where the caller knows) ends the
    message."""

    def __init__(self, server_round: int, norms: Mapping[str, float | None], *, hint: str = "") -> None:
        self.server_round = server_round
        self.norms = dict(norms)
        known = sorted(((n, cid) for cid, n in self.norms.items() if n is not None), reverse=True)
        median = known[len(known) // 2][0] if known else 0.0
        self.suspects = tuple(cid for n, cid in known if len(known) > 1 and n > 2 * median)
        listed = ", ".join(f"{cid} ({n:.3g})" for n, cid in known[:5]) or ", ".join(sorted(self.norms)[:5])
        more = f" and {len(self.norms) - 5} more" if len(self.norms) > 5 else ""
        stood = (
            f"the updates of {', '.join(self.suspects)} stood out"
            if self.suspects
            else "no update stood out (a learning rate too high can make a model diverge by itself)"
        )
        super().__init__(
            f"round {server_round}: the global model holds NaN or infinity after aggregating the updates of "
            f"{len(self.norms)} clients, by norm of change: {listed}{more}; {stood}. The run stops after round "
            f"{server_round - 1}, its last good round" + (f"; {hint}" if hint else "")
        )


class InvalidUpdateError(FedloomError, ValueError):
    """A client's update does not fit the global model (names, shapes, dtypes) or holds NaN or infinity."""


class JobError(FedloomError):
    """A job file cannot be loaded, or user code in it raised."""


class NotEnoughClientsError(FedloomError):
    """Fewer clients are available, or replied in a round, than a run needs (the strategy's ``min_clients``)."""


class RoundFailedError(FedloomError):
    """A round's protocol could not finish (secure aggregation lost more parties than its threshold allows):
    the server loop records the round as failed, with this message as the reason, keeps the model as it was and
    goes on with the next round, until as many rounds in a row have failed as the strategy allows
    (``max_failed_rounds``); then it raises this error again, and the run fails."""


class RunStoreError(FedloomError):
    """A run cannot be found in, or read from, the run store."""


class NoSpaceError(RunStoreError):
    """The run store cannot be written for want of space: its disk (or its database server's) is full, or has
    less room than the next checkpoint needs. Its message says "no space left on device" and names where."""


class StopRunError(FedloomError):
    """Raised by a strategy's ``configure_fit`` to end a run before that round, as planned rather than as a
    failure (a privacy budget that the next round would exceed): the server loop logs the message as a warning
    and ends the run with the rounds done so far."""


class TransportError(FedloomError):
    """The network failed a deployment: an address that cannot be used, a server that cannot be reached or
    went away, a peer that refused this one. (A malformed frame is a :class:`DecodeError`.)"""


@contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run user code (a model factory, a data function, a task) so that its failure is a :class:`JobError`
    saying ``what`` raised which exception, instead of a traceback from deep inside fedloom. fedloom's own
    errors pass through unchanged.

    >>> with user_code("client 3 in fit"):  # doctest: +SKIP
    ...     task.fit(params, data, config)
    """
    try:
        yield
    except FedloomError:
        raise
    except Exception as exc:
        raise JobError(f"{what} raised {type(exc).__name__}: {exc}") from exc
