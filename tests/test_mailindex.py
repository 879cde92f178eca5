"""
Tests for L{p2pmta.mailindex}.
"""

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta import mailindex
from p2pmta.mailindex import MailboxIndex, MessageRecord, splitHeaders


class SplitHeadersTests(SynchronousTestCase):
    """
    Tests for L{splitHeaders}.
    """

    @given(
        st.lists(
            st.from_regex(rb"[A-Za-z-]{1,10}: [ -~]{0,30}\r\n", fullmatch=True),
            max_size=5,
        ),
        st.binary(max_size=50),
    )
    def test_headerSectionWithBlankLine(self, fields, body) -> None:
        """
        The header section is everything up to and including the first
        blank line, whatever the body holds.
        """
        headers = b"".join(fields) + b"\r\n"
        self.assertEqual(splitHeaders(headers + body), headers)

    def test_noBlankLine(self) -> None:
        """
        A message without a blank line is all header.
        """
        self.assertEqual(splitHeaders(b"Subject: x\r\n"), b"Subject: x\r\n")


def _record(uid: int, meta: dict, flags=("\\Seen",)) -> MessageRecord:
    return MessageRecord(uid, frozenset(flags), 0.0, 10, b"Subject: x\r\n\r\n", True, meta)


class MailboxIndexTests(SynchronousTestCase):
    """
    Tests for L{MailboxIndex}.
    """

    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("put"), st.integers(1, 12), st.sampled_from(["a", "b", "c", None])),
                st.tuples(st.just("remove"), st.integers(1, 12), st.none()),
            ),
            max_size=40,
        )
    )
    def test_findAllMatchesTheRecords(self, steps) -> None:
        """
        Whatever the order of additions, changes and removals, and whether
        a value is first looked up before or after them, L{findAll} finds
        exactly the records whose meta holds the value, in UID order.
        """
        early = MailboxIndex("INBOX", [], 1, 1)
        early.findAll("k", ["a"])  # the lookup table exists from the start
        late = MailboxIndex("INBOX", [], 1, 1)
        for action, uid, value in steps:
            for box in (early, late):
                if action == "put":
                    box.put(_record(uid, {} if value is None else {"k": value}), None)
                else:
                    box.remove([uid])
        for box in (early, late):
            found = box.findAll("k", ["a", "b", "c", "d"])
            expected = {}
            for uid in box.uids:
                value = box.records[uid].meta.get("k")
                if value is not None:
                    expected.setdefault(value, []).append(box.records[uid])
            self.assertEqual(found, expected)

    def test_unhashableValues(self) -> None:
        """
        A meta value that cannot be a key (a list) is never found, and does
        not stop the others from being found.
        """
        box = MailboxIndex("INBOX", [], 1, 1)
        box.put(_record(1, {"k": ["x"]}), None)
        box.put(_record(2, {"k": "y"}), None)
        self.assertEqual(box.findAll("k", [["x"], "y"]), {"y": [box.records[2]]})
        box.remove([1, 2])
        self.assertEqual(box.findAll("k", ["y"]), {})


class MessageRecordTests(SynchronousTestCase):
    """
    Tests for L{MessageRecord}: a mailbox's records stay in memory, so they
    share what they have in common.
    """

    def test_flagSetsShared(self) -> None:
        """
        Records with equal flags hold the same set.
        """
        self.patch(mailindex, "_FLAG_SETS", {})  # whatever other tests made
        one = _record(1, {}, ["\\Seen", "\\Flagged"])
        two = _record(2, {}, ["\\Flagged", "\\Seen"])
        self.assertIs(one.flags, two.flags)
        self.assertEqual(one.flags, frozenset(["\\Seen", "\\Flagged"]))

    def test_flagSetsBounded(self) -> None:
        """
        Only so many flag sets are kept for sharing (clients choose
        keywords); a record with another set still has its flags.
        """
        kept: dict = {}
        self.patch(mailindex, "_FLAG_SETS", kept)
        self.patch(mailindex, "_MOST_FLAG_SETS", 2)
        records = [_record(uid, {}, [f"$K{uid}"]) for uid in range(1, 4)]
        self.assertEqual(len(kept), 2)
        self.assertEqual([r.flags for r in records], [frozenset([f"$K{uid}"]) for uid in range(1, 4)])
        self.assertIs(_record(9, {}, ["$K1"]).flags, records[0].flags)

    def test_metaKeysShared(self) -> None:
        """
        The keys of records' meta are one string each, however they were
        made (as when decoded from JSON); the values are kept as given.
        """
        made = "".join(["outgo", "ing"])
        one = _record(1, json.loads('{"outgoing": "x1", "digest": "d"}'))
        two = _record(2, {made: "x2", "digest": "d"})
        self.assertIs([k for k in one.meta if k == "outgoing"][0], [k for k in two.meta if k == "outgoing"][0])
        self.assertEqual(one.meta, {"outgoing": "x1", "digest": "d"})
        self.assertEqual(two.meta, {"outgoing": "x2", "digest": "d"})

    def test_noInstanceDict(self) -> None:
        """
        A record has no per-instance dictionary (slots), and stays frozen.
        """
        record = _record(1, {})
        self.assertFalse(hasattr(record, "__dict__"))
        self.assertRaises(AttributeError, setattr, record, "uid", 2)
