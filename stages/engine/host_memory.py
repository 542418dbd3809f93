"""Keep freed host memory inside the process for the next step (glibc malloc), instead of returning it to the kernel.

Why: a training or generation step allocates and frees the same large CPU tensors every step (the attention
scores alone are batch x heads x length^2 fp32: 32 MB for 8 x 9 x 336^2). glibc hands blocks above its mmap
threshold (which grows to at most 32 MB) to fresh ``mmap()`` calls and unmaps them on free, and gives the top of
the heap back to the kernel once more than the trim threshold is free there, so every step writes to new pages
and pays a page fault for each 4 KB: 48,000 per pass of the training bench's plain steps on this VM (up to
400,000 in other runs), 4 % of their time (``bench/host_memory.py``). With mmap off and trimming out of reach,
the next step reuses the memory the previous one freed. No arithmetic changes: the same loss, and the same
prompt gradient bit for bit on shared-prefix batches (on plain batches it already varies in its last bits
between two identical steps, with or without this).

Cost: the process keeps its peak heap until it exits (the RSS does not shrink between steps); the knob is
``trainer.reuse_host_memory`` in the prompt_learning and evaluation configs, true by default. On a libc other
than glibc (or other systems) it does nothing and says so.
"""
from __future__ import annotations

import ctypes
import logging
import platform
import sys
from typing import Callable

log = logging.getLogger("promptlaunch")

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1   # mallopt takes an int: trim only when 2 GB at the heap top are free
_in_effect = False


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None where this process does not run on glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def reuse_host_memory(enabled: bool = True, key: str = "trainer.reuse_host_memory") -> bool:
    """Switch glibc malloc to keep freed memory for reuse (no mmap for large blocks, no heap trimming) when
    ``enabled``; process-wide and not undone. Returns whether the setting is in effect."""
    if not enabled:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        log.info("%s: not glibc malloc here, left as it is", key)
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    global _in_effect
    _in_effect = _in_effect or ok
    if ok:
        log.info("%s: freed host memory is kept for the next step (glibc malloc: no mmap, no trimming)", key)
    else:
        log.warning("%s: glibc refused the malloc settings; memory is allocated as usual", key)
    return ok


def in_effect() -> bool:
    """Whether ``reuse_host_memory`` has switched this process over (benches record it with their figures)."""
    return _in_effect
