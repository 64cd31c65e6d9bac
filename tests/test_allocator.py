"""The glibc allocator setting applied by CovarianceVAE on CPU."""

import platform
import sys

from sk_covvae import _allocator
from sk_covvae._allocator import (
    OPT_OUT_VARIABLE,
    maybe_retain_freed_memory,
    retain_freed_memory,
)

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_retain_freed_memory_applies_on_glibc_and_is_a_no_op_elsewhere():
    applied = retain_freed_memory()
    assert isinstance(applied, bool)
    assert applied == ON_GLIBC
    # Calling it again is harmless.
    assert retain_freed_memory() == applied


def test_the_environment_variable_opts_out(monkeypatch):
    calls = []
    monkeypatch.setattr(_allocator, "retain_freed_memory", lambda: calls.append(1))
    monkeypatch.setitem(_allocator._state, "applied", None)
    monkeypatch.setenv(OPT_OUT_VARIABLE, "1")
    assert maybe_retain_freed_memory() is False
    assert calls == []


def test_applied_once_per_process(monkeypatch):
    calls = []

    def fake():
        calls.append(1)
        return True

    monkeypatch.setattr(_allocator, "retain_freed_memory", fake)
    monkeypatch.setitem(_allocator._state, "applied", None)
    monkeypatch.delenv(OPT_OUT_VARIABLE, raising=False)
    assert maybe_retain_freed_memory() is True
    assert maybe_retain_freed_memory() is True
    assert calls == [1]
