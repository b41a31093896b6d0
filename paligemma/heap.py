"""glibc heap settings that keep the process's memory close to its live tensors.

Two effects of glibc's allocator matter at PaliGemma's sizes:

- Its mmap threshold starts at 128 KB and rises, up to 32 MB, to the size of each memory-mapped
  block freed. After a few layers every activation under 32 MB comes from the heap, and freed
  ones stay resident as free, fragmented heap. A 3B prefill at 896 px (4160 rows) then held
  ~0.7 GB of free heap on top of its live tensors (benchmarks/RESULTS.md, "896 px prefill
  memory"). A fixed threshold gives each large activation its own mapping, returned to the OS
  when freed, at the cost of a page fault per 4 KB when one is allocated (decode steps
  allocate nothing that large; prefill was not slower in `benchmarks/bench_heap_threshold.py`).
- Freed heap is returned only from its top: temporaries freed while loading stay resident.

The fixed threshold costs a prefill of ordinary size its speed: every layer maps its large
activations afresh (a 224 px prefill of 3B: 160k page faults, about 10% of its time), where the
same sizes recur layer after layer. So a forward whose residual stream is small
(`reusing_activations`) lets the heap keep them for its length, and returns the free heap after;
one with a large stream (896 px) keeps the fixed threshold that bounds its memory.

Only glibc on Linux is touched; elsewhere these do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Iterator

LARGE_ALLOCATION_BYTES = 4 << 20  # blocks at least this large get their own memory map
# Free heap kept at the top before glibc returns it to the OS. glibc's dynamic mode keeps twice
# the mmap threshold; fixing the threshold freezes this at 128 KB, and then every allocation
# between 128 KB and 4 MB freed at the top was returned and faulted in again on the next one
# (a 1152 -> 4304 bf16 GEMM of 256 rows: 506 page faults and 2.4 ms per call instead of none
# and 1.5 ms, `benchmarks/RESULTS.md`).
KEPT_FREE_TOP_BYTES = 2 * LARGE_ALLOCATION_BYTES
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
# `reusing_activations`: blocks below glibc's largest mmap threshold (32 MB on 64-bit) come from
# the heap while the residual stream is at most REUSE_STREAM_BYTES: 3B at 224 px up to batch 7,
# at 448 px batch 1; not at 896 px (34-38 MB), whose peak memory the fixed threshold bounds.
REUSE_BELOW_BYTES = 32 << 20
REUSE_STREAM_BYTES = 16 << 20
_reusing = 0  # forwards inside `reusing_activations` that changed the thresholds
_reusing_lock = threading.Lock()
_thresholds_fixed = False  # map_large_allocations ran


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (musl has neither: AttributeError)
    except (OSError, AttributeError):
        return None
    return libc


def map_large_allocations() -> None:
    """Fixes glibc's mmap threshold at LARGE_ALLOCATION_BYTES, and its trim threshold at
    KEPT_FREE_TOP_BYTES, for this process (idempotent).

    Each is left alone where the user set glibc's own tunable (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_) themselves.
    """
    global _thresholds_fixed
    _thresholds_fixed = _set_thresholds(LARGE_ALLOCATION_BYTES, KEPT_FREE_TOP_BYTES)


def _set_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc's mmap and trim thresholds, each unless the user set its tunable; False without
    glibc."""
    libc = _glibc()
    if libc is None:
        return False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)
    return True


@contextlib.contextmanager
def reusing_activations(stream_bytes: int) -> Iterator[None]:
    """Within, blocks under REUSE_BELOW_BYTES come from the heap and are reused from one layer
    to the next, if the forward's residual stream [B, T, D] takes at most REUSE_STREAM_BYTES
    and `map_large_allocations` fixed the thresholds; when the last such forward (nested, or
    in another thread) leaves, the fixed thresholds come back and the free heap is returned to
    the OS. A large forward that starts meanwhile runs with the heap's."""
    global _reusing
    with _reusing_lock:
        enter = _thresholds_fixed and (_reusing > 0 or stream_bytes <= REUSE_STREAM_BYTES)
        if enter and _reusing == 0:
            _set_thresholds(REUSE_BELOW_BYTES, 2 * REUSE_BELOW_BYTES)
        _reusing += enter
    try:
        yield
    finally:
        with _reusing_lock:
            _reusing -= enter
            if enter and _reusing == 0:
                _set_thresholds(LARGE_ALLOCATION_BYTES, KEPT_FREE_TOP_BYTES)
                release_free_heap()


def release_free_heap() -> None:
    """Returns glibc's free heap pages to the OS (malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
