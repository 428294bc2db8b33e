"""The bundled corpus is complete and split cleanly; user files and windows behave."""

import hashlib
import json
from functools import cache

import pytest
import torch

from moecompress.calib import (
    bundled_tasks,
    data_root,
    parse_data_specs,
    read_documents,
    resolve_tasks,
    token_windows,
)
from moecompress.errors import MoecompressError
from moecompress.io.model import DEMO_MODEL, tiny_tokenizer

TASKS = ["chat", "code", "math", "multilingual", "prose"]
# What the defaults need from every bundled task: held-out windows of 256 tokens (demo tokenizer) and
# about 1 M characters of calibration text.
MIN_EVAL_WINDOWS, EVAL_SEQ_LEN, MIN_CALIB_CHARS = 150, 256, 900_000


@cache
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_MODEL), local_files_only=True)


def rows(task, split):
    with (data_root() / task / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


def test_five_bundled_tasks():
    assert bundled_tasks() == TASKS


@pytest.mark.parametrize("task", TASKS)
def test_calib_and_eval_are_disjoint(task):
    parts = {s: rows(task, s) for s in ("calib", "eval")}
    assert all(r["task"] == task and r["text"].strip() for s in parts for r in parts[s])
    assert not {r["id"] for r in parts["calib"]} & {r["id"] for r in parts["eval"]}
    assert not {r["text"] for r in parts["calib"]} & {r["text"] for r in parts["eval"]}
    assert len(parts["eval"]) >= 10


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_enough_text_for_the_defaults(task):
    calib_chars = sum(len(r["text"]) for r in rows(task, "calib"))
    assert calib_chars >= MIN_CALIB_CHARS, f"{task}: {calib_chars:,} characters of calibration text"
    windows = token_windows(demo_tokenizer(), read_documents(task, "eval"), EVAL_SEQ_LEN)
    assert windows.shape[0] >= MIN_EVAL_WINDOWS, f"{task}: {windows.shape[0]} held-out windows of {EVAL_SEQ_LEN}"


def test_files_match_the_manifest():
    manifest = json.loads((data_root() / "MANIFEST.json").read_text(encoding="utf-8"))
    assert sorted(manifest["tasks"]) == TASKS
    for task in TASKS:
        for split in ("calib", "eval"):
            path = data_root() / task / f"{split}.jsonl"
            entry, got = manifest["tasks"][task][split], rows(task, split)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], path
            assert (len(got), sum(len(r["text"]) for r in got), len({r["id"] for r in got})) == (
                entry["documents"], entry["chars"], entry["groups"])
    licences = {p.name for p in (data_root() / "LICENSES").iterdir()}
    for name in ("chatterbot_corpus.METADATA", "chitchat_dataset.LICENSE", "debian-faq.copyright",
                 "python3.11-stdlib.LICENSE"):
        assert name in licences


def test_chat_mixes_its_sources_as_speaker_turns():
    for split in ("calib", "eval"):
        got = rows("chat", split)
        sources = {r["id"].split("/")[0] if "/" in r["id"] else "chatterbot" for r in got}
        assert sources == {"chatterbot", "ccc", "python-faq", "debian-faq"}, split
        for r in got:
            first = r["text"].split("\n", 1)[0]
            assert first.startswith(("User: ", "A: ")), r["id"]
            assert ("\nAssistant: " in r["text"]) if first.startswith("User: ") else ("\nB: " in r["text"]), r["id"]


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
