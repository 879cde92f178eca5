"""
The entry codec and reading rules shared by every DHT provider.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.dht import entry
from p2pmta.errors import NotFound, ValueTooLarge, WrongPassword


class EntryTests(SynchronousTestCase):
    def test_roundTrip(self):
        """A put entry decodes to itself and never holds the password."""
        put = entry.makePut(b"value", b"secret", 60, 1000.0)
        raw = put.encode()
        self.assertNotIn(b"secret", raw)
        self.assertEqual(entry.decode(raw), put)
        self.assertEqual(put.expires, 1060.0)

    def test_tooLarge(self):
        """Values over the limit are refused before reaching the network."""
        self.assertRaises(ValueTooLarge, entry.makePut, b"x" * (entry.MAX_VALUE_SIZE + 1), b"p", 1, 0)
        self.assertLessEqual(len(entry.makePut(b"\xff" * entry.MAX_VALUE_SIZE, b"p", 1, 0).encode()), 65536 - 256)

    def test_liveValues(self):
        """Expired, tombstoned and duplicate values are hidden."""
        a = entry.makePut(b"a", b"pa", 100, 0)
        b = entry.makePut(b"b", b"pb", 10, 0)
        c = entry.makePut(b"c", b"pc", 100, 0)
        stone = entry.makeTombstone([c.encode()], b"c", b"pc", 0)
        raws = [a.encode(), a.encode(), b.encode(), c.encode(), stone.encode(), b"junk"]
        self.assertEqual(entry.liveValues(raws, 50), [b"a"])
        self.assertEqual(entry.liveValues(raws, 5), [b"a", b"b"])

    def test_tombstoneNeedsPassword(self):
        """A tombstone deletes only with the password given at put."""
        put = entry.makePut(b"v", b"right", 100, 0)
        self.assertRaises(WrongPassword, entry.makeTombstone, [put.encode()], b"v", b"wrong", 0)
        self.assertRaises(NotFound, entry.makeTombstone, [put.encode()], b"w", b"right", 0)
        forged = entry.Tombstone(entry.valueHash(b"v"), b"wrong", 100)
        self.assertEqual(entry.liveValues([put.encode(), forged.encode()], 0), [b"v"])

    def test_samePasswordsDifferentValues(self):
        """A tombstone names one value; others under the key stay."""
        one = entry.makePut(b"1", b"p", 100, 0)
        two = entry.makePut(b"2", b"p", 100, 0)
        stone = entry.makeTombstone([one.encode()], b"1", b"p", 0)
        self.assertEqual(entry.liveValues([one.encode(), two.encode(), stone.encode()], 0), [b"2"])

    @given(st.binary(max_size=300))
    def test_decodeNeverCrashes(self, raw):
        """Arbitrary bytes decode to an entry or None."""
        self.assertIn(type(entry.decode(raw)), (entry.PutEntry, entry.Tombstone, type(None)))

    @given(st.binary(max_size=2000), st.binary(min_size=1, max_size=64), st.floats(1, 1e7))
    def test_putRoundTrip(self, value, password, ttl):
        """Every value and password survives encoding."""
        put = entry.makePut(value, password, ttl, 1.0)
        self.assertEqual(entry.decode(put.encode()), put)
        self.assertEqual(entry.liveValues([put.encode()], 1.0), [value])
