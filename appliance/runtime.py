"""Process-wide runtime settings that must be in place before native libraries load."""

from __future__ import annotations

import ctypes
import os

from .config import Settings

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


# glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def configure_malloc(*, arenas: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """Keep a long-running server's heap from creeping (glibc only; a no-op elsewhere).

    Every thread that allocates gets a malloc arena of its own (up to 8 per core), each holding on
    to freed memory; and glibc's mmap threshold grows with every large block freed, after which
    blocks of that size come from the heap and fragment it. Engines and the event loop allocate
    from a dozen threads, so a server's RSS went on growing by steps over hours of calls. Two arenas
    and a fixed 1 MiB threshold (larger blocks are mapped and returned to the system on free) keep
    it flat. Returns whether glibc took the settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas)) and bool(
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        )
    except (OSError, AttributeError):
        return False
