# -*- test-case-name: tests.test_transports -*-
"""
Tuning the TCP transports that carry message bodies out of a peer: its
IMAP sessions (to the mail client) and its outbox (to the peers pulling).
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor

#: The most bytes a session carrying bodies hands the kernel in one
#: C{send}.  Twisted's default is 128 KiB, so a 1 MB message (1.4 MB in
#: base64) took eleven turns of the reactor to go out, each a C{send} and
#: a wait for the socket to be writable again.  Raw peers, 300 x 1 MB
#: pulled and fetched through imaplib in FETCHes of 50, with the outbox
#: read 256 KiB at a time (L{p2pmta.webtree.READ_SIZE}), alternated three
#: times: the sender's reactor thread used 0.32-0.36 s of CPU against
#: 0.41-0.47 s, the mail client 0.13-0.17 s against 0.18-0.21 s, and the
#: fetch took 1.54-1.74 s against 1.55-1.77 s.
SEND_LIMIT = 1024 * 1024


def sendInLargeWrites(transport, limit: int = SEND_LIMIT) -> bool:
    """
    Let the TCP transport under C{transport} (through wrappers such as
    L{twisted.protocols.policies.ProtocolWrapper} or TLS, which keep it as
    their own C{transport}) send up to C{limit} bytes at a time, if its
    limit is lower.

    @return: whether a transport of Twisted's own (a L{FileDescriptor})
        was found under the wrappers.
    """
    for _ in range(8):  # wrappers seldom nest more than two deep
        if isinstance(transport, FileDescriptor):
            if transport.SEND_LIMIT < limit:
                transport.SEND_LIMIT = limit
            return True
        transport = getattr(transport, "transport", None)
        if transport is None:
            return False
    return False
