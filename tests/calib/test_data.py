"""The bundled corpus is complete and split cleanly; user files and windows behave."""

import json

import pytest
import torch

from moecompress.calib import bundled_tasks, parse_data_specs, read_documents, resolve_tasks, token_windows
from moecompress.errors import MoecompressError
from moecompress.runtime.modelio import tiny_tokenizer

TASKS = ["chat", "code", "math", "multilingual", "prose"]


def test_five_bundled_tasks():
    assert bundled_tasks() == TASKS


@pytest.mark.parametrize("task", TASKS)
def test_calib_and_eval_are_disjoint(task, tmp_path):
    from moecompress.calib import data_root

    rows = {s: [json.loads(ln) for ln in (data_root() / task / f"{s}.jsonl").open()] for s in ("calib", "eval")}
    assert all(r["task"] == task and r["text"].strip() for s in rows for r in rows[s])
    assert not {r["id"] for r in rows["calib"]} & {r["id"] for r in rows["eval"]}
    assert not {r["text"] for r in rows["calib"]} & {r["text"] for r in rows["eval"]}
    assert len(rows["eval"]) >= 10 and sum(len(r["text"]) for r in rows["calib"]) > 80_000


def test_multilingual_has_cjk_and_several_languages():
    text = "".join(read_documents("multilingual", "eval"))
    assert any("\u4e00" <= c <= "\u9fff" for c in text)
    for word in (" le ", " der ", " el "):
        assert word in text


def test_user_files(tmp_path):
    j = tmp_path / "m.jsonl"
    j.write_text('{"text": "one two"}\n\n{"text": "three", "task": "x"}\n')
    t = tmp_path / "notes.txt"
    t.write_text("plain text file\nwith two lines\n")
    data = parse_data_specs([f"math={j}", f"mine={t}"])
    tasks = resolve_tasks(["math", "code"], data)
    assert [(x.task, x.path) for x in tasks] == [("math", j), ("code", None), ("mine", t)]
    assert tasks[0].documents("calib") == ["one two", "three"]
    assert tasks[2].documents("eval") == ["plain text file\nwith two lines\n"]


@pytest.mark.parametrize("content, match", [
    ("", "is empty"), ('{"text": 1}\n', "no string 'text' field"), ("{oops\n", "line 1 .* not valid JSON")])
def test_bad_user_files(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(MoecompressError, match=match):
        read_documents("x", path=f)


def test_bad_specs_and_unknown_tasks(tmp_path):
    with pytest.raises(MoecompressError, match="TASK=PATH"):
        parse_data_specs(["math"])
    with pytest.raises(MoecompressError, match="does not exist"):
        parse_data_specs([f"math={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(MoecompressError, match="unknown task 'poetry'.*--data poetry=PATH"):
        resolve_tasks(["poetry"])
    f = tmp_path / "b.bin"
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MoecompressError, match="cannot read"):
        read_documents("x", path=f)


def test_windows_are_seeded_and_sized():
    tok = tiny_tokenizer()
    docs = read_documents("prose", "eval")[:3]
    a = token_windows(tok, docs, 64, n=10, seed=1)
    b = token_windows(tok, docs, 64, n=10, seed=1)
    c = token_windows(tok, docs, 64, n=10, seed=2)
    assert a.shape == (10, 64) and torch.equal(a, b) and not torch.equal(a, c)
    full = token_windows(tok, docs, 64)
    assert all(any(torch.equal(w, f) for f in full) for w in a)
    with pytest.raises(MoecompressError, match="fewer than one window"):
        token_windows(tok, ["short"], 64)


def test_asking_for_more_windows_than_the_text_holds_uses_them_all_and_says_so(caplog):
    tok = tiny_tokenizer()
    docs = read_documents("prose", "eval")[:1]
    every = token_windows(tok, docs, 64)
    with caplog.at_level("WARNING"):
        more = token_windows(tok, docs, 64, n=len(every) + 5, label="the eval text of 'prose'")
    assert torch.equal(more, every)
    assert [r.getMessage() for r in caplog.records] == [
        f"the eval text of 'prose' has {len(every)} windows of 64 tokens, fewer than the {len(every) + 5} asked: "
        f"using {len(every)}"]
