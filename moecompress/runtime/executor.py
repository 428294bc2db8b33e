"""The layer-streaming executor: one decoder layer at a time, read from disk, computed on a device.

A `LayerStream` runs fixed token batches through a model whose weights are never all in memory:

    config.json -> skeleton on the meta device -> embeddings -> layer 0's inputs (and every layer's keyword
    arguments: masks, rotary tables) for every batch -> for each decoder layer i:
        load(i)        read layer i's tensors (memory-mapped safetensors, transformers' key conversions)
                       onto the device, in the compute dtype
        ... the stage's work on layer i (hooks, statistics, GPTQ, surgery) ...
        run_layer(i)   push every batch through layer i: its outputs are layer i+1's inputs
        release(i)     free layer i
    -> final norm + LM head (evaluation) only at the end.

Peak memory is one layer plus the hidden states of the batches (on the device, or in host memory with
``offload``); it does not grow with depth. The same runner serves an in-memory model (`ModelSource`
wrapping a loaded model: load and release do nothing), which is how the streamed path is checked against
the in-memory one.

The first-layer inputs and every layer's keyword arguments come from `runtime.catcher` (GPTQ's "Catcher"
pattern made exact for every family); devices and compute dtypes from `runtime.placement`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.formats.spec import ModuleSpec
from moecompress.io.checkpoint import CheckpointSource, build_skeleton, layer_of, release, stored_dtype
from moecompress.io.validate import check_finite
from moecompress.models.base import MoEArch, resolve
from moecompress.runtime import token_weights
from moecompress.runtime.catcher import first_layer_inputs
from moecompress.runtime.placement import Placement, resolve_device

__all__ = ["VOCAB_CHUNK", "LayerStream", "ModelSource", "Placement", "resolve_device"]

VOCAB_CHUNK = 1024  # one-token sequences per batch of `LayerStream.vocab`

_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")  # a checkpoint that stores one tensor per expert


class ModelSource:
    """Where a stream's weights come from: a model directory (read one layer at a time) or a model already in
    memory (tests, the Python API)."""

    def __init__(self, config, arch: MoEArch, directory: str | Path | None = None, model: nn.Module | None = None,
                 tokenizer=None, stored_dtype: torch.dtype | None = None, label: str | None = None,
                 path: Path | None | str = "directory") -> None:
        if (directory is None) == (model is None):
            raise ValueError("give a directory or a model")
        self.config, self.arch, self.tokenizer = config, arch, tokenizer
        self.directory = None if directory is None else Path(directory)
        self.model = model
        self.stored_dtype = stored_dtype or (next(model.parameters()).dtype if model is not None else None)
        self.label = label or (str(directory) if directory is not None else "model")  # what the user asked for
        # the user's directory: by default the one read; None for a model the run made (tiny:) or holds in memory
        self.path = self.directory if path == "directory" else (None if path is None else Path(path))

    @property
    def in_memory(self) -> bool:
        return self.model is not None


class LayerStream:
    """Run ``batches`` (each ``[B, S]`` token ids) through a model one decoder layer at a time.

    With a directory source, `load(i)` reads layer ``i`` and `release(i)` frees it; with an in-memory source
    both do nothing and the runner works on the model itself (its parameters are computed in their dtype)."""

    def __init__(self, source: ModelSource, batches: Sequence[torch.Tensor], placement: Placement | None = None,
                 packed_modules: Mapping[str, ModuleSpec] | None = None, packed_activations: dict | None = None,
                 embed_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 experts: Mapping[int, Sequence[int]] | None = None, vocab_rows: int = 0) -> None:
        """``embed_transform``: a function of the input embedding's weight whose result embeds the tokens while
        the first-layer inputs are computed (a stage that changes the embedding: a residual rotation); the
        model's own embedding is left as it is.

        ``vocab_rows``: keep ``vocab`` (``[n, H]``, n <= vocab_rows), layer 0's inputs for every k-th token of
        the vocabulary, each a one-token sequence (the (transformed) embedding as the model scales it), with
        layer 0's keyword arguments for each `VOCAB_CHUNK` of them (``vocab_kwargs``): what layer 0 reads for
        tokens the calibration text lacks. `drop_vocab` frees them.

        ``experts``: for a directory source, read only these routed experts (stored ids, kept in this order)
        of these MoE layers, with their router rows; ``source.config`` must already count ``len(ids)`` experts
        (the surgery done while reading: the skeleton is the pruned model)."""
        if experts is not None and source.in_memory:
            raise ValueError("an expert subset is read from a directory source only")
        self.source, self.arch = source, source.arch
        self._embed_transform = embed_transform
        self._vocab_rows = vocab_rows
        self.vocab: torch.Tensor | None = None
        self.vocab_kwargs: list[dict] = []  # layer 0's keyword arguments per `VOCAB_CHUNK` rows of ``vocab``
        self.experts = {int(k): [int(e) for e in v] for k, v in (experts or {}).items()}
        self.placement = placement or Placement()
        self.device = self.placement.device
        self.batches = list(batches)
        # ``token_weights(layer, batch) -> [T] | None``: the statistics of that call weight its tokens so
        # (`runtime.token_weights`); None: unweighted
        self.token_weights: Callable[[int, int], torch.Tensor | None] | None = None
        if source.in_memory:
            self.model = source.model
            self.files = None
            self.dtype = self.stored = next(self.model.parameters()).dtype
        else:
            quantized = getattr(source.config, "quantization_config", None) is not None
            stored = source.stored_dtype or stored_dtype(source.directory)
            self.dtype = self.placement.compute_dtype(stored)
            self.stored = stored
            # read in the stored dtype, then cast one tensor at a time: converting while reading would hold the
            # layer's expert tensors in the compute dtype several times over (list, stack, concatenation)
            self.model = build_skeleton(source.config, stored, self.device)
            if packed_modules is not None:
                from moecompress.nn.hf_quantizer import build_packed_modules

                with torch.device("meta"):
                    build_packed_modules(self.model, packed_modules, packed_activations)
            self.files = CheckpointSource(source.directory, self.model, self.arch.layers, quantized)
        self.layers: nn.ModuleList = self.arch.decoder_layers(self.model)
        self.loaded: set[int] = set()
        self.partial: set[int] = set()  # loaded without their routed experts (`load(i, routed=False)`)
        self.kwargs: list[list[dict]] = [[] for _ in self.layers]
        self.hidden: list[torch.Tensor] = []
        self.next_layer = 0
        self._catch()

    # ------------------------------------------------------------------ inputs
    def _outside(self, which: str) -> list[str]:
        """Stored keys outside the decoder layers needed for ``which``: "embed" or "head" (final norm + head)."""
        if self.files is None:
            return []
        emb = self.model.get_input_embeddings()
        emb_names = {n for n, p in self.model.named_parameters() if any(p is q for q in emb.parameters())}
        keys = self.files.layer_keys(None)
        want = [k for k in keys if self.files.target[k] in emb_names]
        return want if which == "embed" else [k for k in keys if k not in want]

    def _read(self, keys: list[str], module: nn.Module, rows: dict | None = None, rename: dict | None = None) -> None:
        """Read stored ``keys`` into the model (``rows``/``rename``: see `CheckpointSource.load`), then cast
        ``module``'s tensors stored in the stored dtype to the compute dtype, one at a time (tensors the family
        keeps in float32 stay so)."""
        self.files.load(self.model, keys, self.device, self.stored, rows=rows, rename=rename)
        prefix = next((f"{n}." for n, m in self.model.named_modules() if m is module and n), "")
        check_finite(((prefix + n, t) for n, t in itertools.chain(module.named_parameters(), module.named_buffers())),
                     repr(str(self.source.path or self.source.directory)))
        if self.dtype == self.stored:
            return
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in list(table.items()):
                    if t is not None and not t.is_meta and t.dtype == self.stored:
                        new = t.detach().to(self.dtype)
                        table[name] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    @torch.no_grad()
    def _catch(self) -> None:
        if not self.batches:
            return
        if self.files is not None:
            self._read(self._outside("embed"), self.model.get_input_embeddings())
        first = first_layer_inputs(self.model, self.layers, self.model.get_submodule(self.arch.final_norm),
                                   self.batches, self.device, self.kwargs, self._embed_transform)
        self.hidden = [h if not self.placement.offload else h.cpu() for h in first]
        if self._vocab_rows > 0:  # every k-th token as a one-token sequence, caught as the batches are
            V = self.model.get_input_embeddings().weight.shape[0]
            step = -(-V // self._vocab_rows)  # ceil: at most vocab_rows rows
            kwargs: list[list[dict]] = [[] for _ in self.layers]
            rows = first_layer_inputs(self.model, self.layers, self.model.get_submodule(self.arch.final_norm),
                                      [c[:, None] for c in torch.arange(0, V, step).split(VOCAB_CHUNK)],
                                      self.device, kwargs, self._embed_transform)
            self.vocab = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])
            self.vocab_kwargs = kwargs[0]
        if self.files is not None:  # the embedding is not needed again (the head is loaded at the end)
            release(self.model.get_input_embeddings())

    # ------------------------------------------------------------------ layers
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def load(self, i: int, routed: bool = True) -> nn.Module:
        """Layer ``i`` with its weights on the device (read from disk for a directory source). ``routed=False``
        leaves the routed experts' weights unread (on the meta device): the layer can run up to its experts
        (a routing probe), not through them."""
        if self.files is not None and i not in self.loaded and (routed or i not in self.partial):
            keys, rows, rename, experts = self._reads(i, routed)
            self._read(keys, self.layers[i], rows=rows, rename=rename)
            missing = [n for n, p in self.layers[i].named_parameters() if p.is_meta and not n.startswith(experts)]
            if missing:
                raise MoecompressError(f"{str(self.source.directory)!r} lacks layer {i}'s {missing[0]}",
                                       "the checkpoint does not match its config.json; re-save it")
            (self.loaded if routed else self.partial).add(i)
        return self.layers[i]

    def _reads(self, i: int, routed: bool) -> tuple[list[str], dict, dict, tuple[str, ...]]:
        """Layer ``i``'s stored keys to read, the ones read in part (``{key: (dim, ids)}``), the renamed ones,
        and the routed experts' parameter prefix within the layer (what ``routed=False`` leaves unread)."""
        keys = self.files.layer_keys(i)
        moe = i in self.arch.moe_layer_indices(self.source.config)
        experts_prefix = (f"{self.arch.moe_block}.{self.arch.experts}.",) if moe else ()
        ids = self.experts.get(i)
        if not moe or (routed and ids is None):
            return keys, {}, {}, experts_prefix
        block = f"{self.arch.layers}.{i}.{self.arch.moe_block}"
        expert_params = {f"{block}.{self.arch.experts}.{n}" for n, _ in
                         resolve(self.layers[i], f"{self.arch.moe_block}.{self.arch.experts}").named_parameters()}
        if not routed:
            return [k for k in keys if self.files.target[k] not in expert_params], {}, {}, experts_prefix
        router = {f"{block}.{self.arch.router}.{p}" for p in
                  (self.arch.router_weight, self.arch.router_bias, self.arch.correction_bias) if p is not None}
        weight = f"{block}.{self.arch.router}.{self.arch.router_weight}"
        stored = next((self.files.shape(k)[0] for k in keys if self.files.target[k] == weight), None)
        out, rows, rename = [], {}, {}
        for k in keys:
            target = self.files.target[k]
            if target in expert_params:
                m = _PER_EXPERT.search(k)
                if m:  # one stored tensor per expert: read the kept ones, renumbered
                    e = int(m.group(1))
                    if e in ids:
                        rename[k] = f"{k[:m.start()]}.experts.{ids.index(e)}.{k[m.end():]}"
                        out.append(k)
                    continue
                if self.files.shape(k)[0] != stored:
                    raise MoecompressError(f"cannot tell the experts apart in checkpoint tensor {k!r}",
                                           "re-save the model with transformers 5")
                rows[k] = (0, ids)
            elif target in router:
                shape = self.files.shape(k)
                rows[k] = (1 if len(shape) == 2 and shape[0] == 1 else 0, ids)
            out.append(k)
        return out, rows, rename, experts_prefix

    def drop_vocab(self) -> None:
        """Free ``vocab`` (up to VOCAB_ROWS x H on the device) and its keyword arguments."""
        self.vocab, self.vocab_kwargs = None, []

    def release(self, i: int) -> None:
        """Free layer ``i`` (a directory source; an in-memory model keeps its weights)."""
        if self.files is not None and (i in self.loaded or i in self.partial):
            release(self.layers[i])
            self.loaded.discard(i)
            self.partial.discard(i)

    @torch.no_grad()
    def run_layer(self, i: int, store: bool = True, batches: Sequence[int] | None = None) -> None:
        """Run the batches (default all) through layer ``i`` (layers must run in order). ``store=True``
        replaces the stored hidden states by the outputs and moves on; ``store=False`` only runs the layer
        (a calibration pass whose hooks collect statistics). A storing pass runs every batch, except through the
        last layer: nothing reads the outputs of the batches it leaves out, and their hidden states are freed."""
        if i != self.next_layer:
            raise RuntimeError(f"layer {i} run out of order (next is {self.next_layer})")
        if store and batches is not None:
            if i != self.num_layers - 1:
                raise ValueError("a storing pass runs every batch (but through the last layer)")
            keep = set(batches)
            self.hidden = [h if b in keep else h.new_empty(0) for b, h in enumerate(self.hidden)]
        layer = self.load(i)
        for b in batches if batches is not None else range(len(self.hidden)):
            h = self.hidden[b].to(self.device)
            with token_weights.weighting(None if self.token_weights is None else self.token_weights(i, b)):
                out = layer(h, **self.kwargs[i][b])
            if store:
                out = out[0] if isinstance(out, tuple) else out
                self.hidden[b] = out.cpu() if self.placement.offload else out
        if store:
            self.next_layer += 1

    def layers_in_order(self) -> Iterator[tuple[int, nn.Module]]:
        """``(i, layer)`` for every decoder layer, loaded; the caller runs it; it is released afterwards."""
        for i in range(self.num_layers):
            layer = self.load(i)
            try:
                yield i, layer
            finally:
                self.release(i)

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s parameters and persistent buffers by their full model names."""
        prefix = f"{self.arch.layers}.{i}."
        return {prefix + k: v for k, v in self.layers[i].state_dict().items()}

    # ------------------------------------------------------------------ outputs
    def load_head(self) -> None:
        """Final norm and LM head (and anything else outside the decoder layers but the embedding)."""
        if self.files is not None:
            keys = self._outside("head")
            if getattr(self.model.config, "tie_word_embeddings", False):
                keys = keys + self._outside("embed")
            self._read(keys, self.model)

    @torch.no_grad()
    def logits(self, b: int) -> torch.Tensor:
        """``[B, S, V]`` logits of batch ``b`` once every layer has run (call `load_head` first)."""
        if self.next_layer != self.num_layers:
            raise RuntimeError("run every layer before asking for logits")
        return self.logits_of(self.hidden[b])

    @torch.no_grad()
    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, V]`` logits of final hidden states ``hidden`` (call `load_head` first)."""
        final_norm = self.model.get_submodule(self.arch.final_norm)
        logits = self.model.get_output_embeddings()(final_norm(hidden.to(self.device)))
        if self.arch.logits_divisor_key:
            logits = logits / getattr(self.model.config, self.arch.logits_divisor_key)
        return logits

    def outside_state(self) -> dict[str, torch.Tensor]:
        """Every parameter outside the decoder layers, by model name (loaded for a directory source)."""
        if self.files is not None:
            self._read(self.files.layer_keys(None), self.model)
        return {k: v for k, v in self.model.state_dict().items() if layer_of(k, self.arch.layers) is None}

    def close(self) -> None:
        if self.files is not None:
            release(self.model)
            self.files.close()
        self.hidden = []

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
