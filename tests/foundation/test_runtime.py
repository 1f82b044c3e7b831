from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from appliance.runtime import HeapTrimmer, _rss_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")


def test_trim_gives_freed_heap_pages_back_and_is_throttled() -> None:
    trimmer = HeapTrimmer(min_interval_s=3600)
    assert trimmer.available and trimmer.due()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 96 MB in 32 KB blocks (below the mmap threshold: from the heap), touched so they are resident;
    # the last block stays allocated so the freed ones sit below it, where free() cannot trim.
    blocks = [libc.malloc(32 * 1024) for _ in range(3072)]
    for block in blocks:
        ctypes.memset(block, 1, 32 * 1024)
    keeper = blocks.pop()
    for block in blocks:
        libc.free(block)
    resident = _rss_mb()
    released = trimmer.trim()
    libc.free(keeper)
    assert released > 48, (resident, released)
    assert trimmer.trims == 1
    assert not trimmer.due()  # at most once per interval
