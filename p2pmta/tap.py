# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd p2pmta} command line: options (strings only) turned into a
L{Config}, and the service built from it.
"""

from __future__ import annotations

from twisted.python import usage

from p2pmta import config as _config
from p2pmta.address import Address
from p2pmta.dht import NETWORK_ID
from p2pmta.errors import P2PMTAError


class Options(usage.Options):
    """
    C{twistd p2pmta --data-dir DIR --address NAME@GROUP --password SECRET}.
    """

    synopsis = "--data-dir DIR --address NAME@GROUP --password SECRET [options]"
    longdesc = (
        "Run a p2pmta peer: an ESMTP server and an IMAP4 server for the local "
        "mail client, a public HTTP outbox and a node of the OpenDHT network."
    )

    optParameters = [
        ["data-dir", None, None, "The peer's data directory (created on first start)."],
        ["address", None, None, "The peer's address, NAME@GROUP."],
        ["password", None, None, "Password of the mail client for SMTP and IMAP."],
        ["smtp", None, _config.DEFAULT_SMTP, "Server endpoint of the SMTP submission server."],
        ["imap", None, _config.DEFAULT_IMAP, "Server endpoint of the IMAP4 server."],
        ["http", None, _config.DEFAULT_HTTP, "Server endpoint of the public outbox."],
        ["public-url", None, None, "How other peers reach the outbox (default: from --http)."],
        ["dht-port", None, "4222", "UDP port of the DHT node (0: any free port)."],
        ["dht-interface", None, "", "Address the DHT node binds (default: all)."],
        ["dht-network", None, str(NETWORK_ID), "OpenDHT network id."],
        ["poll-interval", None, str(_config.DEFAULT_POLL_INTERVAL), "Seconds between DHT polls."],
        ["group-members", None, None, "ADDR,ADDR,...: this peer is the master of that group."],
        ["replication-interval", None, str(_config.DEFAULT_REPLICATION_INTERVAL), "Seconds between outbox replication rounds."],
        ["max-message-size", None, str(_config.DEFAULT_MAX_MESSAGE_SIZE), "Largest message accepted, in bytes."],
        ["smtp-max-connections", None, "100", "Most SMTP sessions open at a time."],
        ["smtp-idle-timeout", None, "300", "Seconds of client silence before an SMTP session is closed."],
        ["http-max-connections-per-client", None, "32", "Most outbox connections from one IP (0: no limit)."],
        ["http-max-downloads-per-client", None, "8", "Most outbox downloads at once from one IP (0: no limit)."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["bootstrap"] = []

    def opt_bootstrap(self, hostport: str) -> None:
        """
        HOST:PORT of a DHT node to join through (repeatable; none starts a
        new network).
        """
        self["bootstrap"].append(hostport)

    def postOptions(self) -> None:
        try:
            self.config = toConfig(self)
        except P2PMTAError as e:
            raise usage.UsageError(str(e)) from None


def _number(options, name: str, kind=int):
    try:
        return kind(options[name])
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{name} must be a number, not {options[name]!r}") from None


def toConfig(options) -> _config.Config:
    """
    Validate parsed options once.

    @raise usage.UsageError: with the one line the operator sees.
    """
    for required in ("data-dir", "address", "password"):
        if not options[required]:
            raise usage.UsageError(f"--{required} is required")
    address = Address.parse(options["address"])
    members = ()
    if options["group-members"]:
        members = tuple(
            Address.parse(part) for part in options["group-members"].split(",") if part.strip()
        )
    return _config.Config(
        dataDir=options["data-dir"],
        address=address,
        password=options["password"],
        smtp=options["smtp"],
        imap=options["imap"],
        http=options["http"],
        publicURL=options["public-url"],
        dhtPort=_number(options, "dht-port"),
        dhtInterface=options["dht-interface"],
        dhtNetwork=_number(options, "dht-network"),
        bootstrap=tuple(_config.parseHostPort(b) for b in options["bootstrap"]),
        pollInterval=_number(options, "poll-interval", float),
        groupMembers=members,
        replicationInterval=_number(options, "replication-interval", float),
        maxMessageSize=_number(options, "max-message-size"),
        smtpMaxConnections=_number(options, "smtp-max-connections"),
        smtpIdleTimeout=_number(options, "smtp-idle-timeout", float),
        httpMaxConnectionsPerClient=_number(options, "http-max-connections-per-client"),
        httpMaxDownloadsPerClient=_number(options, "http-max-downloads-per-client"),
    )


def makeService(options):
    """
    Build the peer's service from parsed L{Options}, in a process set to
    keep the memory it frees (see L{p2pmta.allocator}).  Only here is the
    global reactor imported.
    """
    from twisted.internet import reactor

    from p2pmta.allocator import keepFreedMemory
    from p2pmta.service import buildService

    keepFreedMemory()
    return buildService(options.config, reactor)
