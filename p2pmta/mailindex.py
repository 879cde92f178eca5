# -*- test-case-name: tests.test_mailindex,tests.test_mailstore -*-
"""
The mail store's index in memory: a L{MessageRecord} for each message, and
for each mailbox a L{MailboxIndex} of its records, their files and their
UIDs, with lookups by the core's C{meta}.

L{p2pmta.mailstore.MailStore} keeps one L{MailboxIndex} per mailbox,
mirroring its database, so that every read of
L{p2pmta.interfaces.IMailStore} is answered from here without waiting; it
changes them only after a write has committed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Each distinct set of flags, once: most messages share one of a few
#: (C{\\Seen}, none), so a record holds a reference, not a set of its own
#: (216 bytes).  Bounded, as clients choose keywords.
_FLAG_SETS: dict[frozenset, frozenset] = {}
_MOST_FLAG_SETS = 512


def _shared(flags: frozenset) -> frozenset:
    shared = _FLAG_SETS.get(flags)
    if shared is None:
        shared = flags
        if len(_FLAG_SETS) < _MOST_FLAG_SETS:
            _FLAG_SETS[flags] = flags
    return shared


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """
    What the index knows of one message.

    @ivar uid: Its IMAP UID in its mailbox.
    @ivar flags: Its flags (a L{frozenset} of L{str}, e.g. C{"\\\\Seen"}).
    @ivar internalDate: Its IMAP INTERNALDATE, seconds since the epoch.
    @ivar size: Its RFC822.SIZE in bytes.
    @ivar headers: Its exact header section, the blank line included.
    @ivar held: Whether its whole file is here.
    @ivar meta: The core's own data about it (JSON-able L{dict}); do not
        mutate it, use L{p2pmta.mailstore.MailStore.updateMeta}.
    """

    uid: int
    flags: frozenset
    internalDate: float
    size: int
    headers: bytes
    held: bool
    meta: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # A mailbox's records stay in memory: share what they have in
        # common (the flag sets, the meta's keys; the keys are the core's
        # own few names, so interning them is bounded).
        object.__setattr__(self, "flags", _shared(self.flags))
        for key in [k for k in self.meta if type(k) is str and k is not sys.intern(k)]:
            self.meta[sys.intern(key)] = self.meta.pop(key)


def splitHeaders(message: bytes) -> bytes:
    """
    @return: the header section of C{message}, up to and including the
        blank line that ends it (or all of C{message} if it has none).
    """
    if message.startswith(b"\r\n"):
        return b"\r\n"
    if message.startswith(b"\n"):
        return b"\n"
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    if not ends:
        return message
    end = min(ends)
    return message[: end + (4 if message[end : end + 4] == b"\r\n\r\n" else 2)]


class MailboxIndex:
    """
    The index of one mailbox.
    """

    def __init__(self, name: str, attributes, uidValidity: int, uidNext: int) -> None:
        self.name = name
        self.attributes = list(attributes)
        self.uidValidity = uidValidity
        self.uidNext = uidNext
        self.records: dict[int, MessageRecord] = {}
        self.files: dict[int, str] = {}
        self.uids: list[int] = []
        # meta key -> value -> UID, or a set of UIDs when several share the
        # value (the usual case is one: an int costs less than a set), for
        # the keys looked up so far
        self._byMeta: dict[str, dict] = {}

    def put(self, record: MessageRecord, filename: str | None) -> None:
        old = self.records.get(record.uid)
        if old is None:
            self.uids.append(record.uid)
            if len(self.uids) > 1 and self.uids[-2] > record.uid:
                self.uids.sort()
        self.records[record.uid] = record
        if old is None or old.meta is not record.meta:
            self._unindex(old)
            self._index(record)
        if filename is None:
            self.files.pop(record.uid, None)
        else:
            self.files[record.uid] = filename

    def remove(self, uids: Iterable[int]) -> None:
        gone = set()
        for uid in uids:
            self._unindex(self.records.pop(uid, None))
            self.files.pop(uid, None)
            gone.add(uid)
        self.uids = [u for u in self.uids if u not in gone]

    def findAll(self, key: str, values) -> dict:
        """
        @return: C{{value: [records, in UID order]}} for those of C{values}
            some record's C{meta[key]} equals.
        """
        index = self._byMeta.get(key)
        if index is None:
            index = self._byMeta[key] = {}
            for uid in self.uids:
                _add(index, self.records[uid].meta, key, uid)
        found = {}
        for value in values:
            try:
                uids = index.get(value)
            except TypeError:  # unhashable: no meta value equals it
                continue
            if type(uids) is int:
                found[value] = [self.records[uids]]
            elif uids:
                found[value] = [self.records[u] for u in sorted(uids)]
        return found

    def _index(self, record: MessageRecord) -> None:
        for key, index in self._byMeta.items():
            _add(index, record.meta, key, record.uid)

    def _unindex(self, record: MessageRecord | None) -> None:
        if record is None:
            return
        for key, index in self._byMeta.items():
            if key not in record.meta:
                continue
            value = record.meta[key]
            try:
                uids = index.get(value)
            except TypeError:
                continue
            if uids == record.uid:
                del index[value]
            elif type(uids) is set:
                uids.discard(record.uid)
                if len(uids) == 1:
                    index[value] = uids.pop()


def _add(index: dict, meta: dict, key: str, uid: int) -> None:
    """Index C{uid} under C{meta[key]}, if it has a hashable one."""
    if key not in meta:
        return
    value = meta[key]
    try:
        uids = index.setdefault(value, uid)
    except TypeError:
        return
    if uids == uid:
        return
    if type(uids) is int:
        index[value] = {uids, uid}
    else:
        uids.add(uid)
