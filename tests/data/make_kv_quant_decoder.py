"""Writes tests/data/kv_quant_decoder.pt, the trained model of tests/test_kv_quant.py's generation tests.

examples/train_decoder_only.py's decoder (dim 128, 3 layers, GQA 4/2, RoPE, SwiGLU) trained on
examples/data/attention.txt for TRAIN["steps"] steps (loss ~0.25, about a minute on one CPU core) and stored as
an fp16 state dict. The weights are committed rather than trained by the test: a CPU matmul's float sums depend
on the thread count and on the instruction set of the machine, so the same training code gives other weights,
and other near-ties in the greedy decisions, on another machine.

    python tests/data/make_kv_quant_decoder.py
"""
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = os.path.join(ROOT, "examples", "data", "attention.txt")
OUT = os.path.join(ROOT, "tests", "data", "kv_quant_decoder.pt")
TRAIN = dict(steps=200, batch=32, seq=96, lr=5e-3, seed=0)
CONFIG = dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=512, dropout=0.0)


def config(vocab_size):
    from transformer.models import DecoderOnlyConfig
    return DecoderOnlyConfig.preset("small", vocab_size=vocab_size, **CONFIG)


def corpus():
    text = open(TEXT, encoding="utf-8").read()
    chars = sorted(set(text))
    return chars, torch.tensor([chars.index(ch) for ch in text])


def main():
    sys.path.insert(0, ROOT)
    from transformer.models import DecoderOnly
    chars, data = corpus()
    torch.set_num_threads(1)
    torch.manual_seed(TRAIN["seed"])
    model = DecoderOnly(config(len(chars)))
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN["lr"], total_steps=TRAIN["steps"], pct_start=0.1)
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    for step in range(TRAIN["steps"]):
        starts = torch.randint(0, len(data) - TRAIN["seq"] - 1, (TRAIN["batch"],), generator=gen)
        x = torch.stack([data[s:s + TRAIN["seq"] + 1] for s in starts])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    print(f"final training loss {loss.item():.3f}")
    state = {k: v.to(torch.float16) for k, v in model.eval().state_dict().items()}
    torch.save({"vocab": "".join(chars), "train": TRAIN, "config": CONFIG, "state": state}, OUT)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
