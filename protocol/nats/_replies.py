"""The query service answers only inboxes.

A request names the subject its answer goes to, and the engine's credentials may publish
transitions, use the JetStream API of shoal's streams and (``allow_responses``) answer on any
reply subject it is given. Answering on, say,
``$JS.API.CONSUMER.DELETE.SHOAL_EVENTS.shoal-engine`` would let anyone who may ask delete the
engine's consumer, and answering on ``shoal.segments.<segment>.entered`` would put a message
there that no engine wrote. So a request whose reply subject is not an inbox (``_INBOX.``) is
not answered, and a warning says so, at most once a minute.
"""

from __future__ import annotations

import anyio
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from protocol._types import shown_subject

_INBOX_ROOT = "_INBOX."
_WARN_EVERY = 60.0
"""Seconds at least between two warnings about requests not answered."""
_logger = structlog.get_logger("shoal.api")


class _Unanswered:
    def __init__(self) -> None:
        self.count = 0
        self.warned_at = -_WARN_EVERY

    def add(self, reply: str) -> None:
        self.count += 1
        now = anyio.current_time()
        if now - self.warned_at >= _WARN_EVERY:
            self.warned_at = now
            _logger.warning(
                "request not answered: its reply subject is not an inbox (_INBOX.>)",
                reply_subject=shown_subject(reply),
                not_answered=self.count,
            )


_unanswered = _Unanswered()


def answers_an_inbox(msg: Msg) -> bool:
    """Whether ``msg``'s reply subject is an inbox; if not, it is counted and logged, and
    must not be answered."""
    if msg.reply.startswith(_INBOX_ROOT):
        return True
    _unanswered.add(msg.reply)
    return False


class _InboxReplies(Msg):
    """A message whose :meth:`respond` answers an inbox only (the service's discovery
    requests, ``$SRV.PING`` and the like, are answered through it)."""

    async def respond(self, data: bytes) -> None:
        if answers_an_inbox(self):
            await super().respond(data)


def answer_inboxes_only(nc: Client) -> None:
    """Make the messages ``nc`` receives answer only inboxes through ``respond()``; the
    service's endpoints check :func:`answers_an_inbox` themselves. Idempotent."""
    # An instance attribute: only this connection changes, not every Client. nats-py builds
    # each message it delivers from it (and so does tolerate_undecodable_subjects).
    nc.msg_class = _InboxReplies
