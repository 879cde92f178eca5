# -*- test-case-name: tests.test_tap -*-
"""
A peer's configuration: one frozen object, validated once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from p2pmta.address import Address
from p2pmta.dht import NETWORK_ID
from p2pmta.errors import ConfigError

DEFAULT_SMTP = "tcp:2525:interface=127.0.0.1"
DEFAULT_IMAP = "tcp:1143:interface=127.0.0.1"
DEFAULT_HTTP = "tcp:8080"
DEFAULT_POLL_INTERVAL = 60.0
DEFAULT_REPLICATION_INTERVAL = 300.0
DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    """
    Everything a peer needs to start.

    @ivar dataDir: the peer's data directory (created on first start).
    @ivar address: the peer's address, the user name of its mail client.
    @ivar password: the mail client's password for SMTP and IMAP.
    @ivar smtp: server endpoint string of the submission server.
    @ivar imap: server endpoint string of the IMAP server.
    @ivar http: server endpoint string of the public outbox.
    @ivar publicURL: how other peers reach the outbox, or L{None} to derive
        it from the port the outbox listens on.
    @ivar dhtPort: UDP port of the DHT node (0: any free port).
    @ivar dhtInterface: address the DHT node binds ("" for all).
    @ivar dhtNetwork: OpenDHT network id.
    @ivar bootstrap: C{(host, port)} pairs of DHT nodes to join through.
    @ivar pollInterval: seconds between polls of the DHT for notifications.
    @ivar groupMembers: the members of this peer's group, when it is the
        group master.
    @ivar replicationInterval: seconds between rounds of outbox
        replication with the other members of the group.
    @ivar maxMessageSize: the largest message accepted over SMTP, in bytes.
    """

    dataDir: str
    address: Address
    password: str
    smtp: str = DEFAULT_SMTP
    imap: str = DEFAULT_IMAP
    http: str = DEFAULT_HTTP
    publicURL: str | None = None
    dhtPort: int = 4222
    dhtInterface: str = ""
    dhtNetwork: int = NETWORK_ID
    bootstrap: tuple[tuple[str, int], ...] = ()
    pollInterval: float = DEFAULT_POLL_INTERVAL
    groupMembers: tuple[Address, ...] = field(default=())
    replicationInterval: float = DEFAULT_REPLICATION_INTERVAL
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE
    smtpMaxConnections: int = 100
    smtpIdleTimeout: float = 300.0
    httpMaxConnectionsPerClient: int = 32
    httpMaxDownloadsPerClient: int = 8

    def __post_init__(self) -> None:
        if self.smtpMaxConnections < 1 or self.smtpIdleTimeout <= 0:
            raise ConfigError("the SMTP connection limit and idle timeout must be positive")
        if self.httpMaxConnectionsPerClient < 0 or self.httpMaxDownloadsPerClient < 0:
            raise ConfigError("the outbox's limits per client must be 0 (none) or more")
        if not self.dataDir:
            raise ConfigError("a data directory is required")
        if not self.password:
            raise ConfigError("a password is required")
        if not 0 <= self.dhtPort <= 65535:
            raise ConfigError(f"DHT port {self.dhtPort} is out of range")
        if not 0 <= self.dhtNetwork < 2**32:
            raise ConfigError(f"DHT network id {self.dhtNetwork} is out of range")
        if self.pollInterval <= 0 or self.replicationInterval <= 0:
            raise ConfigError("the poll and replication intervals must be positive")
        if self.maxMessageSize <= 0:
            raise ConfigError("the message size limit must be positive")
        if self.publicURL is not None:
            parts = urlsplit(self.publicURL)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{self.publicURL!r} is not an http(s) URL")
        if self.groupMembers and self.address not in self.groupMembers:
            raise ConfigError("the group master must be one of --group-members")
        for member in self.groupMembers:
            if member.group != self.address.group:
                raise ConfigError(f"{member} is not in group {self.address.group}")


def parseHostPort(text: str) -> tuple[str, int]:
    """
    Parse C{host:port} (C{[v6]:port} for IPv6).

    @raise ConfigError: if C{text} is not of that form.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
