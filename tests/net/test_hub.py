"""The server's hub turns away a reply nobody awaits, saying which it is (issue 31): late, a duplicate of the site's
reply to a round, out of turn, or under an id no instruction to this site had; each recorded with its round."""

from __future__ import annotations

import queue

import pytest

from fedloom.core import Message
from fedloom.runtime.grid import Reply
from fedloom.runtime.net.hub import LATE, Awaited, Connection, Hub, Past


def _hub() -> tuple[Hub, Connection]:
    hub = Hub(lambda token: token, max_uploads=1)
    site = Connection("site", "site", queue.Queue())
    hub.connections["site"] = site
    hub.last_id = 9
    hub.past = {
        1: Past("site", 1, answered=True),
        2: Past("other", 1, answered=True),
        3: Past("site", 2, answered=False),
    }
    return hub, site


def _await(hub: Hub, connection: Connection, message_id: int, server_round: int, *, answered: bool) -> None:
    reply = Reply(Message("fit.result")) if answered else None
    hub.awaiting[message_id] = Awaited(connection, server_round, 0.0, 0, None, reply=reply)


@pytest.mark.parametrize(
    ("message_id", "event", "server_round", "reason"),
    [
        (3, "late", 2, LATE),  # its exchange ended with no reply
        (1, "refused", 1, "out of turn: it answers round 1, not round 3"),  # round 1 was answered; round 3 is open
        (8, "refused", 3, "a duplicate of its reply to round 3"),  # round 3's, answered while the round is open
        (2, "refused", None, "no such instruction was sent to this site"),  # another site's
        (10, "refused", None, "no such instruction was sent to this site"),  # never sent
        (5, "late", None, LATE),  # sent, but too long ago for the server to remember
    ],
)
def test_a_reply_nobody_awaits_is_turned_away_saying_which_with_its_round(
    message_id: int, event: str, server_round: int | None, reason: str, caplog: pytest.LogCaptureFixture
):
    hub, site = _hub()
    _await(hub, site, 8, 3, answered=True)  # its fit instruction of round 3, answered
    _await(hub, site, 9, 3, answered=False)  # and another of round 3, still open
    with caplog.at_level("WARNING", logger="fedloom.server"):
        assert hub.turn_away(site, message_id, 123) == reason
    (recorded,) = hub.events
    assert (recorded.client_id, recorded.event, recorded.server_round, recorded.nbytes, recorded.detail) == (
        "site",
        event,
        server_round,
        123,
        f"reply {message_id}: {reason}",
    )
    assert f"client site: declined its reply {message_id}: {reason}" in caplog.text


def test_a_second_reply_to_an_answered_round_with_nothing_open_is_a_duplicate_of_that_round():
    hub, site = _hub()
    assert hub.turn_away(site, 1) == "a duplicate of its reply to round 1"
