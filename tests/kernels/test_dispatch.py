"""Backend choice: Triton where it can run, the torch reference elsewhere with one logged line naming the
fallback, and a clear error when Triton is demanded where it cannot run."""

import logging

import pytest
import torch

from moecompress.kernels import dispatch

CUDA = torch.device("cuda", 0)
INT4 = (4, False, False)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(dispatch, "_DEVICE_OK", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.delenv("MOECOMPRESS_KERNELS", raising=False)
    return monkeypatch


def _fake_gpu(monkeypatch, cc):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)


def test_old_gpu_falls_back_once_with_one_line(fresh, caplog):
    _fake_gpu(fresh, (7, 5))
    with caplog.at_level(logging.WARNING, logger="moecompress.kernels"):
        assert dispatch.resolve_backend(None, CUDA, INT4) == "torch"
        assert dispatch.resolve_backend("auto", CUDA, INT4) == "torch"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "compute capability 7.5 < 8.0" in lines[0] and "torch reference" in lines[0]


def test_demanding_triton_where_it_cannot_run_is_a_clear_error(fresh):
    _fake_gpu(fresh, (7, 0))
    with pytest.raises(RuntimeError, match="MOECOMPRESS_KERNELS=triton cannot run on cuda:0: compute capability 7.0"):
        dispatch.resolve_backend("triton", CUDA, INT4)
    fresh.setenv("MOECOMPRESS_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="cannot run"):
        dispatch.resolve_backend(None, CUDA, INT4)


def test_triton_missing(fresh, caplog):
    fresh.setattr(dispatch, "_TRITON_IMPORT", (False, "triton cannot be imported (ImportError: no module)"))
    with caplog.at_level(logging.WARNING, logger="moecompress.kernels"):
        assert dispatch.resolve_backend(None, CUDA, INT4) == "torch"
    assert "triton cannot be imported" in caplog.records[0].getMessage()
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        dispatch.resolve_backend("triton", CUDA, INT4)


def test_codec_without_a_kernel(fresh, caplog):
    pytest.importorskip("triton")
    _fake_gpu(fresh, (9, 0))
    assert dispatch.resolve_backend(None, CUDA, INT4) == "triton"
    with caplog.at_level(logging.WARNING, logger="moecompress.kernels"):
        assert dispatch.resolve_backend(None, CUDA, (5, False, False)) == "torch"
    assert "no Triton kernel for 5-bit codes" in caplog.records[0].getMessage()
    with pytest.raises(RuntimeError, match="5-bit"):
        dispatch.resolve_backend("triton", CUDA, (5, False, False))


def test_cpu(fresh, caplog):
    with caplog.at_level(logging.WARNING, logger="moecompress.kernels"):
        assert dispatch.resolve_backend(None, torch.device("cpu"), INT4) == "torch"  # no GPU: no warning
        assert dispatch.resolve_backend("torch", CUDA, INT4) == "torch"
    assert not caplog.records
    fresh.delenv("TRITON_INTERPRET", raising=False)
    fresh.setattr(dispatch, "_DEVICE_OK", {})
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", torch.device("cpu"), INT4)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.resolve_backend("cuda", torch.device("cpu"), INT4)
