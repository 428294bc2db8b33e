"""Read and save models: local Hugging Face directories, the bundled demo model, and ``tiny:<type>`` ids.

Only files and transformers: the streamed source of a run and the whole model as a checkpoint behaves (with
its recorded activation quantization simulated) are built on this in `runtime.source`.
Nothing here touches the network: loads are ``local_files_only``. A model spec is:
  * ``None`` / ``"demo"``: the bundled demo MoE (``moecompress/assets/demo-moe``);
  * ``"tiny:<model_type>"``: a seeded random tiny model of a registered family (tests, smoke runs);
  * a path to a directory with ``config.json`` and safetensors weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moecompress.errors import MoecompressError, shorten
from moecompress.io.validate import check_finite, check_weight_files
from moecompress.models import MoEArch, find_arch

__all__ = ["DEMO_MODEL", "SIDECAR", "LoadedModel", "compose_kept", "input_facts", "lineage", "load_config",
           "load_tokenizer", "model_dir", "model_label", "read_model", "read_sidecar", "recorded_activations",
           "same_model", "save_model", "tiny_tokenizer"]

log = logging.getLogger(__name__)
DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo-moe"
SIDECAR = "moecompress.json"  # what moecompress did to a directory it wrote (provenance, kept experts, ...)


def read_sidecar(path: Path | None) -> dict | None:
    """The ``moecompress.json`` of a directory moecompress wrote, or None."""
    f = Path(path) / SIDECAR if path is not None else None
    if f is None or not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        raise MoecompressError(f"{str(f)!r} is corrupt", "re-create the directory with moecompress") from None


def _kept_map(d: dict | None) -> dict[int, list[int]] | None:
    return {int(k): list(v) for k, v in (d or {}).items()} or None


def compose_kept(child: dict[int, list[int]] | None, parent: dict[int, list[int]] | None
                 ) -> dict[int, list[int]] | None:
    """Kept-expert maps chained: ``child`` numbers a model's experts in an intermediate model's numbering
    (``{layer: [intermediate id of each expert]}``), ``parent`` the intermediate's in an ancestor's; a missing
    map or layer keeps the numbering."""
    if child is None or parent is None:
        return parent if child is None else child
    out = {k: [parent[k][e] for e in ids] if k in parent else list(ids) for k, ids in child.items()}
    out.update({k: list(v) for k, v in parent.items() if k not in child})
    return out


def lineage(side: dict | None, kept: dict[int, list[int]] | None = None) -> list[tuple[str, dict | None]]:
    """The models a directory was made from, nearest first: ``(model, kept-expert map to its numbering)`` from
    its ``moecompress.json`` (``side``: ``source_model``, ``kept_experts`` and the ``derived_from`` record of
    each earlier run). ``kept``: a map of this run's own, in front of the first (None: the same experts)."""
    out, node = [], side
    while node and node.get("source_model"):
        kept = compose_kept(kept, _kept_map(node.get("kept_experts")))
        out.append((node["source_model"], kept))
        node = node.get("derived_from")
    return out


