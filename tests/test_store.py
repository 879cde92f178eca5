"""
Tests for L{p2pmta.store}.
"""

import hashlib
import os
import threading
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from p2pmta.fileutil import TEMP_PREFIX
from p2pmta.interfaces import IOutbox
from p2pmta.store import Outbox, isDigest, sha256Hex


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _SyncPool:
    """
    A threadpool that runs work at once, in the calling thread.
    """

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:  # noqa: BLE001 (handed on, as ThreadPool does)
            onResult(False, Failure())
        else:
            onResult(True, result)


class _ImmediateReactor:
    """
    Just enough reactor for L{deferToThreadPool} with L{_SyncPool}.
    """

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


_DIGEST_TEXT = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


class IsDigestTests(SynchronousTestCase):
    """
    Tests for L{isDigest}.
    """

    @given(st.binary())
    def test_sha256IsDigest(self, data: bytes) -> None:
        """
        Every SHA-256 hex digest is a digest.
        """
        self.assertTrue(isDigest(_digest(data)))
        self.assertEqual(sha256Hex(data), _digest(data))

    @given(st.text(max_size=200))
    def test_onlyLowercaseHex64(self, s: str) -> None:
        """
        Any text is a digest exactly when it is 64 lowercase hex digits.
        """
        expected = len(s) == 64 and all(c in "0123456789abcdef" for c in s)
        self.assertEqual(isDigest(s), expected)

    @given(_DIGEST_TEXT, st.sampled_from(["\n", "\r\n", " ", "\x00", "/", ".txt"]))
    def test_noTrailingJunk(self, digest: str, junk: str) -> None:
        """
        A digest followed or preceded by anything, a newline included, is not
        a digest.
        """
        self.assertTrue(isDigest(digest))
        self.assertFalse(isDigest(digest + junk))
        self.assertFalse(isDigest(junk + digest))

    def test_rejects(self) -> None:
        """
        Upper case, short, long, non-hex and non-text values are refused.
        """
        d = _digest(b"x")
        for bad in [d.upper(), d[:-1], d + "0", "g" * 64, "", d.encode(), None, 5]:
            self.assertFalse(isDigest(bad), bad)


