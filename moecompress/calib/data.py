"""Per-task text: the bundled ``calib_data/`` corpus or the user's own files, tokenized into windows.

Bundled tasks live in ``calib_data/<task>/{calib,eval}.jsonl`` (one ``{"text", "task"}`` document per
line; the two splits never share a chapter, file, problem, section or conversation block). A user
file is given per task as ``TASK=PATH``: ``.jsonl`` with a ``text`` field per line, or plain text
(``.txt`` or anything else), read as one document. A user file serves both calibration and evaluation.

Windows: a task's documents are joined in file order, separated by the tokenizer's EOS token, and cut
into consecutive non-overlapping windows of ``seq_len`` tokens. Asking for ``n`` windows takes a
seeded random subset (kept in stream order), so the same seed gives the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moecompress.errors import MoecompressError

__all__ = [
    "SPLITS",
    "TaskData",
    "bundled_tasks",
    "data_root",
    "heldout_windows",
    "parse_data_specs",
    "read_documents",
    "resolve_tasks",
    "stream_digest",
    "task_windows",
    "token_stream",
    "token_windows",
    "window_starts",
]

SPLITS = ("calib", "eval")
log = logging.getLogger(__name__)


def data_root() -> Path:
    """Directory of the bundled corpus: ``$MOECOMPRESS_DATA``, else ``calib_data/`` beside the package."""
    env = os.environ.get("MOECOMPRESS_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent  # moecompress/
    candidates += [here / "calib_data", here.parent / "calib_data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise MoecompressError(
        "the bundled calib_data/ directory was not found",
        "run from a checkout installed with `pip install -e .`, or set MOECOMPRESS_DATA to its path",
    )


def bundled_tasks() -> list[str]:
    root = data_root()
    return sorted(p.name for p in root.iterdir() if (p / "calib.jsonl").is_file())


@dataclass(frozen=True)
class TaskData:
    """Where one task's text comes from: a user file, or the bundled corpus when ``path`` is None."""

    task: str
    path: Path | None = None

    def documents(self, split: str) -> list[str]:
        return read_documents(self.task, split, self.path)


def parse_data_specs(specs: Sequence[str] | None) -> dict[str, Path]:
    """Parse ``["math=path.jsonl", ...]`` into ``{"math": Path(...)}``, checking each file exists."""
    out: dict[str, Path] = {}
    for spec in specs or []:
        task, sep, path = spec.partition("=")
        task = task.strip()
        if not sep or not task or not path:
            raise MoecompressError(f"bad --data value {spec!r}", "write it as TASK=PATH, e.g. --data math=problems.jsonl")
        if task in out:
            raise MoecompressError(f"task {task!r} is given twice in --data", "give one file per task")
        p = Path(path).expanduser()
        if not p.is_file():
            raise MoecompressError(f"data file {str(p)!r} for task {task!r} does not exist", "check the path")
        out[task] = p
    return out


def resolve_tasks(tasks: Sequence[str] | None, data: Mapping[str, Path] | None = None) -> list[TaskData]:
    """Tasks to use: user files first, then bundled tasks by name; no names means every bundled task
    (or only the user's files when some were given)."""
    data = dict(data or {})
    names = list(tasks) if tasks else (list(data) or bundled_tasks())
    known = set(bundled_tasks())
    out = []
    for name in names:
        if name in data:
            out.append(TaskData(name, data[name]))
        elif name in known:
            out.append(TaskData(name))
        else:
            raise MoecompressError(
                f"unknown task {name!r}",
                f"use one of the bundled tasks ({', '.join(sorted(known))}) or give a file with --data {name}=PATH",
            )
    for name in data:
        if name not in names:
            out.append(TaskData(name, data[name]))
    return out


