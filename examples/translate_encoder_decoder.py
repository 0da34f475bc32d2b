"""Train the "Attention Is All You Need" encoder-decoder on a synthetic translation task, then translate.

Task: reverse a digit sequence (2..12 digits), generated on the fly; a fixed held-out set is never trained
on. Post-norm Transformer with shared, tied embeddings, label smoothing 0.1 and the inverse-square-root
warm-up schedule (Adam, betas (0.9, 0.98), eps 1e-9), all from transformer.models. Greedy translation uses
the KV cache (decoder self-attention through decode_attention; cross-attention over the encoder states).

    python examples/translate_encoder_decoder.py              # about 2-4 minutes on 2 CPU cores
    python examples/translate_encoder_decoder.py --steps 3    # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BackendCounter, Progress  # noqa: E402

from transformer.models import (EncoderDecoder, EncoderDecoderConfig, InverseSqrtSchedule,  # noqa: E402
                                label_smoothed_cross_entropy)

PAD, BOS, EOS, DIGIT0 = 0, 1, 2, 3          # digits d are tokens 3 + d
VOCAB = 16


def sample_pairs(n, min_len, max_len, generator, exclude=frozenset()):
    """n random digit sequences (lists) not in `exclude`, with their reversals."""
    out = []
    while len(out) < n:
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        seq = tuple(torch.randint(0, 10, (length,), generator=generator).tolist())
        if seq not in exclude:
            out.append(seq)
    return out


def batch(seqs):
    """Right-padded tensors: src (digits + EOS), tgt_in (BOS + reversed), tgt_out (reversed + EOS), and the
    lengths of src and of the targets (both len + 1)."""
    b, m = len(seqs), max(len(s) for s in seqs)
    src = torch.full((b, m + 1), PAD)
    tgt_in = torch.full((b, m + 1), PAD)
    tgt_out = torch.full((b, m + 1), PAD)
    for i, s in enumerate(seqs):
        toks = [DIGIT0 + d for d in s]
        src[i, : len(s) + 1] = torch.tensor(toks + [EOS])
        rev = toks[::-1]
        tgt_in[i, : len(s) + 1] = torch.tensor([BOS] + rev)
        tgt_out[i, : len(s) + 1] = torch.tensor(rev + [EOS])
    lengths = torch.tensor([len(s) + 1 for s in seqs])
    return src, tgt_in, tgt_out, lengths


def exact_match(model, seqs, bs=500):
    hits = 0
    for i in range(0, len(seqs), bs):
        part = seqs[i:i + bs]
        src, _, tgt_out, lens = batch(part)
        pred = model.greedy_decode(src, lens, tgt_out.shape[1], BOS, EOS)
        for j, s in enumerate(part):
            want = tgt_out[j, : len(s) + 1]
            hits += int(pred.shape[1] >= len(want) and torch.equal(pred[j, : len(want)], want))
    return hits / len(seqs)


def detok(ids):
    """Digits up to the first EOS."""
    out = []
    for t in ids.tolist():
        if t == EOS:
            break
        out.append(str(t - DIGIT0) if t >= DIGIT0 else "?")
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=285.0, help="stop training after this long")
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--target", type=float, default=0.995, help="stop when the validation exact match reaches it")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr-factor", type=float, default=1.0, help="scale of the inverse-sqrt schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = EncoderDecoderConfig.preset("small", vocab_size=VOCAB, pad_token_id=PAD, dim=args.dim,
                                      hidden_dim=args.hidden, n_layers=args.layers)
    model = EncoderDecoder(cfg)
    print(f"EncoderDecoder {cfg.dim}d x {cfg.n_layers}+{cfg.n_layers} layers, {model.num_params():,} parameters "
          f"(base preset: {EncoderDecoderConfig.preset('base').num_params():,})")
    held_out = sample_pairs(args.eval_samples, 2, 12, torch.Generator().manual_seed(10_000 + args.seed))
    val = sample_pairs(256, 2, 12, torch.Generator().manual_seed(20_000 + args.seed))
    exclude = frozenset(held_out) | frozenset(val)

    opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, foreach=True)
    sched = InverseSqrtSchedule(opt, cfg.dim, warmup_steps=args.warmup, factor=args.lr_factor)
    bar = Progress(args.steps)
    tokens, t0, c0, step, acc = 0, time.time(), time.process_time(), 0, 0.0
    with BackendCounter() as counter:
        for step in range(1, args.steps + 1):
            src, tgt_in, tgt_out, lens = batch(sample_pairs(args.batch_size, 2, 12, gen, exclude))
            logits = model(src, tgt_in, lens, lens)
            loss, n = label_smoothed_cross_entropy(logits, tgt_out, smoothing=0.1, ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tokens += int(lens.sum()) * 2
            if step % 10 == 0 or step == args.steps:
                bar.update(step, loss.item(), tokens, f"val {acc:.1%}")
            if step % 250 == 0:
                acc = exact_match(model, val)
                if acc >= args.target:
                    break
            if time.time() - t0 > args.max_seconds:
                break
        bar.close()
        train_s, train_cpu = time.time() - t0, time.process_time() - c0
        acc = exact_match(model, held_out)
    print(f"trained {step} steps in {train_s:.0f}s wall ({train_cpu:.0f} CPU-seconds, {args.threads} threads); "
          f"held-out exact match {acc:.2%} on {len(held_out)} samples never seen in training; "
          f"total {time.time() - t0:.0f}s")
    demo = sample_pairs(5, 4, 12, torch.Generator().manual_seed(99), exclude)
    src, _, _, lens = batch(demo)
    pred = model.greedy_decode(src, lens, 14, BOS, EOS)
    for s, p in zip(demo, pred):
        print(f"  {''.join(map(str, s)):>12} -> {detok(p)}")
    print(counter.report())


if __name__ == "__main__":
    main()
