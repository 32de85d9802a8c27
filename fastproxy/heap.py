"""Give freed heap memory back to the operating system after a bulk load.

Theory of operation
-------------------
Loading a whole state (a 50k-pod routes file, a Valkey bootstrap and its warm-up) allocates and
frees many megabytes of intermediate buffers: the file or chunk bytes, decoder temporaries, the
duplicate strings ``share_values`` replaced. glibc's ``malloc`` keeps freed memory in the middle of
its heap mapped (only the top is given back on its own), so the router's resident set stayed
~10 MB above what it holds (issue 15). ``malloc_trim(0)`` returns those free pages
(``madvise(MADV_DONTNEED)``): it is called once after each bulk load, never on the request path.
Elsewhere than glibc (musl, macOS) there is no ``malloc_trim`` and this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger("fastproxy.heap")


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_malloc_trim = _find_malloc_trim()


def resident_mb() -> float:
    """This process's resident set (VmRSS), in MiB; 0.0 where /proc is not there."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def release_free_memory(after: str) -> float:
    """Return the heap's free pages to the OS after the bulk load ``after`` names; MiB released."""
    if _malloc_trim is None:
        return 0.0
    before = resident_mb()
    _malloc_trim(0)
    released = max(before - resident_mb(), 0.0)
    log.debug("after %s: %.1f MB of freed heap returned to the OS", after, released)
    return released