def read_documents(task: str, split: str = "calib", path: Path | None = None) -> list[str]:
    """Documents of one task. ``path=None`` reads the bundled split; a user file ignores ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if path is None:
        path = data_root() / task / f"{split}.jsonl"
        if not path.is_file():
            raise MoecompressError(f"no bundled data for task {task!r}", f"give a file with --data {task}=PATH")
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoecompressError(f"cannot read data file {str(path)!r} ({e.__class__.__name__})",
                               "give a readable UTF-8 .jsonl or .txt file") from None
    if str(path).endswith(".jsonl"):
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise MoecompressError(f"line {i} of {str(path)!r} is not valid JSON",
                                       'write one {"text": ...} object per line') from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise MoecompressError(f"line {i} of {str(path)!r} has no string 'text' field",
                                       'write one {"text": ...} object per line')
            if row["text"].strip():
                docs.append(row["text"])
    else:
        docs = [raw] if raw.strip() else []
    if not docs:
        raise MoecompressError(f"data file {str(path)!r} for task {task!r} is empty", "give a file with some text")
    return docs


_STREAMS: OrderedDict[str, torch.Tensor] = OrderedDict()  # recent token streams of this process


def _tokenizer_key(tokenizer) -> str:
    key = getattr(tokenizer, "_moecompress_key", None)
    if key is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
        key = hashlib.sha256(f"{spec}|{tokenizer.eos_token_id}".encode()).hexdigest()
        try:
            tokenizer._moecompress_key = key
        except AttributeError:  # pragma: no cover
            pass
    return key


def token_stream(tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """Every document's tokens (no special tokens), each followed by EOS: ``[N]`` int64.

    Tokenizing a task's text (about 1 M characters) takes seconds, so the stream is memoised per tokenizer and
    text: in this process, and on disk under ``$MOECOMPRESS_CACHE`` (default ``~/.cache/moecompress``; set it to
    ``off`` to disable). The key hashes the tokenizer's full definition and the text, so a stale entry cannot
    be read; a broken or unwritable cache is ignored.
    """
    h = hashlib.sha256(_tokenizer_key(tokenizer).encode())
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8", "surrogatepass")).digest())
    key = h.hexdigest()
    if key in _STREAMS:
        _STREAMS.move_to_end(key)
        return _STREAMS[key]
    where = os.environ.get("MOECOMPRESS_CACHE", str(Path.home() / ".cache" / "moecompress"))
    file = None if where == "off" else Path(where) / "tokens" / f"{key}.pt"
    ids = None
    if file is not None and file.is_file():
        try:
            ids = torch.load(file, weights_only=True)
        except Exception:  # a damaged cache entry is recomputed
            ids = None
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 1:
        eos = tokenizer.eos_token_id
        out: list[int] = []
        for doc in documents:
            out.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
            if eos is not None:
                out.append(eos)
        ids = torch.tensor(out, dtype=torch.long)
        if file is not None:
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(f".{file.name}.{os.getpid()}")
                torch.save(ids, tmp)
                os.replace(tmp, file)
            except OSError:
                pass
    _STREAMS[key] = ids
    while len(_STREAMS) > 32:
        _STREAMS.popitem(last=False)
    return ids


def window_starts(total_tokens: int, seq_len: int, n: int | None = None, seed: int = 0) -> list[int]:
    """Token offsets of the windows `token_windows` cuts from a stream of ``total_tokens`` tokens: every
    ``seq_len``-th offset, or a seeded subset of ``n`` of them (kept in stream order)."""
    total = total_tokens // seq_len
    if n is None or n >= total:
        return [k * seq_len for k in range(total)]
    g = torch.Generator().manual_seed(seed)
    return [int(k) * seq_len for k in torch.randperm(total, generator=g)[:n].sort().values]


def token_windows(
    tokenizer, documents: Sequence[str], seq_len: int, n: int | None = None, seed: int = 0, label: str = ""
) -> torch.Tensor:
    """Tokenize, join with EOS and cut into ``[N, seq_len]`` windows; ``n`` picks a seeded subset.

    Raises a `MoecompressError` when the text is shorter than one window; with fewer than ``n`` windows, uses
    them all and logs one warning line (``label`` names the text in it).
    """
    if seq_len < 2:
        raise MoecompressError(f"sequence length {seq_len} is too short", "use at least 2 tokens")
    ids = token_stream(tokenizer, documents)
    total = len(ids) // seq_len
    if total == 0:
        raise MoecompressError(
            f"{label or 'the text'} has {len(ids)} tokens, fewer than one window of {seq_len}",
            "give more text, or lower --seq-len",
        )
    if n is not None and n > total:  # use what there is, and say so
        log.warning("%s has %d windows of %d tokens, fewer than the %d asked: using %d",
                    label or "the text", total, seq_len, n, total)
        n = total
    starts = window_starts(len(ids), seq_len, n, seed)
    return torch.stack([ids[s:s + seq_len] for s in starts])  # [N, S]


def stream_digest(ids: torch.Tensor) -> str:
    """A short hash of a token stream (the same text under the same tokenizer gives the same digest)."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def heldout_windows(
    tokenizer, documents: Sequence[str], seq_len: int, n: int, exclude: Sequence[tuple[int, int]],
    seed: int = 0, label: str = "",
) -> tuple[torch.Tensor, list[int]]:
    """``n`` windows of ``seq_len`` tokens (seeded, in stream order) that overlap none of the token spans
    ``exclude`` (``[start, end)`` offsets in the same stream), and their offsets.

    Raises a `MoecompressError` when no such window is left; with fewer than ``n``, uses them all and logs one
    warning line."""
    ids = token_stream(tokenizer, documents)
    spans = sorted((int(a), int(b)) for a, b in exclude)
    free = []
    for s in window_starts(len(ids), seq_len):
        if not any(a < s + seq_len and s < b for a, b in spans):
            free.append(s)
    if not free:
        raise MoecompressError(f"{label or 'the text'} has no window of {seq_len} tokens left outside the "
                               f"{len(spans)} windows already used for calibration",
                               "profile with fewer --samples (or give more text) so that some is held out")
    if len(free) > n:
        g = torch.Generator().manual_seed(seed)
        free = sorted(free[int(k)] for k in torch.randperm(len(free), generator=g)[:n])
    elif len(free) < n:
        log.warning("%s has %d held-out windows of %d tokens, fewer than the %d asked: using %d",
                    label or "the text", len(free), seq_len, n, len(free))
    return torch.stack([ids[s:s + seq_len] for s in free]), free


def task_windows(
    tokenizer,
    tasks: Sequence[TaskData],
    split: str,
    seq_len: int,
    n: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``{task: [N, seq_len] token ids}`` for each task, in the order given."""
    return {t.task: token_windows(tokenizer, t.documents(split), seq_len, n, seed,
                                  f"the {split} text of {t.task!r}" if t.path is None else f"{str(t.path)!r}")
            for t in tasks}
