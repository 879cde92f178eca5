"""
Addresses of the form name@group and their DHT key names.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.address import Address, groupKey
from p2pmta.errors import BadAddress

atoms = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)


class AddressTests(SynchronousTestCase):
    def test_parse(self):
        """name@group parses into its two parts, lower-cased."""
        address = Address.parse("Alice@Demo")
        self.assertEqual((address.name, address.group), ("alice", "demo"))
        self.assertEqual(str(address), "alice@demo")

    def test_angleBrackets(self):
        """SMTP's <name@group> form is accepted."""
        self.assertEqual(Address.parse(b"<bob@demo>"), Address("bob", "demo"))

    def test_keys(self):
        """The DHT keys follow the paper's names."""
        address = Address.parse("bob@g")
        self.assertEqual(address.descriptorKey, "bob@g")
        self.assertEqual(address.sendKey, "ns:bob@g")
        self.assertEqual(address.receiveKey, "nr:bob@g")
        self.assertEqual(address.groupKey, "group:g")
        self.assertEqual(groupKey("G"), "group:g")

    def test_malformed(self):
        """Anything that is not name@group is refused with BadAddress."""
        for text in ["", "alice", "@demo", "alice@", "a@b@c", "a b@c", "a@b\r\nRCPT", "é@x",
                     b"\xff@x", "a..b@c", "x" * 250 + "@demo"]:
            self.assertRaises(BadAddress, Address.parse, text)

    @given(atoms, atoms)
    def test_roundTrip(self, name, group):
        """Every well-formed address survives str() and parse()."""
        address = Address.parse(f"{name}@{group}")
        self.assertEqual(Address.parse(str(address)), address)

    @given(st.text(max_size=80))
    def test_neverCrashes(self, text):
        """Arbitrary text parses or raises BadAddress, nothing else."""
        try:
            address = Address.parse(text)
        except BadAddress:
            return
        self.assertNotIn("\n", str(address))
