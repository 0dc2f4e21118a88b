"""Messages on subjects that are not UTF-8: delivered, never fatal to the connection.

nats-py (2.16 and its main branch) decodes each delivered message's subject and reply with a
strict ``bytes.decode()`` in ``Client._build_message``. A subject holding a byte that is not
UTF-8 (``shoal.events.p\\xff``: the server accepts any byte but space and control) raises
``UnicodeDecodeError`` there, inside the client's read loop, which logs it and stops reading
for good: the connection stays "connected", nothing more is delivered, no callback is told.
One such message stalls ingest, or the query service, without a word.

:func:`tolerate_undecodable_subjects` makes one client decode them surrogate-escaped instead
(:pep:`383`): ``p\\xff`` arrives as ``'p\\udcff'``, which no valid subject gives, so the
event decoder refuses it with a reason, and :func:`~protocol._types.shown_subject` shows it
as ``p\\xff``.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client

_PATCHED = "_shoal_tolerates_undecodable_subjects"


def _build_message(
    nc: Client,
    sid: int,
    subject: bytes,
    reply: bytes,
    data: bytes,
    headers: dict[str, str] | None,
) -> Any:
    # As nats-py's Client._build_message, but never raising on bytes that are not UTF-8.
    return nc.msg_class(
        subject=subject.decode("utf-8", "surrogateescape"),
        reply=reply.decode("utf-8", "surrogateescape"),
        data=data,
        headers=headers,
        _client=nc,
        _sid=sid,
    )


def tolerate_undecodable_subjects(nc: Client) -> None:
    """Make ``nc`` deliver a message whose subject or reply is not UTF-8 (surrogate-escaped)
    rather than stop reading. Idempotent; call it before subscribing.
    """
    if getattr(nc, _PATCHED, False):
        return

    def build(
        sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Any:
        return _build_message(nc, sid, subject, reply, data, headers)

    # An instance attribute: only shoal's own connections change, not every Client.
    setattr(nc, "_build_message", build)  # noqa: B010
    setattr(nc, _PATCHED, True)  # noqa: B010
