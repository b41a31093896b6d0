"""paligemma.heap: large activations get their own memory map once a model is loaded."""

import subprocess
import sys
import textwrap

import pytest

from paligemma import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="needs glibc (Linux)")

# Probes run in a fresh interpreter: glibc's dynamic threshold depends on what the process freed
# before. mapped_by(n): by how much an n-byte tensor grew the memory-mapped blocks
# (mallinfo2().hblkhd).
MAPPED_BY = textwrap.dedent("""
    import ctypes, torch
    from paligemma import heap

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mapped_by(nbytes):
        before = libc.mallinfo2().hblkhd
        t = torch.empty(nbytes // 4)
        grown = libc.mallinfo2().hblkhd - before
        del t
        return grown
""")

PROBE = MAPPED_BY + textwrap.dedent("""
    torch.empty(30 << 18)  # freed at once: a freed 30 MB mapping raises glibc's threshold to 30 MB
    print(mapped_by(8 << 20) >= 8 << 20)
    heap.map_large_allocations()
    # 16 MB: more than the free 8 MB heap chunk, so memory must come from the OS (a free
    # heap chunk large enough is reused whatever the threshold)
    print(mapped_by(16 << 20) >= 16 << 20)
""")


def test_large_allocations_mapped_after_the_call():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before, after = out.stdout.splitlines()
    assert before == "False"  # glibc's dynamic threshold: an 8 MB tensor comes from the heap
    assert after == "True"  # then new large blocks get their own mapping, not more heap


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))


@pytest.mark.parametrize("user_set", [None, "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_the_trim_threshold_is_fixed_with_the_mmap_threshold(user_set, monkeypatch):
    """A fixed mmap threshold freezes glibc's trim threshold at 128 KB unless it is set too: then
    every block of 128 KB to 4 MB freed at the top of the heap goes back to the OS and is faulted
    in again by the next allocation (RESULTS.md: 20950 page faults per vision tower). What glibc
    does with the values is its business; that both are set, unless the user set one, is ours."""
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    if user_set:
        monkeypatch.setenv(user_set, "65536")
    heap.map_large_allocations()
    expected = {"MALLOC_MMAP_THRESHOLD_": (heap._M_MMAP_THRESHOLD, heap.LARGE_ALLOCATION_BYTES),
                "MALLOC_TRIM_THRESHOLD_": (heap._M_TRIM_THRESHOLD, heap.KEPT_FREE_TOP_BYTES)}
    assert libc.calls == [call for name, call in expected.items() if name != user_set]
    assert heap.KEPT_FREE_TOP_BYTES == 2 * heap.LARGE_ALLOCATION_BYTES  # glibc's own pairing


REUSE_PROBE = MAPPED_BY + textwrap.dedent("""
    heap.map_large_allocations()
    with heap.reusing_activations(heap.REUSE_STREAM_BYTES):
        print(mapped_by(16 << 20))  # from the heap, which then keeps it
        with heap.reusing_activations(heap.REUSE_STREAM_BYTES + 1):  # nested: no change
            pass
        print(mapped_by(16 << 20))
    print(mapped_by(16 << 20) >= 16 << 20)  # mapped again after the outermost
    with heap.reusing_activations(heap.REUSE_STREAM_BYTES + 1):  # a large stream: mapped
        print(mapped_by(16 << 20) >= 16 << 20)
""")


def test_small_forwards_reuse_large_blocks_from_the_heap():
    out = subprocess.run([sys.executable, "-c", REUSE_PROBE], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["0", "0", "True", "True"]


def test_reusing_changes_nothing_unless_the_thresholds_were_fixed(monkeypatch):
    """A process that never loaded a model through `formats` keeps glibc's own behaviour."""
    libc = FakeLibc()
    libc.malloc_trim = lambda pad: libc.calls.append(("trim", pad))
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    monkeypatch.setattr(heap, "_thresholds_fixed", False)
    with heap.reusing_activations(0):
        pass
    assert libc.calls == []
    monkeypatch.setattr(heap, "_thresholds_fixed", True)
    with heap.reusing_activations(0):
        assert heap._reusing == 1
    assert heap._reusing == 0
    assert libc.calls[-3:] == [(heap._M_MMAP_THRESHOLD, heap.LARGE_ALLOCATION_BYTES),
                               (heap._M_TRIM_THRESHOLD, heap.KEPT_FREE_TOP_BYTES), ("trim", 0)]
