"""Train a small decoder-only (LLaMA-style) character model on a text shipped with the repository, then
sample from it with the KV cache; print which backend ran each op.

The text is examples/data/attention.txt. Training uses packed, causal attention over random windows of the
text; sampling uses transformer.generate: one packed prefill (flash_attention_varlen) that fills a paged KV
cache, then one decode_attention call per token and layer.

    python examples/train_decoder_only.py                  # about 1-2 minutes on 2 CPU cores
    python examples/train_decoder_only.py --steps 3        # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BackendCounter, Progress  # noqa: E402

import transformer  # noqa: E402
from transformer.models import DecoderOnly, DecoderOnlyConfig  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "attention.txt")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sample-tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = open(TEXT, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    cfg = DecoderOnlyConfig.preset("small", vocab_size=len(chars), dim=128, n_layers=3, n_heads=4, n_kv_heads=2,
                                   max_seq_len=512, dropout=0.1)
    model = DecoderOnly(cfg)
    print(f"{len(text)} characters, vocabulary {len(chars)}; DecoderOnly {cfg.dim}d x {cfg.n_layers} layers, "
          f"GQA {cfg.n_heads}/{cfg.n_kv_heads} heads, RoPE, SwiGLU, RMSNorm: {model.num_params():,} parameters "
          f"(llama-7b preset: {DecoderOnlyConfig.preset('llama-7b').num_params():,})")

    def windows(src, n):
        starts = torch.randint(0, len(src) - args.seq_len - 1, (n,))
        x = torch.stack([src[s:s + args.seq_len + 1] for s in starts])
        return x[:, :-1], x[:, 1:]

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(args.steps, 2), pct_start=0.1)
    bar = Progress(args.steps)
    t0, tokens = time.time(), 0
    with BackendCounter() as counter:
        model.train()
        for step in range(1, args.steps + 1):
            x, y = windows(train, args.batch_size)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tokens += x.numel()
            if step % 10 == 0 or step == args.steps:
                bar.update(step, loss.item(), tokens)
        bar.close()
        model.eval()
        with torch.no_grad():
            xv, yv = windows(val, 32)
            val_loss = F.cross_entropy(model(xv).flatten(0, 1), yv.flatten()).item()
        print(f"trained {args.steps} steps in {time.time() - t0:.0f}s; validation loss {val_loss:.3f} "
              f"(uniform guess: {torch.log(torch.tensor(float(len(chars)))).item():.3f})")
        train_counts = dict(counter.counts)
        counter.counts.clear()

        prompts = ["Attention ", "The cache", "A small model"]
        ids = [torch.tensor([stoi[c] for c in p]) for p in prompts]
        g = torch.Generator().manual_seed(args.seed)
        t1 = time.time()
        out = transformer.generate(model, ids, args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                                   generator=g, cache="paged", page_size=16)
        dt = time.time() - t1
    for p, o in zip(prompts, out):
        print("-" * 72)
        print("".join(chars[i] for i in o.tolist()))
    print("-" * 72)
    print(f"sampled {len(prompts)} x {args.sample_tokens} tokens with the KV cache in {dt:.1f}s "
          f"({len(prompts) * args.sample_tokens / max(dt, 1e-9):.0f} tokens/s)")
    print(counter.report("training: backend that ran each op", train_counts))
    print(counter.report("sampling: backend that ran each op"))


if __name__ == "__main__":
    main()
