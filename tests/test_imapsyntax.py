"""
Tests for L{p2pmta.imapsyntax}; the commands it reads are tested through
the server in L{tests.test_imap} and L{tests.test_hostile_imap}.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pmta.imapsyntax import Args, BadCommand, Literal, parseSequenceSet, resolveSet


class ParsingTests(SynchronousTestCase):
    """
    Tests for the argument parsers.
    """

    def test_sequenceSets(self):
        """
        Sequence sets are resolved against the ids held only, clamped.
        """
        ids = [3, 7, 9]
        self.assertEqual(
            resolveSet(parseSequenceSet(b"1:99999999999999999999"), ids), ids
        )
        self.assertEqual(resolveSet(parseSequenceSet(b"*"), ids), [9])
        self.assertEqual(resolveSet(parseSequenceSet(b"8:4"), ids), [7])
        self.assertEqual(resolveSet(parseSequenceSet(b"100:*"), ids), [9])
        self.assertEqual(resolveSet(parseSequenceSet(b"1,9"), range(1, 4)), [1])
        for bad in (b"0", b"1:0", b"a", b"1,", b"1::2", b""):
            self.assertRaises(BadCommand, parseSequenceSet, bad)

    def test_quotedAndLiteral(self):
        """
        Quoted strings unescape; literals are read as they were collected.
        """
        args = Args([b'"a \\"b\\" \\\\c" ', Literal(b"lit\r\neral"), b""])
        self.assertEqual(args.astring(), b'a "b" \\c')
        args.sp()
        self.assertEqual(args.astring(), b"lit\r\neral")
        args.end()
