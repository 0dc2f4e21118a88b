"""Connecting to NATS and declaring the streams shoal uses."""

from __future__ import annotations

import dataclasses
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import anyio
import nats
import nats.errors
import nats.js.errors
import nkeys
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)

from protocol._errors import BrokerError
from protocol._partitions import DEFAULT_PARTITIONS
from protocol._roles import ROLES, inbox_prefix
from protocol._subjects import (
    CONTROL_WILDCARD,
    EVENTS_PUBLISHED,
    EVENTS_STREAM,
    FENCE_WILDCARD,
    PROGRESS_WILDCARD,
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    partition_transform,
    partitions_of_transform,
)
from protocol.nats._formats import checked_format, format_metadata, log_upgrade
from protocol.nats._refusals import Refusals, watch_refusals

_CONNECT_TIMEOUT = 5.0
_FIRST_CONNECT_ATTEMPTS = 3
_RECONNECT_WAIT = 0.5
# nats-py pings every 2 minutes by default, so a broker that stops answering (SIGSTOP, a
# dead host, a cut that sends no reset) would be noticed only after minutes. A ping a second,
# dropped after 2 unanswered, notices it within 3 s for a few bytes a second. It cannot be
# fooled by a busy loop: the ping timer does not run while the loop is busy either.
_PING_INTERVAL = 1
_MAX_OUTSTANDING_PINGS = 2
_STILL_DOWN_EVERY = 60.0
"""Seconds between the warnings that the broker is still unreachable."""
_NAME_MISMATCH = (62, 64)
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""
_CLIENT_CERT_REFUSED = ("unknown ca", "bad certificate", "certificate unknown", "expired")
"""The TLS alerts (as OpenSSL names them) a server sends for a client certificate it
does not accept."""

_logger = structlog.get_logger("shoal.nats")
_T = TypeVar("_T")
_DECLARE_FOR = 30.0
"""Seconds a stream's declaration is tried again while the broker does not answer in time."""


_USERINFO = re.compile(r"(?<=://)[^/\s]*@")
"""The user information of URLs in a text, up to the last ``@`` of the host part (where
URL parsers split it: a password may hold an ``@``)."""


def redact(url: str) -> str:
    """``url`` with any user, password or token in it replaced by ``***``, for logs and
    errors: ``nats://alice:s3cret@host:4222`` becomes ``nats://***@host:4222``; a URL
    without a scheme (``alice:s3cret@host``) too."""
    userinfo, _, scheme, rest = _split_userinfo(url)
    return f"{scheme}***@{rest}" if userinfo is not None else url


