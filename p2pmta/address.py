# -*- test-case-name: tests.test_address -*-
"""
Peer addresses (C{name@group}) and the DHT key names derived from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pmta.errors import BadAddress

# A conservative dot-atom on both sides: what a mail client types and what a
# DHT key and a GnuPG user id carry without quoting.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PART = rf"{_ATOM}(?:\.{_ATOM})*"
_ADDRESS = re.compile(rf"({_PART})@({_PART})")
MAX_LENGTH = 254


@dataclass(frozen=True, order=True)
class Address:
    """
    A peer's address.  Comparison is case-insensitive: both parts are kept
    lower-cased.

    @ivar name: the peer's identity within its group.
    @ivar group: the name of the peer's group.
    """

    name: str
    group: str

    @classmethod
    def parse(cls, text: str | bytes) -> Address:
        """
        Parse C{name@group}, with or without angle brackets.

        @raise BadAddress: if C{text} is not such an address.
        """
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError:
                raise BadAddress(repr(text)) from None
        stripped = text.strip()
        if stripped.startswith("<") and stripped.endswith(">"):
            stripped = stripped[1:-1]
        if len(stripped) > MAX_LENGTH:
            raise BadAddress("longer than %d characters" % (MAX_LENGTH,))
        match = _ADDRESS.fullmatch(stripped)
        if match is None:
            raise BadAddress(repr(text))
        return cls(match.group(1).lower(), match.group(2).lower())

    def __str__(self) -> str:
        return f"{self.name}@{self.group}"

    @property
    def descriptorKey(self) -> str:
        """The DHT key of this peer's descriptor: the bare address."""
        return str(self)

    @property
    def sendKey(self) -> str:
        """The DHT key of send notifications addressed to this peer."""
        return f"ns:{self}"

    @property
    def receiveKey(self) -> str:
        """The DHT key of receive notifications addressed to this peer."""
        return f"nr:{self}"

    @property
    def groupKey(self) -> str:
        """The DHT key of this peer's group descriptor."""
        return groupKey(self.group)


def groupKey(gname: str) -> str:
    """
    @return: the DHT key of the descriptor of group C{gname}.
    """
    return f"group:{gname.lower()}"


def asAddress(address) -> Address:
    """
    @return: C{address} if it is an L{Address}, else C{str(address)} parsed.
    @raise BadAddress: if that is not an address.
    """
    return address if isinstance(address, Address) else Address.parse(str(address))
