"""
Tests for L{p2pmta.imapselected}; its commands are tested through the
server in L{tests.test_imap}.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pmta import imapselected


class WindowsTests(SynchronousTestCase):
    """
    Tests for L{imapselected._windows}.
    """

    def test_cutBySize(self):
        """
        Messages go in runs of at most the size together and at most the
        count; a bigger one goes alone; no message at all is one empty run.
        """

        class Record:
            def __init__(self, size):
                self.size = size

        live = [(n, n, Record(size)) for n, size in enumerate([5, 5, 5, 20, 1, 4], 1)]
        cut = imapselected._windows(live, 10, 5)
        self.assertEqual([[x[0] for x in window] for window in cut], [[1, 2], [3], [4], [5, 6]])
        self.assertEqual(imapselected._windows([], 10, 5), [[]])
        cut = imapselected._windows(live, 100, 2)
        self.assertEqual([[x[0] for x in window] for window in cut], [[1, 2], [3, 4], [5, 6]])