def _split_userinfo(url: str) -> tuple[str | None, str, str, str]:
    """(user information or None, its secret part, the scheme with ``://``, the rest)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    else:
        scheme += sep
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return None, "", scheme, rest
    userinfo, _, host = authority.rpartition("@")
    # user:password, or a token alone
    return userinfo, userinfo.split(":", 1)[-1], scheme, host + slash + path


@dataclass(frozen=True, slots=True)
class Credentials:
    """How a client proves who it is to a secured NATS, and what it trusts: at most one of
    a credentials file (``creds``), an NKey seed file (``nkey``), a user and password, or a
    token (URLs may carry a user and password or a token too); and TLS (``tls_ca``, the CA
    to trust; ``tls_cert`` and ``tls_key``, a client certificate); and the ``role`` they
    belong to.

    Secrets never show in its ``repr``, so it can be logged.
    """

    creds: Path | None = None
    nkey: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    role: str | None = None
    """The shoal role these credentials belong to (one of :data:`protocol.ROLES`), if known:
    the client then uses the role's reply inboxes (:func:`protocol.inbox_prefix`), and a
    permission violation names it."""

    def for_role(self, role: str) -> Credentials:
        """These credentials for a command of ``role``, unless they tell whose they are: a
        role given already, or a key file named after one (``subscriber.nk``,
        ``operator.creds``), as shoal's embedded broker writes them. So a command given
        another role's key uses that role's inboxes, and its errors name that role.

        Raises:
            ValueError: ``role`` is not one of :data:`protocol.ROLES`.
        """
        inbox_prefix(role)  # checks it
        if self.role is not None:
            return self
        for path in (self.nkey, self.creds):
            if path is not None and path.suffix in (".nk", ".creds") and path.stem in ROLES:
                return dataclasses.replace(self, role=path.stem)
        return dataclasses.replace(self, role=role)

    def secrets(self, servers: Sequence[str] = ()) -> list[str]:
        """The secret values it holds, and those in the URLs of ``servers`` (passwords and
        tokens, as written and percent-decoded): to keep out of anything printed."""
        found = [s for s in (self.password, self.token) if s]
        for url in servers:
            secret = _split_userinfo(url)[1]
            found += [secret, unquote(secret)] if secret else []
        return found

    def options(self) -> dict[str, Any]:
        """Keyword arguments for nats-py's ``Client.connect``.

        Raises:
            BrokerError: they contradict each other, or a file cannot be read.
        """
        given = [
            flag
            for flag, value in (
                ("--creds", self.creds),
                ("--nkey", self.nkey),
                ("--nats-user", self.user),
                ("--token", self.token),
            )
            if value
        ]
        if len(given) > 1:
            raise BrokerError(f"give one way to authenticate, not {' and '.join(given)}")
        if self.password and not self.user:
            raise BrokerError("--nats-password needs --nats-user")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise BrokerError("--tlscert and --tlskey go together")
        out: dict[str, Any] = {}
        for path in (self.creds, self.nkey, self.tls_ca, self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise BrokerError(f"cannot read {path}: no such file")
        if self.creds:
            _check_creds_file(self.creds)
            out["user_credentials"] = str(self.creds)
        if self.nkey:
            out["nkeys_seed"] = str(self.nkey)
        if self.user:
            out["user"], out["password"] = self.user, self.password or ""
        if self.token:
            out["token"] = self.token
        if self.tls_ca or self.tls_cert:
            try:
                context = ssl.create_default_context(
                    cafile=str(self.tls_ca) if self.tls_ca else None
                )
                if self.tls_cert and self.tls_key:
                    context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
            except (OSError, ssl.SSLError) as e:
                raise BrokerError(f"cannot set TLS up: {e}") from e
            out["tls"] = context
        return out


def _check_creds_file(path: Path) -> None:
    # nats-py reads the JWT by looking for its first line until it finds it: without one
    # it would read the end of the file for ever.
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise BrokerError(f"cannot read {path}: {e.strerror}") from e
    for block, what in (("NATS USER JWT", "a user JWT"), ("USER NKEY SEED", "an NKey seed")):
        if f"BEGIN {block}" not in text:
            raise BrokerError(
                f"{path} is not a NATS credentials file: it holds no {what} "
                f"(-----BEGIN {block}-----)"
            )


async def connect(
    servers: Sequence[str], *, name: str = "shoal", credentials: Credentials | None = None
) -> Client:
    """Connect to NATS, reconnecting for ever after a drop once connected.

    A lost connection is logged at once (warning ``broker connection lost``), then every
    minute while it lasts (``broker still unreachable``), and its return too (``broker
    connection restored``). ``Client.is_connected`` tells whether it is up.

    Every URL it logs or puts in an error is redacted (:func:`redact`).

    Raises:
        BrokerError: no server could be reached at first, or the credentials are refused.
    """
    options = (credentials or Credentials()).options() | _role_options(credentials)
    shown = [redact(s) for s in servers]
    nc = Client()
    watch = _Watch(nc, name, shown)
    refusals = watch_refusals(nc, credentials.role if credentials else None)
    give_up = _GiveUp()
    try:
        with anyio.CancelScope() as give_up.scope:
            # nats-py applies max_reconnect_attempts to the first connection too, and -1
            # would retry an unreachable server for ever: bound the first, then reconnect
            # for ever.
            await nc.connect(
                servers=list(servers),
                name=name,
                connect_timeout=_CONNECT_TIMEOUT,  # type: ignore[arg-type]
                allow_reconnect=True,
                max_reconnect_attempts=_FIRST_CONNECT_ATTEMPTS,
                reconnect_time_wait=_RECONNECT_WAIT,  # type: ignore[arg-type]
                ping_interval=_PING_INTERVAL,
                max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
                error_cb=give_up.watching(_on_error(refusals, watch)),
                disconnected_cb=watch.disconnected,
                reconnected_cb=watch.reconnected,
                **options,
            )
    except nkeys.NkeysError as e:
        # nats-py reads the seed only now, and lets the error through as it is.
        seed_file = (credentials or Credentials()).nkey or (credentials or Credentials()).creds
        raise BrokerError(f"cannot read an NKey seed from {seed_file} ({e})") from e
    except (TimeoutError, OSError, nats.errors.Error) as e:
        # A failed handshake can reach here (ssl.SSLError is an OSError) before the error
        # callback has cancelled the attempt: it is explained the same either way.
        tls = e if isinstance(e, ssl.SSLError) else give_up.error
        if isinstance(tls, ssl.SSLError):
            why = _explain_tls(tls)
        else:
            why = watch.refusal or watch.last_error or str(e) or type(e).__name__
        raise BrokerError(
            f"cannot reach NATS at {', '.join(shown)}: {_scrub(why, credentials, servers)}"
        ) from e
    if give_up.error is not None:
        final = give_up.error
        why = _explain_tls(final) if isinstance(final, ssl.SSLError) else str(final)
        raise BrokerError(
            f"cannot reach NATS at {', '.join(shown)}: {_scrub(why, credentials, servers)}"
        ) from final
    give_up.scope = None
    if _asks_for_tls(servers) and not nc._server_info.get("tls_required"):
        await nc.close()
        raise BrokerError(
            f"cannot reach NATS at {', '.join(shown)}: the server does not offer TLS, "
            "which a tls:// URL asks for (nats: secure connection not available)"
        )
    nc.options["max_reconnect_attempts"] = -1
    watch.last_error = watch.refusal = None
    url = nc.connected_url
    _logger.debug(
        "connected to NATS",
        client=name,
        server=redact(url.geturl()) if url is not None else None,
        tls=bool(nc._server_info.get("tls_required")),
        server_version=str(nc.connected_server_version),
    )
    return nc


def _on_error(refusals: Refusals, watch: _Watch) -> Callable[[Exception], Awaitable[None]]:
    """nats-py's error callback: a permission violation fails what waits on it (see
    :mod:`protocol.nats._refusals`); any other error is the connection's."""

    async def on_error(e: Exception) -> None:
        if refusals.report(e) is None:
            await watch.error(e)

    return on_error