class OutboxTests(TestCase):
    """
    Tests for L{Outbox} with a real threadpool.
    """

    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-store")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dir = os.path.abspath(self.mktemp())
        self.outbox = Outbox(reactor, self.dir, self.pool)

    def test_interface(self) -> None:
        """
        L{Outbox} provides L{IOutbox}.
        """
        self.assertTrue(verifyObject(IOutbox, self.outbox))

    def test_createsPrivateFolder(self) -> None:
        """
        The folder is created with mode 0700.
        """
        self.assertEqual(os.stat(self.dir).st_mode & 0o777, 0o700)

    @inlineCallbacks
    def test_addAndRead(self):
        """
        C{add} stores the bytes under their SHA-256; C{path}, C{digests},
        C{sizeOf} and C{totalBytes} see them.
        """
        data = b"ciphertext" * 100
        digest = yield self.outbox.add(data)
        self.assertEqual(digest, _digest(data))
        path = self.outbox.path(digest)
        self.assertIsInstance(path, FilePath)
        self.assertEqual(path.getContent(), data)
        self.assertEqual(path.path, os.path.join(self.dir, digest))
        self.assertEqual(self.outbox.digests(), [digest])
        self.assertEqual(self.outbox.sizeOf(digest), len(data))
        self.assertEqual(self.outbox.totalBytes(), len(data))
        self.assertEqual(os.stat(path.path).st_mode & 0o777, 0o600)

    @inlineCallbacks
    def test_addTwice(self):
        """
        Adding the same bytes twice, even at once, stores them once.
        """
        data = os.urandom(5000)
        digests = yield gatherResults([self.outbox.add(data) for _ in range(5)])
        self.assertEqual(set(digests), {_digest(data)})
        self.assertEqual(os.listdir(self.dir), [_digest(data)])

    @inlineCallbacks
    def test_digestsSorted(self):
        """
        C{digests} is sorted and C{totalBytes} sums every message.
        """
        blobs = [os.urandom(n) for n in (1, 10, 100, 1000)]
        yield gatherResults([self.outbox.add(b) for b in blobs])
        self.assertEqual(self.outbox.digests(), sorted(_digest(b) for b in blobs))
        self.assertEqual(self.outbox.totalBytes(), 1111)

    @inlineCallbacks
    def test_emptyMessage(self):
        """
        An empty ciphertext is stored like any other.
        """
        digest = yield self.outbox.add(b"")
        self.assertEqual(self.outbox.sizeOf(digest), 0)
        self.assertEqual(self.outbox.path(digest).getContent(), b"")

    @inlineCallbacks
    def test_remove(self):
        """
        C{remove} removes; removing again, or a malformed digest, is fine.
        """
        digest = yield self.outbox.add(b"gone soon")
        result = yield self.outbox.remove(digest)
        self.assertIsNone(result)
        self.assertIsNone(self.outbox.path(digest))
        self.assertIsNone(self.outbox.sizeOf(digest))
        self.assertEqual(self.outbox.digests(), [])
        yield self.outbox.remove(digest)
        yield self.outbox.remove("../../etc/passwd")

    def test_crashLeftoversCleaned(self) -> None:
        """
        Temporary files left by a crash are removed when the outbox is
        opened; stored messages and unrelated files stay.
        """
        digest = _digest(b"kept")
        with open(os.path.join(self.dir, digest), "wb") as f:
            f.write(b"kept")
        for name in [TEMP_PREFIX + "abc123", TEMP_PREFIX + _digest(b"x")]:
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(b"half a mess")
        with open(os.path.join(self.dir, "README"), "wb"):
            pass
        Outbox(reactor, self.dir, self.pool)
        self.assertEqual(sorted(os.listdir(self.dir)), sorted([digest, "README"]))
        self.assertEqual(self.outbox.digests(), [digest])

    def test_ignoresOtherEntries(self) -> None:
        """
        Folders, symbolic links and names that are not digests are never
        listed, sized or handed out.
        """
        folder = _digest(b"folder")
        os.mkdir(os.path.join(self.dir, folder))
        outside = os.path.join(os.path.dirname(self.dir), "outside")
        with open(outside, "wb") as f:
            f.write(b"secret")
        link = _digest(b"link")
        os.symlink(outside, os.path.join(self.dir, link))
        upper = _digest(b"upper").upper()
        with open(os.path.join(self.dir, upper), "wb"):
            pass
        self.assertEqual(self.outbox.digests(), [])
        self.assertEqual(self.outbox.totalBytes(), 0)
        for name in [folder, link, upper]:
            self.assertIsNone(self.outbox.path(name))
            self.assertIsNone(self.outbox.sizeOf(name))

    @inlineCallbacks
    def test_tempFilesNeverListed(self):
        """
        While writes are in flight, C{digests} lists only finished messages,
        never a temporary file.
        """
        seen = set()
        stop = threading.Event()
        failures = []

        def watch():
            while not stop.is_set():
                try:
                    names = self.outbox.digests()
                except OSError as e:  # pragma: no cover
                    failures.append(e)
                    return
                seen.update(names)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            blobs = [os.urandom(200_000) for _ in range(20)]
            digests = yield gatherResults([self.outbox.add(b) for b in blobs])
        finally:
            stop.set()
            watcher.join()
        self.assertEqual(failures, [])
        self.assertTrue(seen <= set(digests), seen - set(digests))
        for digest, blob in zip(digests, blobs):
            self.assertEqual(self.outbox.path(digest).getContent(), blob)


