"""Permission violations as errors of the operation that caused them.

The broker refuses a publish or a subscription with an asynchronous ``-ERR 'Permissions
Violation for Publish to "<subject>"'``: nats-py hands it to the connection's error callback
(lower-cased), never to the call that sent it, which would then wait for a reply that never
comes. :func:`permission_guard` makes the operation inside it fail at once with a
:class:`~protocol.PermissionDenied` naming the role and the subject instead; a refusal no
operation waits on is logged.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import AsyncIterator

import anyio
import structlog
from nats.aio.client import Client

from protocol._errors import PermissionDenied
from protocol._roles import known_tokens

_logger = structlog.get_logger("shoal.nats")
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')
_ACTIONS = {"publish": "publish", "subscription": "subscribe"}
# The JetStream API's own words no role uses, for the subjects a role may not use.
_JS_WORDS = ("PURGE", "DIRECT", "LIST", "NAMES", "SNAPSHOT", "RESTORE", "PAUSE", "RESET", "UNPIN")


class _Guard:
    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.denied: PermissionDenied | None = None


class Refusals:
    """The permission violations of one client: each fails the operations guarding against
    them at the time (:meth:`guard`), or is logged when none does."""

    def __init__(self, nc: Client, role: str | None) -> None:
        self._nc = nc
        self._role = role
        self._guards: set[_Guard] = set()
        # nats-py lower-cases the broker's errors: the subjects shoal knows put them back.
        self._subjects: dict[str, str] = {}
        self._tokens = {t.lower(): t for t in (*known_tokens(), *_JS_WORDS)}

    def report(self, error: BaseException) -> PermissionDenied | None:
        """The :class:`PermissionDenied` that ``error`` (from nats-py's error callback) tells
        of, after failing the operations that guard against it; None if it is no violation."""
        m = _VIOLATION.search(str(error))
        if m is None:
            return None
        denied = self._denied(_ACTIONS[m.group(1)], m.group(2))
        if not self._guards:
            _logger.error(
                "permission denied", role=self._role, action=denied.action, subject=denied.subject
            )
        for guard in self._guards:
            if guard.denied is None:
                guard.denied = denied
                guard.scope.cancel()
        return denied

    def _denied(self, action: str, lowered: str) -> PermissionDenied:
        inbox = bytes(getattr(self._nc, "_inbox_prefix", b"")).decode()
        if action == "subscribe" and lowered.startswith(inbox.lower() + "."):
            # The replies' inbox: the client takes the inbox prefix of another role than
            # the credentials'.
            hint = "its replies' inbox"
            if self._role:
                hint += f": are these the {self._role} role's credentials?"
            return PermissionDenied(self._role, action, f"{inbox}.>", hint=hint)
        subject = self._subjects.get(lowered)
        if subject is None:
            subject = ".".join(self._tokens.get(t, t) for t in lowered.split("."))
        return PermissionDenied(self._role, action, subject)

    @contextlib.asynccontextmanager
    async def guard(self, *subjects: str) -> AsyncIterator[None]:
        """Fail what runs inside with :class:`~protocol.PermissionDenied` as soon as the broker
        refuses a publish or subscription of this client (the broker does not say which
        command it refuses, so any counts). ``subjects`` are those the operation uses, for
        the error to show them as written."""
        for subject in subjects:
            self._subjects[subject.lower()] = subject
        guard = _Guard()
        self._guards.add(guard)
        try:
            with guard.scope:
                yield
        finally:
            self._guards.discard(guard)
            for subject in subjects:
                self._subjects.pop(subject.lower(), None)
        if guard.denied is not None:
            raise guard.denied


_REFUSALS: weakref.WeakKeyDictionary[Client, Refusals] = weakref.WeakKeyDictionary()


def watch_refusals(nc: Client, role: str | None) -> Refusals:
    """Start telling the permission violations of ``nc`` (a client of ``role``) apart; feed
    its error callback's errors to :meth:`Refusals.report`."""
    refusals = _REFUSALS[nc] = Refusals(nc, role)
    return refusals


def permission_guard(nc: Client, *subjects: str) -> contextlib.AbstractAsyncContextManager[None]:
    """A context in which a publish or subscription the broker refuses to ``nc`` fails what
    runs inside at once, with :class:`~protocol.PermissionDenied` naming the role and the
    subject, rather than letting it wait for a reply that cannot come.

    ``nc`` must come from :func:`~protocol.nats.connect` (on another client nothing is
    caught). ``subjects`` are those the operation uses, shown as written in the error.
    """
    refusals = _REFUSALS.get(nc)
    if refusals is None:
        return contextlib.nullcontext()
    return refusals.guard(*subjects)
