"""`io.spool.SpooledShard` writes ordinary safetensors files (read back by safetensors itself), tensors added
in any order and of every element size, each aligned to its element size."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moecompress.io.writer import CheckpointWriter
from moecompress.io.spool import SpooledShard


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "b.u8": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),  # odd byte count first
        "c.f32": torch.randn(2, 3, 4, generator=g),
        "d.i64": torch.arange(5),
        "e.f16": torch.randn(9, generator=g).half(),
        "f.i32": torch.randint(-9, 9, (4, 4), generator=g, dtype=torch.int32),
        "g.bool": torch.tensor([True, False, True]),
        "h.empty": torch.zeros(0, 4),
        "i.scalar": torch.tensor(2.5),
        "j.f64": torch.randn(3, generator=g, dtype=torch.float64),
        "k.noncontig": torch.randn(4, 6, generator=g).t(),
    }


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_spooled_shard_reads_back_exactly(tmp_path, backend):
    ts = _tensors()
    shard = SpooledShard(tmp_path / "x.safetensors", {"format": "pt"})
    for k, v in ts.items():
        shard.add(k, v)
    shard.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # spools removed
    kwargs = {"backend": backend} if backend == "pread" else {}
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt", **kwargs) as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(ts)
        for k, v in ts.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in ts.items())
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "U8": 1, "BOOL": 1}
    for k, e in header.items():
        if k != "__metadata__":
            assert e["data_offsets"][0] % sizes[e["dtype"]] == 0, k  # aligned to its element size


def test_writer_shards_and_index_read_back(tmp_path):
    ts = _tensors()
    w = CheckpointWriter(tmp_path, shard_bytes=64)  # several shards, one tensor larger than a shard alone
    for k in sorted(ts):
        w.add(k, ts[k])
    files = w.close()
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(ts)
    for k, v in ts.items():
        got = load_file(str(tmp_path / index["weight_map"][k]))[k]
        assert torch.equal(got, v), k
    assert not [p for p in tmp_path.iterdir() if ".spool" in p.name or p.name.startswith(".")]


def test_same_tensors_same_bytes(tmp_path):
    for d in ("a", "b"):
        w = CheckpointWriter(tmp_path / d)
        w.add_all(_tensors())
        w.close()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