def _role_options(credentials: Credentials | None) -> dict[str, Any]:
    """nats-py options for the role of ``credentials``: its reply inboxes, the only ones its
    permissions let it read."""
    if credentials is None or credentials.role is None:
        return {}
    return {"inbox_prefix": inbox_prefix(credentials.role)}


def _scrub(text: str, credentials: Credentials | None, servers: Sequence[str]) -> str:
    """``text`` with every secret of ``credentials`` and ``servers`` replaced by ``***``."""
    for secret in sorted((credentials or Credentials()).secrets(servers), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _USERINFO.sub("***@", text)


class _GiveUp:
    """Stops the first connection at an error that trying again cannot mend: a failed TLS
    handshake, or credentials the server refuses.

    nats-py would retry both as if the broker were down, and report whatever the last try
    met (a reset connection, say). After a failed TLS handshake it even hangs: it waits for
    the plain socket under the failed TLS layer to report its closing, which never comes
    (nats-io/nats.py#718). Its error callback still sees the failure first, so the attempt
    is cancelled from there.
    """

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None
        """The first connection's; ``None`` once connected, when these errors on a reconnect
        are retried like any other (the broker may be changing certificates or accounts)."""
        self.error: Exception | None = None

    def watching(
        self, then: Callable[[Exception], Awaitable[None]]
    ) -> Callable[[Exception], Awaitable[None]]:
        """An error callback that checks each error, then passes it to ``then``."""

        async def error(e: Exception) -> None:
            if self.scope is not None and self.error is None and _is_final(e):
                self.error = e
                self.scope.cancel()
            await then(e)

        return error


_REFUSED = ("Authorization Violation", "Authentication Expired", "Authentication Revoked")
"""The server's errors (``-ERR``) for credentials it does not accept."""


def _is_final(e: Exception) -> bool:
    if isinstance(e, ssl.SSLError | nats.errors.AuthorizationError):
        return True
    return isinstance(e, nats.errors.Error) and any(r in str(e) for r in _REFUSED)


def _asks_for_tls(servers: Sequence[str]) -> bool:
    # nats-py follows the server: it talks plain text to one that does not require TLS,
    # even at a tls:// URL. The nats CLI refuses that, and so does shoal. (A CA alone, from
    # NATS_CA say, does not ask for TLS: the embedded broker, plain, must still be reached.)
    return any(s.startswith("tls://") for s in servers)


def _explain_tls(e: ssl.SSLError) -> str:
    """What a failed TLS handshake means to a user, and what to do about it."""
    if isinstance(e, ssl.SSLCertVerificationError):
        detail = f"certificate verify failed: {str(e.verify_message).rstrip('.')}"
        if e.verify_code in _NAME_MISMATCH:
            return (
                f"the server's certificate is not for this host ({detail}); "
                "connect with a host name or address the certificate names"
            )
        return f"the server's certificate is not trusted ({detail}); give its CA with --tlsca"
    reason = (e.reason or str(e)).lower().replace("_", " ")
    if "certificate required" in reason:
        return (
            f"the server requires a client certificate ({reason}); "
            "give it with --tlscert and --tlskey"
        )
    if any(alert in reason for alert in _CLIENT_CERT_REFUSED):
        return (
            f"the server refused the client certificate ({reason}); give one signed by a "
            "CA the server trusts"
        )
    return f"the TLS handshake failed ({reason})"


class _Watch:
    """Logs a client's connection going down and coming back (nats-py's callbacks)."""

    def __init__(self, nc: Client, name: str, servers: Sequence[str]) -> None:
        self._nc = nc
        self._name = name
        self._servers = ", ".join(servers)
        self.last_error: str | None = None
        self.refusal: str | None = None
        """The server's refusal of the credentials, if it refused them: an attempt after it
        may fail otherwise (the server resets the connection), but this is the reason."""
        self._error_at = 0.0
        self._down_since: float | None = None
        self._warned_at = 0.0

    async def error(self, e: Exception) -> None:
        self.last_error, self._error_at = redact(str(e) or type(e).__name__), time.monotonic()
        if "authorization violation" in self.last_error.lower():
            self.refusal = self.last_error
        down_since = self._down_since
        if down_since is None:
            return
        # nats-py reports each failed attempt to reconnect (every second or so, for ever):
        # say it once a minute.
        now = time.monotonic()
        if now - self._warned_at >= _STILL_DOWN_EVERY:
            self._warned_at = now
            _logger.warning(
                "broker still unreachable",
                client=self._name,
                servers=self._servers,
                for_seconds=round(now - down_since),
                error=self.last_error,
            )

    async def disconnected(self) -> None:
        # Also called by close(): that is no fault, and nothing follows it.
        if self._nc.is_closed or self._down_since is not None:
            return
        now = self._down_since = self._warned_at = time.monotonic()
        # A read error is reported just before; a broker that went silent, not at all.
        recent = self.last_error if now - self._error_at < 1.0 else None
        _logger.warning(
            "broker connection lost; reconnecting",
            client=self._name,
            servers=self._servers,
            error=recent or "no answer to pings",
        )

    async def reconnected(self) -> None:
        down_since, self._down_since = self._down_since, None
        self.last_error = None
        _logger.info(
            "broker connection restored",
            client=self._name,
            servers=self._servers,
            after_seconds=round(time.monotonic() - down_since, 1) if down_since else None,
        )


MIGRATE_UNPARTITIONED = (
    "stream {stream} was made by an earlier shoal, without partitions: this shoal reads "
    "events only from a partitioned stream. Migrate the stream and the data directory with "
    "`shoal migrate`, then start again"
)
"""What :class:`StreamNeedsMigration` says of a stream made before partitions (the one
place to change when the migration command's name or usage changes)."""
MIGRATE_PARTITIONS = (
    "stream {stream} splits customers into {found} partitions, not the {wanted} asked for: "
    "the number is fixed when the stream is made. To change it, stop the engine and "
    "re-partition the stream and the data directory with `shoal migrate --partitions {wanted}`"
)
"""What :class:`StreamNeedsMigration` says when another number of partitions is asked for."""


class StreamNeedsMigration(BrokerError):
    """``SHOAL_EVENTS`` exists in a form this shoal cannot use as it is, and must be
    migrated: made by an earlier shoal without partitions (``found`` is None), or split into
    ``found`` partitions where ``wanted`` were asked for."""

    def __init__(self, stream: str, found: int | None, wanted: int | None) -> None:
        if found is None:
            message = MIGRATE_UNPARTITIONED.format(stream=stream)
        else:
            message = MIGRATE_PARTITIONS.format(stream=stream, found=found, wanted=wanted)
        super().__init__(message)
        self.stream = stream
        self.found = found
        self.wanted = wanted


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How long the broker keeps messages and for how long it drops duplicates.

    ``segments_duplicate_window`` must outlast an engine restart: a transition published
    again after a crash carries the same ``Nats-Msg-Id`` and is dropped inside it.
    """

    events_duplicate_window: float = 120.0
    segments_duplicate_window: float = 600.0
    rejected_max_age: float = 30 * 24 * 3600.0
    replicas: int | None = None
    """How many servers of a cluster hold each stream; None: as many as now hold an
    existing one (an update must say, or nats-server makes it 1), 1 for a new one."""
    partitions: int | None = None
    """How many partitions ``SHOAL_EVENTS`` splits customers into. None: those of the
    existing stream, or :data:`~protocol.DEFAULT_PARTITIONS` for a new one. A number other
    than the existing stream's is refused (:class:`StreamNeedsMigration`)."""

    def __post_init__(self) -> None:
        if self.partitions is not None and self.partitions < 1:
            raise ValueError(f"the number of partitions must be positive, not {self.partitions}")
        if self.replicas is not None and not 1 <= self.replicas <= 5:
            raise ValueError(f"the number of replicas must be 1 to 5, not {self.replicas}")


def _partitions_of(config: StreamConfig) -> int | None:
    transform = config.subject_transform
    if transform is None:
        return None
    return partitions_of_transform(transform.src, transform.dest)


async def stream_partitions(js: JetStreamContext) -> int | None:
    """How many partitions the existing ``SHOAL_EVENTS`` splits customers into, read from
    its subject transform; None when it has none (made by an earlier shoal).

    Raises:
        BrokerError: the stream does not exist, or the broker does not answer.
    """
    try:
        info = await js.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError as e:
        raise BrokerError(
            f"stream {EVENTS_STREAM} does not exist on this NATS server: start the engine "
            "(`shoal serve`) once, it creates the streams"
        ) from e
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {EVENTS_STREAM}: {e}") from e
    return _partitions_of(info.config)


def _events_config(s: StreamSettings, partitions: int) -> StreamConfig:
    src, dest = partition_transform(partitions)
    return StreamConfig(
        name=EVENTS_STREAM,
        # One customer token only: a subject of more tokens finds no stream, and its
        # producer no answer, rather than reaching the engine as an event of no customer.
        subjects=[EVENTS_PUBLISHED, CONTROL_WILDCARD],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=s.events_duplicate_window,
        # No age limit: an owner rebuilds its customers from every event.
        max_age=None,
        subject_transform=SubjectTransform(src=src, dest=dest),
        num_replicas=s.replicas or 1,
        metadata=format_metadata(),
    )


async def ensure_streams(js: JetStreamContext, settings: StreamSettings | None = None) -> int:
    """Create the three streams, or update them to this configuration (idempotent).

    ``SHOAL_EVENTS`` takes events on ``shoal.events.<customer>`` and stores each as
    ``shoal.events.<partition>.<customer>``, the broker computing the partition
    (:func:`protocol.partition` computes the same); it keeps every event.

    Returns:
        The number of partitions of ``SHOAL_EVENTS``.

    Each carries this shoal's format in its metadata (``shoal_format``): one made before
    formats were recorded gets it, which is logged (``upgraded in place``).

    Raises:
        FormatTooNewError: a stream was made by a newer shoal (its format is later).
        StreamNeedsMigration: ``SHOAL_EVENTS`` was made by an earlier shoal (without
            partitions), or with another number of partitions than ``settings`` asks for.
        BrokerError: JetStream is not enabled, or a stream cannot be created or updated.
    """
    s = settings or StreamSettings()
    partitions = DEFAULT_PARTITIONS if s.partitions is None else s.partitions
    configs = [
        _events_config(s, partitions),
        StreamConfig(
            name=SEGMENTS_STREAM,
            # The partitions' claims and progress records go with their transitions: the
            # owner's batches are stored only while its claim is the last (a fence).
            subjects=[SEGMENTS_WILDCARD, FENCE_WILDCARD, PROGRESS_WILDCARD],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=s.segments_duplicate_window,
            num_replicas=s.replicas or 1,
            allow_atomic=True,
            metadata=format_metadata(),
        ),
        StreamConfig(
            name=REJECTED_STREAM,
            subjects=[REJECTED_SUBJECT],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=s.rejected_max_age,
            num_replicas=s.replicas or 1,
            metadata=format_metadata(),
        ),
    ]
    for config in configs:
        partitions = await _ensure_one(js, config, s, partitions)
    return partitions


async def _ensure_one(
    js: JetStreamContext, config: StreamConfig, s: StreamSettings, partitions: int
) -> int:
    return await declared(config.name, lambda: _declare(js, config, s, partitions))


async def declared(what: str | None, declare: Callable[[], Awaitable[_T]]) -> _T:
    """``declare()`` (a stream's or bucket's creation or update), tried again while the
    broker does not answer in time, for up to :data:`_DECLARE_FOR` seconds: on a cluster a
    replicated stream takes a moment, and engines starting together make it at once.

    Raises:
        BrokerError: as ``declare``, once it is not for want of an answer or time is up.
    """
    give_up = time.monotonic() + _DECLARE_FOR
    while True:
        try:
            return await declare()
        except BrokerError as e:
            if not isinstance(e.__cause__, TimeoutError | nats.errors.TimeoutError):
                raise
            if time.monotonic() >= give_up:
                raise
            _logger.warning("not declared yet; retrying", what=what, error=str(e))
            await anyio.sleep(0.5)


async def _declare(
    js: JetStreamContext, config: StreamConfig, s: StreamSettings, partitions: int
) -> int:
    try:
        try:
            info = await js.stream_info(config.name)  # type: ignore[arg-type]
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(config)
                return partitions
            except nats.js.errors.BadRequestError:
                # Made meanwhile by another engine starting together: update it below.
                info = await js.stream_info(config.name)  # type: ignore[arg-type]
        what = f"stream {config.name}"
        # Before anything else: a newer shoal's stream may mean anything by its settings.
        fmt = checked_format(what, info.config)
        if config.name == EVENTS_STREAM:
            found = _partitions_of(info.config)
            if found is None or (s.partitions is not None and found != s.partitions):
                raise StreamNeedsMigration(EVENTS_STREAM, found, s.partitions)
            partitions = found
            config = _events_config(s, found)
        if s.replicas is None:
            config.num_replicas = info.config.num_replicas
        config.metadata = format_metadata(info.config.metadata)
        await js.update_stream(config)
        log_upgrade(what, fmt)
    except nats.js.errors.ServiceUnavailableError as e:
        raise BrokerError("JetStream is not enabled on the NATS server (start it with -js)") from e
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot set up stream {config.name}: {e}") from e
    return partitions
