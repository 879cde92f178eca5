# -*- test-case-name: tests.test_allocator -*-
"""
How a peer's process keeps the memory it frees (GNU C library only).

A pulled body of 1 MB passes through several buffers of about its size
(the decrypted message, what is written to the mail client and to disk).
By default the C library hands such buffers back to the kernel when they
are freed (it maps large buffers on their own, and trims the free top of
a heap beyond about twice the largest it has mapped), so the next body's
buffers start on fresh pages: about 300 page faults per 1 MB message,
each zeroing a page.  On a virtual machine that reports freed memory to
its host, each of those faults is also a fault in the host.  Raw-client
fetches of 300 x 1 MB on this project's 2-core VM took 2.5-2.6 s with
about 300 faults per message, and 1.8-2.1 s with the settings below
(1,100-1,500 faults for all 300).

So a peer asks the C library to serve buffers up to L{MMAP_THRESHOLD}
from its heaps and to keep up to L{TRIM_THRESHOLD} free at the top of
each heap.  The price is memory: about 20 MB more at the peak in that
run (150 MB against 130), and what a burst took stays resident after it
(the benchmark's receiver held 161-167 MB through its full run, against
107-143 MB before).  Settings the user gave through the environment
(C{MALLOC_*_} or C{GLIBC_TUNABLES}) win.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: Buffers up to this size come from the heaps, not maps of their own.
MMAP_THRESHOLD = 4 * 1024 * 1024

#: The most free memory a heap keeps at its top.
TRIM_THRESHOLD = 16 * 1024 * 1024

# mallopt(3)'s parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _userSetsAllocator(environ) -> bool:
    if any(name in environ for name in _USER_SETTINGS):
        return True
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def gnuLibc(libc=None):
    """
    C{libc} (by default, this process's C library) if it is the GNU C
    library, else L{None}.  Only glibc names C{gnu_get_libc_version}; musl's
    C{mallopt}, for one, does nothing.
    """
    try:
        if libc is None:
            libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    return libc


def keepFreedMemory(environ=os.environ, platform: str = sys.platform, libc=None) -> bool:
    """
    Set the process's allocator as described above, unless the user set it.

    @param libc: the C library (for tests); by default, this process's.
    @return: whether both settings took.
    """
    if not platform.startswith("linux") or _userSetsAllocator(environ):
        return False
    libc = gnuLibc(libc)
    if libc is None:
        return False
    # Setting either one also stops glibc from moving the thresholds itself.
    mapped = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mapped and trimmed)
