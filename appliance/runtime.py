"""Process-wide runtime settings that must be in place before native libraries load."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import cast

from .config import Settings

log = logging.getLogger(__name__)

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def configure_threads(settings: Settings) -> None:
    """Cap the BLAS/OpenMP pools and forbid hub access. Each engine also sets its own explicit thread
    count; these variables only stop libraries from spawning one thread per core on their own."""
    cap = str(max(1, max(settings.threads.asr, settings.threads.llm)))
    for var in _THREAD_VARS:
        os.environ.setdefault(var, cap)
    # Nothing may download at run time: any library that tries to reach a hub fails at once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb


class HeapTrimmer:
    """Hands freed heap memory back to the OS after a call ends (glibc's ``malloc_trim``).

    Each call allocates and frees audio buffers, transcripts and inference scratch memory in many
    threads, each with its own malloc arena; freed pages in the middle of an arena stay resident,
    so a long-running server's RSS creeps up in steps although nothing leaks. ``malloc_trim(0)``
    releases them (``madvise``) without changing how malloc allocates. Changing that instead
    (``M_ARENA_MAX``, ``M_MMAP_THRESHOLD``) was measured to slow Whisper's decoding by 35–55%.
    A trim walks every arena under its lock, so it runs in a worker thread, at most once per
    ``min_interval_s``."""

    def __init__(self, *, min_interval_s: float = 30.0):
        self.min_interval_s = min_interval_s
        self._trim = _malloc_trim()
        self._last = -math.inf
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def due(self) -> bool:
        return self._trim is not None and time.monotonic() - self._last >= self.min_interval_s

    def trim(self) -> float:
        """Trim now (blocking); returns the MB of resident memory given back."""
        if self._trim is None:
            return 0.0
        self._last = time.monotonic()
        before = _rss_mb()
        started = time.perf_counter()
        self._trim(0)
        self.trims += 1
        released = max(0.0, before - _rss_mb())
        log.info("heap trim: %.1f MB given back in %.0f ms", released, (time.perf_counter() - started) * 1000)
        return released


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


def resident_bytes() -> int | None:
    """This process's resident memory from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _rss_mb() -> float:
    return (resident_bytes() or 0) / 2**20
