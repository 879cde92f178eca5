# -*- test-case-name: tests.test_imap,tests.test_hostile_imap -*-
"""
A session's view of its selected mailbox: L{SelectedMailbox}, the
session's own sequence-number to UID list, and the changes other sessions
made that it has not announced yet (RFC 3501 section 7.4.1 says when it
may).  Its SEARCH evaluates L{p2pmta.imapsearch}'s keys over this view.
"""

from __future__ import annotations

import bisect

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.mail.imap4 import IMailboxInfo, ISearchableMailbox
from zope.interface import implementer

from p2pmta.imapsearch import SearchResult, needsBody, search
from p2pmta.imapsyntax import SYSTEM_FLAGS, flagList, resolveSet


@implementer(IMailboxInfo, ISearchableMailbox)
class SelectedMailbox:
    """
    One session's view of a selected mailbox: its own sequence-number to
    UID list, and the changes made by others that it has not announced
    yet.

    @ivar uids: The UIDs the session knows, in order: sequence number
        C{n} is C{uids[n - 1]}.
    @ivar onChange: Called (no argument) after each change of the mailbox.
    """

    def __init__(self, store, name: str, rw: bool) -> None:
        self.store = store
        self.name = name
        self.rw = rw
        self.uids = store.uids(name)
        self.onChange = None
        self._expunged: set = set()
        self._added: set = set()
        self._flagged: set = set()
        store.addListener(name, self._changed)

    def close(self) -> None:
        self.store.removeListener(self.name, self._changed)
        self.onChange = None

    def _changed(self, event: str, uid: int) -> None:
        known = self.seqOf(uid) is not None
        if event == "added" and not known:
            self._added.add(uid)
        elif event == "expunged":
            if known:
                self._expunged.add(uid)
                self._flagged.discard(uid)
            self._added.discard(uid)
        elif event == "flags" and known:
            self._flagged.add(uid)
        if self.onChange is not None:
            self.onChange()

    def seqOf(self, uid: int):
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def resolve(self, ranges: list, byUid: bool) -> list:
        """
        @return: C{(seq, uid)} of the messages a sequence set names in this
            view.
        """
        if byUid:
            return [(self.seqOf(u), u) for u in resolveSet(ranges, self.uids)]
        return [
            (n, self.uids[n - 1])
            for n in resolveSet(ranges, range(1, len(self.uids) + 1))
        ]

    def flagsReported(self, uids) -> None:
        self._flagged.difference_update(uids)

    def announcements(self, expunges: bool) -> list:
        """
        Apply the pending changes to the view and return the untagged
        lines that announce them: EXPUNGE (only if C{expunges}), FETCH
        FLAGS, EXISTS.
        """
        lines = []
        if expunges and self._expunged:
            for uid in sorted(self._expunged, reverse=True):
                seq = self.seqOf(uid)
                if seq is not None:
                    del self.uids[seq - 1]
                    lines.append(b"* %d EXPUNGE" % seq)
            self._expunged.clear()
        for uid in sorted(self._flagged):
            record = self.store.record(self.name, uid)
            seq = self.seqOf(uid)
            if record is not None and seq is not None:
                lines.append(b"* %d FETCH (FLAGS %s)" % (seq, flagList(record.flags)))
        self._flagged.clear()
        added = sorted(
            u for u in self._added if self.store.record(self.name, u) is not None
        )
        self._added.clear()
        if added:
            self.uids.extend(u for u in added if not self.uids or u > self.uids[-1])
            lines.append(b"* %d EXISTS" % len(self.uids))
        return lines

    def getFlags(self) -> list:
        keywords = set()
        for record in self.store.messages(self.name):
            keywords.update(f for f in record.flags if not f.startswith("\\"))
        return [*SYSTEM_FLAGS, *sorted(keywords)]

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def evaluate(self, query, uid: bool) -> Deferred:
        """
        Evaluate a key parsed by L{p2pmta.imapsearch.parseSearch} over this
        view.

        @return: a Deferred firing with a L{SearchResult} whose C{found} are
            the matching UIDs (C{uid}) or sequence numbers.
        """
        candidates = []
        for seq, u in enumerate(self.uids, 1):
            record = self.store.record(self.name, u)
            if record is not None:
                path = self.store.bodySource(self.name, u) if record.held else None
                candidates.append((seq, record, path))
        last = (len(self.uids), self.uids[-1] if self.uids else 0)
        if needsBody(query) or len(candidates) > 500:
            d = self.store.runInThread(search, query, candidates, *last)
        else:
            d = maybeDeferred(search, query, candidates, *last)

        def numbers(result: SearchResult) -> SearchResult:
            result.found = [u if uid else s for s, u in result.found]
            return result

        return d.addCallback(numbers)

    def search(self, query, uid) -> Deferred:
        """
        C{ISearchableMailbox.search}: L{evaluate}'s numbers.
        """
        return self.evaluate(query, uid).addCallback(lambda result: result.found)
