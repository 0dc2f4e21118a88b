"""The exceptions raised by :mod:`protocol`."""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised by :mod:`protocol`."""


class SubjectError(ProtocolError, ValueError):
    """A subject, subject token or customer id cannot be used as given."""


class BrokerError(ProtocolError):
    """The NATS server could not be started, reached or configured.

    The message is one line meant for a person: what went wrong and what to do.
    """
