"""The run context hands stages calibration windows from bundled tasks or the user's files."""

import pytest
import torch

from moecompress.context import Context
from moecompress.errors import MoecompressError
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.source import load_model


def test_windows_from_bundled_and_user_text(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("hello moe " * 400)
    loaded = load_model("tiny:mixtral")
    ctx = Context(loaded, CalibrationConfig(tasks=["code"], data={"mine": str(f)}, samples=4, seq_len=32), tmp_path)
    w = ctx.windows()
    assert list(w) == ["code", "mine"] and all(t.shape == (4, 32) for t in w.values())
    assert ctx.windows() is w  # cached
    # a user file serves both splits (same text, same seed: same windows); bundled tasks switch files
    assert torch.equal(ctx.windows("eval")["mine"], w["mine"])
    assert not torch.equal(ctx.windows("eval")["code"], w["code"])
    with pytest.raises(MoecompressError, match="above the model's limit of 128"):
        ctx.windows(seq_len=4096)
