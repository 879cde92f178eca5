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

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
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
        # meta key -> value -> UIDs, for the keys looked up so far
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
            if uids:
                found[value] = [self.records[u] for u in sorted(uids)]
        return found

    def _index(self, record: MessageRecord) -> None:
        for key, index in self._byMeta.items():
            _add(index, record.meta, key, record.uid)

    def _unindex(self, record: MessageRecord | None) -> None:
        if record is None:
            return
        for key, index in self._byMeta.items():
            try:
                uids = index.get(record.meta.get(key))
            except TypeError:
                continue
            if uids is not None:
                uids.discard(record.uid)
                if not uids:
                    del index[record.meta[key]]


def _add(index: dict, meta: dict, key: str, uid: int) -> None:
    """Index C{uid} under C{meta[key]}, if it has a hashable one."""
    if key not in meta:
        return
    try:
        index.setdefault(meta[key], set()).add(uid)
    except TypeError:
        pass
