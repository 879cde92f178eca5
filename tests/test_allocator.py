"""
Tests for L{p2pmta.allocator}.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from p2pmta import allocator

# A fresh interpreter sets its allocator, then makes and frees buffers of
# 1.4 MB in waves of eight, as a peer pulling 1 MB messages several at a
# time does, and prints its page faults over twenty waves (after two to
# warm up).
_CHURN = """
import resource
from p2pmta.allocator import keepFreedMemory
print(keepFreedMemory({}))
for wave in range(22):
    if wave == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [bytes(1400000) for _ in range(8)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _churn() -> tuple[str, int]:
    """Run L{_CHURN}: what it set and its page faults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _CHURN],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    return out[0], int(out[1])


class _FakeLibc:
    """Records what L{keepFreedMemory} asks of the C library."""

    def __init__(self, answer: int = 1) -> None:
        self.calls: list = []
        self._answer = answer
        self.gnu_get_libc_version = object()

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self._answer


class KeepFreedMemoryTests(SynchronousTestCase):
    def test_buffersReused(self) -> None:
        """
        In a real process, the memory of a wave of large buffers is used
        again for the next wave.  (Without the settings, this machine's
        glibc 2.36 faults in about 4800 pages over the twenty waves.)
        """
        if not (sys.platform.startswith("linux") and allocator.gnuLibc()):
            raise self.skipTest("the GNU C library only")
        took, faults = _churn()
        self.assertEqual(took, "True")
        self.assertLess(faults, 500)

    def test_settings(self) -> None:
        """
        The mapping threshold and the trim threshold are both set, by
        mallopt(3)'s numbers.
        """
        libc = _FakeLibc()
        self.assertTrue(allocator.keepFreedMemory({}, "linux", libc))
        self.assertEqual(
            libc.calls,
            [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)],
        )

    def test_refused(self) -> None:
        """A setting the C library refuses is reported."""
        self.assertFalse(allocator.keepFreedMemory({}, "linux", _FakeLibc(answer=0)))

    def test_userSettingsWin(self) -> None:
        """
        What the user set for the allocator in the environment is left as
        it is.
        """
        for environ in (
            {"MALLOC_TRIM_THRESHOLD_": "0"},
            {"MALLOC_MMAP_THRESHOLD_": "131072"},
            {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
        ):
            libc = _FakeLibc()
            self.assertFalse(allocator.keepFreedMemory(environ, "linux", libc))
            self.assertEqual(libc.calls, [])
        libc = _FakeLibc()
        self.assertTrue(allocator.keepFreedMemory({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, "linux", libc))

    def test_otherSystems(self) -> None:
        """
        Elsewhere than Linux, and with a C library that is not GNU's, nothing
        is set.
        """
        libc = _FakeLibc()
        self.assertFalse(allocator.keepFreedMemory({}, "darwin", libc))
        self.assertEqual(libc.calls, [])

        class Musl:
            def mallopt(self, parameter, value):
                raise AssertionError("called")

        self.assertFalse(allocator.keepFreedMemory({}, "linux", Musl()))