def same_model(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two model specs name the same model (directories compared resolved)."""
    if a is None or b is None:
        return False
    a, b = str(a), str(b)
    if a == b:
        return True
    if a.startswith("tiny:") or b.startswith("tiny:"):
        return False

    def where(spec: str) -> Path:
        return DEMO_MODEL.resolve() if spec in ("", "demo") else Path(spec).expanduser().resolve()
    return where(a) == where(b)


def recorded_activations(path: Path | None) -> dict | None:
    """The activation quantization a fake-quantized directory records (``quantization.activations`` of its
    ``moecompress.json``), or None."""
    side = read_sidecar(path) or {}
    return (side.get("quantization") or {}).get("activations")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object | None
    arch: MoEArch
    source: str  # what the user asked for ("demo", "tiny:mixtral", or a path)
    path: Path | None  # the directory it came from (None for tiny models)
    disk_dtype: torch.dtype  # dtype of the weights on disk, used again when saving


def model_label(spec: str | None) -> str:
    return "demo" if spec in (None, "", "demo") else str(spec)


def model_dir(spec: str | None) -> Path:
    if spec in (None, "", "demo"):
        if not (DEMO_MODEL / "config.json").is_file():
            raise MoecompressError("the bundled demo model is missing from this install",
                                   "reinstall moecompress, or run scripts/train_demo_model.py")
        return DEMO_MODEL
    path = Path(str(spec)).expanduser().absolute()  # recorded in moecompress.json: valid from any directory
    if not path.exists():
        raise MoecompressError(
            f"model path {str(spec)!r} does not exist",
            "give a local Hugging Face model directory (config.json + *.safetensors); hub downloads are off",
        )
    if not (path / "config.json").is_file():
        raise MoecompressError(f"{str(spec)!r} has no config.json", "give a Hugging Face model directory")
    return path


def load_config(spec: str | None):
    """The config of a model spec (no weights read), with a clear error for unknown model types."""
    if spec and str(spec).startswith("tiny:"):
        from moecompress.testing import tiny_config

        try:
            return tiny_config(str(spec)[5:])
        except KeyError:
            raise MoecompressError(f"no tiny model {spec!r}", "use tiny:<model_type> of a registered family") from None
    path = model_dir(spec)
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise MoecompressError(f"{str(cfg_file)!r} is not valid JSON{where}",
                               "restore config.json from the original model") from None
    except OSError as e:
        raise MoecompressError(f"cannot read {str(cfg_file)!r} ({e.strerror or e.__class__.__name__})",
                               "check the file's permissions") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise MoecompressError(f"{str(cfg_file)!r} has no model_type", "restore config.json from the original model")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, TypeError) as e:
        raise MoecompressError(
            f"unknown architecture {raw['model_type']!r} in {str(path)!r} (transformers cannot build it: "
            f"{shorten(str(e), 80)})",
            "use a transformers 5 model type, or add an adapter (see 'Adding an architecture' in README.md)",
        ) from None


def input_facts(spec: str | None, config) -> dict:
    """What the input already is, from its config and ``moecompress.json`` (no weights read):
    ``{"representation": original | quantized | packed | foreign, "scheme", "original"}``."""
    path = None if (spec and str(spec).startswith("tiny:")) else model_dir(spec)
    side = read_sidecar(path) if path is not None else None
    qc = getattr(config, "quantization_config", None)
    method = (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) if qc else None
    quant = (side or {}).get("quantization") or {}
    original = (side or {}).get("source_model")
    if method == "moecompress":
        return {"representation": "packed", "scheme": quant.get("scheme"), "original": original}
    if method:
        return {"representation": "foreign", "scheme": str(method), "original": original}
    if quant:
        return {"representation": "quantized", "scheme": quant.get("scheme"), "original": original}
    return {"representation": "original", "scheme": None, "original": original}


def read_model(spec: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Read a whole model onto the CPU in ``dtype`` (eager experts: the fast CPU path), checked as read.

    Its weights only: a fake-quantized checkpoint's recorded activation quantization is not simulated here
    (`runtime.source.load_model` does that); packed modules build themselves through the registered quantizer."""
    config = load_config(spec)
    arch = find_arch(config)  # fails early (before reading weights) on dense / unknown models
    if spec and str(spec).startswith("tiny:"):
        from moecompress.testing import tiny_moe

        model = tiny_moe(str(spec)[5:])
        return LoadedModel(model, tiny_tokenizer(), arch, str(spec), None, torch.float32)
    path = model_dir(spec)
    disk_dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(disk_dtype, str):
        disk_dtype = getattr(torch, disk_dtype)
    quantized = getattr(config, "quantization_config", None) is not None
    check_weight_files(path, quantized)  # specific one-line errors for missing shards, corrupt or truncated files
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, output_loading_info=True, experts_implementation="eager")
    except MoecompressError:
        raise
    except Exception as e:  # what the file checks cannot see: a tensor of the wrong shape, a bad checksum, ...
        raise MoecompressError(f"cannot load the weights in {str(path)!r}: {shorten(str(e) or e.__class__.__name__)}",
                               "the weights do not fit config.json; restore the directory from the model "
                               "moecompress made it from, or re-save it") from None
    bad = list(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
    if bad:
        raise MoecompressError(f"{str(path)!r} lacks weights the model needs ({len(bad)}, e.g. {bad[0]})",
                               "the checkpoint does not match its config.json; re-save it")
    check_finite(list(model.named_parameters()) + list(model.named_buffers()), str(path))
    model.eval()
    return LoadedModel(model, load_tokenizer(path), arch, model_label(spec), path, disk_dtype)


def load_tokenizer(path: Path):
    """The tokenizer saved in a model directory, or None."""
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return None


def save_model(loaded: LoadedModel, out_dir: Path, dtype: torch.dtype | None = None) -> None:
    """Write a standard HF directory that plain ``AutoModelForCausalLM.from_pretrained`` loads.

    Weights are written in ``dtype`` (default: the dtype they had on disk). Every config key in the
    adapter's ``num_experts_keys`` is written (Qwen3-MoE needs both spellings for older readers).
    """
    model, arch = loaded.model, loaded.arch
    dtype = dtype or loaded.disk_dtype
    compute_dtype = next(model.parameters()).dtype
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(dtype)
    try:
        model.save_pretrained(out_dir)
    finally:
        model.to(compute_dtype)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    n = arch.num_experts(model.config)
    for key in arch.num_experts_keys:
        cfg[key] = n
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out_dir)


def tiny_tokenizer():
    """A byte-level tokenizer with no merges (256 byte tokens + ``<|endoftext|>`` = id 256) for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
