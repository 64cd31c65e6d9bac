"""Keep freed memory in the process: glibc settings for CPU training.

PyTorch on CPU allocates each step's activations and gradients with
``malloc``. Blocks of a few megabytes and more are served by glibc with
``mmap`` and handed back to the kernel on ``free``; the next step then faults
every page in again. On the default architecture at batch 256 that costs a
quarter to a third of a training step, and it varies from step to step (see
``docs/performance.md``). Raising glibc's ``M_MMAP_THRESHOLD`` and
``M_TRIM_THRESHOLD`` keeps those blocks in the heap for reuse, as a caching
allocator would (PyTorch's own advice for CPU training is jemalloc or
tcmalloc, to the same end). The price: the process keeps the memory it freed
for later allocations instead of returning it to the system.

The library never applies it by itself: it changes the whole process (a Dask
worker's nanny, for one, sets its own malloc thresholds). The ``covvae``
command line and the benchmark call :func:`maybe_retain_freed_memory`, which
applies the setting once per process unless the environment variable
``SK_COVVAE_SYSTEM_MALLOC`` is ``1`` or a ``MALLOC_*`` setting is already in
the environment; a user's own training script may call
:func:`sk_covvae.retain_freed_memory` (or set ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` for any program).
"""

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: far above any one tensor of this package
OPT_OUT_VARIABLE = "SK_COVVAE_SYSTEM_MALLOC"
_state = {"applied": None}  # None: not tried yet in this process


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed blocks below 1 GiB for reuse; True if applied.

    Does nothing and returns False where the C library is not glibc (macOS,
    Windows, musl).

    Returns
    -------
    bool
        Whether both ``mallopt`` calls succeeded.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )


def wants_system_malloc() -> bool:
    """Whether the environment asks to leave malloc alone.

    True when ``SK_COVVAE_SYSTEM_MALLOC=1``, or when any ``MALLOC_*`` variable
    (glibc's tunables, or a nanny's own thresholds) is set: those are the
    user's settings, and ours must not override them.
    """
    if os.environ.get(OPT_OUT_VARIABLE, "").strip() == "1":
        return True
    return any(name.startswith("MALLOC_") for name in os.environ)


def maybe_retain_freed_memory() -> bool:
    """Apply :func:`retain_freed_memory` once per process, unless opted out.

    For programs (the command line, the benchmark), not for the library: see
    the module's docstring.

    Returns
    -------
    bool
        Whether the setting is in force (from this call or an earlier one).
    """
    if _state["applied"] is None:
        _state["applied"] = False if wants_system_malloc() else retain_freed_memory()
    return _state["applied"]