class OutboxSpareTests(SynchronousTestCase):
    """
    A removed ciphertext's file holds a later one (see
    L{p2pmta.fileutil.SpareFiles}), unless it is being read.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.outbox = Outbox(_ImmediateReactor(), self.dir, _SyncPool())

    def test_removedFileReused(self) -> None:
        """
        After C{remove}, the digest is no longer held, and the next
        ciphertext stored (by C{add} or C{storeWith}) is written into the
        removed one's inode, holding only its own bytes.
        """
        first = self.successResultOf(self.outbox.add(b"first" * 1000))
        inode = os.stat(os.path.join(self.dir, first)).st_ino
        self.successResultOf(self.outbox.remove(first))
        self.assertIsNone(self.outbox.path(first))
        self.assertEqual(self.outbox.digests(), [])
        digest, size, _ = self.outbox.storeWith(lambda out: out.write(b"second"))
        self.assertEqual(digest, _digest(b"second"))
        self.assertEqual(os.stat(os.path.join(self.dir, digest)).st_ino, inode)
        self.assertEqual(self.outbox.path(digest).getContent(), b"second")
        self.assertEqual(os.listdir(self.dir), [digest])
        # And again through add():
        self.successResultOf(self.outbox.remove(digest))
        third = self.successResultOf(self.outbox.add(b"third"))
        self.assertEqual(os.stat(os.path.join(self.dir, third)).st_ino, inode)
        self.assertEqual(self.outbox.path(third).getContent(), b"third")

    def test_fileBeingServedNotReused(self) -> None:
        """
        A ciphertext removed while open (being served) keeps its bytes for
        its reader, and its file is not reused.
        """
        data = os.urandom(200000)
        digest = self.successResultOf(self.outbox.add(data))
        path = os.path.join(self.dir, digest)
        inode = os.stat(path).st_ino
        with open(path, "rb") as reader:
            head = reader.read(1000)
            self.successResultOf(self.outbox.remove(digest))
            other = self.successResultOf(self.outbox.add(b"other"))
            self.assertNotEqual(os.stat(os.path.join(self.dir, other)).st_ino, inode)
            self.assertEqual(head + reader.read(), data)


class OutboxSyncTests(SynchronousTestCase):
    """
    Tests for L{Outbox} with a synchronous threadpool, for the checks that
    need no real thread.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.outbox = Outbox(_ImmediateReactor(), self.dir, _SyncPool())

    def test_addRunsInPool(self) -> None:
        """
        C{add} returns a Deferred of the digest (fired at once here).
        """
        d = self.outbox.add(b"abc")
        self.assertIsInstance(d, Deferred)
        self.assertEqual(self.successResultOf(d), _digest(b"abc"))

    @given(st.text(max_size=300))
    def test_badDigestNeverTouchesFileSystem(self, s: str) -> None:
        """
        C{path}, C{sizeOf} and C{remove} of anything that is not a digest
        answer "not held" without any file-system call.
        """
        if isDigest(s):
            return

        def boom(*a, **k):
            raise AssertionError(f"file system touched for {s!r}")

        with (
            mock.patch("os.lstat", boom),
            mock.patch("os.stat", boom),
            mock.patch("os.unlink", boom),
            mock.patch("os.path.exists", boom),
        ):
            self.assertIsNone(self.outbox.path(s))
            self.assertIsNone(self.outbox.sizeOf(s))
            self.assertIsNone(self.successResultOf(self.outbox.remove(s)))

    @given(_DIGEST_TEXT)
    def test_wellFormedButAbsent(self, digest: str) -> None:
        """
        A well-formed digest that is not held gives L{None}.
        """
        self.assertIsNone(self.outbox.path(digest))
        self.assertIsNone(self.outbox.sizeOf(digest))

    def test_traversalNames(self) -> None:
        """
        Names that would leave the folder are refused, even if a file with a
        digest name sits next to the outbox.
        """
        outside = _digest(b"outside")
        with open(os.path.join(os.path.dirname(self.dir), outside), "wb") as f:
            f.write(b"outside")
        for name in [
            "../" + outside,
            "/" + outside,
            os.path.join(os.path.dirname(self.dir), outside),
            outside + "/",
            outside + "\n",
        ]:
            self.assertIsNone(self.outbox.path(name), name)
        self.assertIsNone(self.outbox.path(outside))

    def test_failedWriteLeavesNothing(self) -> None:
        """
        A write that fails (here: the disk is full) leaves no temporary file
        and no message.
        """

        def full(fd):
            raise OSError(28, "No space left on device")

        with mock.patch("os.fsync", full):
            d = self.outbox.add(b"doomed")
        self.failureResultOf(d, OSError)
        self.assertEqual(os.listdir(self.dir), [])
