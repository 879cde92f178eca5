"""
Tests for L{p2pmta.service.DataDir}: the layout of a peer's data directory.
"""

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from p2pmta.service import DataDir


class DataDirTests(SynchronousTestCase):
    """
    Tests for L{DataDir.prepare}.
    """

    def setUp(self) -> None:
        self.dataDir = DataDir(self.mktemp())

    def test_layout(self) -> None:
        """
        The folders are made with their modes, and the DHT password is
        made once, readable by the peer's user only, and kept.
        """
        password = self.dataDir.prepare()
        d = self.dataDir
        for path, mode in [
            (d.path, 0o755),
            (d.private, 0o700),
            (d.gnupg, 0o700),
            (d.spool, 0o755),
            (d.outbox, 0o755),
            (d.replicas, 0o755),
            (os.path.join(d.inbox, "cur"), 0o700),
            (d.dhtSecret, 0o600),
        ]:
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), mode, path)
        self.assertEqual(len(password), 64)
        self.assertEqual(DataDir(d.path).prepare(), password)
