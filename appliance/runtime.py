"""Process-wide runtime settings that must be in place before native libraries load."""

from __future__ import annotations

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
