"""
Tests for L{p2pmta.mimestructure}; the structures of real messages are
tested through FETCH in L{tests.test_imap} and L{tests.test_hostile_imap}.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pmta.mimestructure import parseStructure


class StructureTests(SynchronousTestCase):
    """
    Tests for L{parseStructure}.
    """

    def test_structureOfEmptyFile(self):
        """
        An empty message file has a structure too.
        """
        path = self.mktemp()
        with open(path, "wb"):
            pass
        self.assertEqual(parseStructure(path).ctype, "text/plain")
