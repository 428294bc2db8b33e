#!/usr/bin/env python
"""Train the bundled demo MoE from scratch on the calibration parts of ``calib_data/`` (seeded).

What it builds (``moecompress/assets/demo-moe/``):
  * a byte-level BPE tokenizer (8,192 entries) trained on the calibration text only;
  * a ``MixtralForCausalLM``: 4 layers, hidden 256, 4 heads (2 KV heads), 8 experts of width 256,
    top-2, tied embeddings, ~9.3 M parameters, stored in bf16 (< 20 MB);
  * ``training.json``: the settings, the loss curve and the wall time of the run.

``--family qwen3_moe`` builds a ``Qwen3MoeForCausalLM`` instead (q/k norms, normalised top-k weights, untied
head; ``--intermediate`` is the experts' width), to check a result on another architecture.

Training: AdamW (0.9, 0.95, wd 0.1), lr 2e-3 with 50 warm-up steps and cosine decay to 10 %,
gradient clip 1.0, batches of 16 x 256 tokens whose task mix is drawn with probability proportional
to sqrt(task tokens) (so the small chat set is not repeated dozens of times), Mixtral's load-balancing
loss at 0.01, fp32 on CPU with the eager experts loop (the fastest CPU path). Evaluation text is
never read.

Usage::

    python scripts/train_demo_model.py                 # about 30 minutes on 2 CPU cores (1,000 steps)
    python scripts/train_demo_model.py --steps 20 --out /tmp/demo   # a quick smoke run
    # a second model (another seed and size), for checking that a result carries over:
    python scripts/train_demo_model.py --seed 1 --layers 5 --intermediate 384 --steps 600 --out /work/bench/moe2
    # a third, of another family (Qwen3-MoE: 16 narrow experts, top-4, q/k norms):
    python scripts/train_demo_model.py --family qwen3_moe --seed 2 --intermediate 128 --experts 16 --top-k 4 \
        --steps 600 --out /work/bench/qwen3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from moecompress.calib import bundled_tasks, read_documents

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=512
    )


def build_config(vocab: int, eos_id: int, layers: int = 4, hidden: int = 256, intermediate: int = 256,
                 experts: int = 8, top_k: int = 2, family: str = "mixtral") -> MixtralConfig | Qwen3MoeConfig:
    if family == "qwen3_moe":  # q/k norms, every layer sparse, normalised top-k weights, untied head
        return Qwen3MoeConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, moe_intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
            head_dim=64, max_position_embeddings=512, num_experts=experts, num_experts_per_tok=top_k,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.01,
            output_router_logits=False, tie_word_embeddings=False, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_sliding_window=False,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )
    return MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), head_dim=64,
        max_position_embeddings=512, num_local_experts=experts, num_experts_per_tok=top_k,
        router_aux_loss_coef=0.01, output_router_logits=False,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "moecompress" / "assets" / "demo-moe")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4, help="a second model of another size (the demo: the defaults)")
    ap.add_argument("--hidden", type=int, default=256, help="a multiple of 64 (heads of 64)")
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--family", choices=["mixtral", "qwen3_moe"], default="mixtral",
                    help="the architecture (qwen3_moe: a Qwen3-MoE-style model, for a third check)")
    args = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tasks = bundled_tasks()
    docs = {t: read_documents(t, "calib") for t in tasks}
    tokenizer = train_tokenizer([d for t in tasks for d in docs[t]], args.vocab)
    eos = tokenizer.eos_token_id
    streams = {}
    for t in tasks:
        ids: list[int] = []
        for d in docs[t]:
            ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
        streams[t] = torch.tensor(ids, dtype=torch.long)
    sizes = torch.tensor([len(streams[t]) for t in tasks], dtype=torch.float)
    mix = sizes.sqrt() / sizes.sqrt().sum()
    print("tokens per task:", {t: len(streams[t]) for t in tasks}, "mix:", [round(float(p), 3) for p in mix])

    config = build_config(len(tokenizer), eos, args.layers, args.hidden, args.intermediate, args.experts, args.top_k,
                          args.family)
    model = (Qwen3MoeForCausalLM if args.family == "qwen3_moe" else MixtralForCausalLM)(config)
    model.set_experts_implementation("eager")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    log, per_task = [], {t: [] for t in tasks}
    t_train = time.time()
    for step in range(args.steps):
        which = torch.multinomial(mix, args.batch, replacement=True, generator=g)  # [B] task index per row
        rows = []
        for i in which.tolist():
            s = streams[tasks[i]]
            start = int(torch.randint(0, len(s) - args.seq_len - 1, (1,), generator=g))
            rows.append(s[start:start + args.seq_len])
        x = torch.stack(rows)  # [B, S]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        out = model(input_ids=x, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none").view(len(rows), -1)
        lm_loss = nll.mean()
        loss = lm_loss + config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for i, t in enumerate(which.tolist()):
            per_task[tasks[t]].append(float(nll[i].detach().mean()))
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            entry = {"step": step, "tokens": (step + 1) * args.batch * args.seq_len, "elapsed_s": round(el, 1),
                     "loss": round(float(lm_loss), 4), "aux": round(float(out.aux_loss), 4),
                     "task_loss": {t: round(sum(v[-20:]) / max(1, len(v[-20:])), 3) for t, v in per_task.items()}}
            log.append(entry)
            print(json.dumps(entry), f"{entry['tokens'] / max(el, 1e-9):.0f} tok/s", flush=True)

    train_s = time.time() - t_train
    model.eval()
    tmp = args.out.with_name(args.out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "script": "scripts/train_demo_model.py", "args": {k: str(v) for k, v in vars(args).items()},
        "parameters": n_params, "tasks": tasks, "task_tokens": {t: len(streams[t]) for t in tasks},
        "task_mix": {t: round(float(p), 4) for t, p in zip(tasks, mix)},
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t_start, 1),
        "tokens_seen": args.steps * args.batch * args.seq_len, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {args.threads} threads", "log": log,
    }
    (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"saved to {args.out} in {info['total_seconds']} s")


if __name__ == "__main__":
    main()
