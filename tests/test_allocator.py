"""The glibc allocator setting: opt-in, for programs (the CLI, training scripts)."""

import os
import platform
import sys

import pytest

import sk_covvae
from sk_covvae import _allocator
from sk_covvae._allocator import (
    OPT_OUT_VARIABLE,
    maybe_retain_freed_memory,
    retain_freed_memory,
)

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def untried(monkeypatch):
    """A process that has not tried the setting, with no malloc settings."""
    calls = []

    def fake():
        calls.append(1)
        return True

    monkeypatch.setattr(_allocator, "retain_freed_memory", fake)
    monkeypatch.setitem(_allocator._state, "applied", None)
    for name in list(os.environ):
        if name.startswith("MALLOC_") or name == OPT_OUT_VARIABLE:
            monkeypatch.delenv(name)
    return calls


def test_retain_freed_memory_applies_on_glibc_and_is_a_no_op_elsewhere():
    applied = retain_freed_memory()
    assert isinstance(applied, bool)
    assert applied == ON_GLIBC
    # Calling it again is harmless.
    assert retain_freed_memory() == applied


def test_public_name():
    assert sk_covvae.retain_freed_memory is retain_freed_memory


@pytest.mark.parametrize(
    "name, value",
    [
        (OPT_OUT_VARIABLE, "1"),
        ("MALLOC_ARENA_MAX", "2"),
        ("MALLOC_TRIM_THRESHOLD_", "0"),
    ],
)
def test_the_environment_opts_out(untried, monkeypatch, name, value):
    # SK_COVVAE_SYSTEM_MALLOC=1, or the user's own malloc settings.
    monkeypatch.setenv(name, value)
    assert maybe_retain_freed_memory() is False
    assert untried == []


@pytest.mark.parametrize("opt_out", [None, "0"])
def test_applied_once_per_process(untried, monkeypatch, opt_out):
    if opt_out is not None:
        monkeypatch.setenv(OPT_OUT_VARIABLE, opt_out)
    assert maybe_retain_freed_memory() is True
    assert maybe_retain_freed_memory() is True
    assert untried == [1]
