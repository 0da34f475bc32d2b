"""Train a small decoder-only character model on sequences sharded over processes (context parallelism).

Every rank holds 1/P of each sequence's tokens (transformer.distributed.shard_sequence); the model's attention
layers run transformer.distributed.context_parallel_attention (ring, zigzag or Ulysses) with RoPE on the tokens'
global positions. Each rank's loss is the sum over its tokens divided by all tokens, and the gradients are summed
over the ranks, so a step is the step of the unsharded model. gloo on CPUs, NCCL on GPUs, the same command:

    torchrun --nproc-per-node 2 examples/train_context_parallel.py                # CPU: about a minute
    torchrun --nproc-per-node 2 examples/train_context_parallel.py --steps 2 --check
    torchrun --nproc-per-node 8 examples/train_context_parallel.py --seq-len 65536 --dim 512   # GPUs

--check compares the first step's loss and gradients with an unsharded copy of the model on every rank.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BackendCounter  # noqa: E402

import transformer  # noqa: E402
from transformer.models import DecoderOnly, DecoderOnlyConfig  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "attention.txt")


def setup():
    """init_process_group from torchrun's environment; (rank, world, device)."""
    if "RANK" not in os.environ:
        sys.exit("run me with torchrun, e.g.: torchrun --nproc-per-node 2 " + " ".join(sys.argv))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def sharded_loss(model, x, y, scheme, total):
    """This rank's share of the mean cross-entropy: the sum over its tokens / all tokens."""
    xs, ys = (transformer.distributed.shard_sequence(t, scheme) for t in (x, y))
    logits = model(xs)
    return F.cross_entropy(logits.float().flatten(0, 1), ys.flatten(), reduction="sum") / total


def all_reduce_grads(model):
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def check_first_step(model, cfg, x, y, scheme, dtype, device):
    """Loss and gradients of the sharded model == those of an unsharded copy (fp32: 1e-4 relative)."""
    ref = DecoderOnly(cfg).to(device, dtype)
    ref.load_state_dict(model.state_dict())
    ref_loss = F.cross_entropy(ref(x).float().flatten(0, 1), y.flatten())
    ref_loss.backward()
    loss = sharded_loss(model, x, y, scheme, y.numel())
    loss.backward()
    all_reduce_grads(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    worst = abs(total.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-9)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        scale = q.grad.float().abs().max().item() + 1e-6
        worst = max(worst, (p.grad.float() - q.grad.float()).abs().max().item() / scale)
    model.zero_grad(set_to_none=True)
    if worst > tol:
        raise SystemExit(f"sharded step differs from the unsharded model: max relative difference {worst:.2e}")
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="zigzag", choices=transformer.distributed.SCHEMES)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (all ranks together)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare the first step with the unsharded model")
    args = ap.parse_args()
    rank, world, device = setup()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = 2 * world if args.scheme == "zigzag" else world
    if args.seq_len % parts:
        raise SystemExit(f"--seq-len must be a multiple of {parts} for scheme {args.scheme} over {world} ranks")

    text = open(TEXT, encoding="utf-8").read()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    cfg = DecoderOnlyConfig.preset("small", vocab_size=len(chars), dim=args.dim, n_layers=args.layers, n_heads=4,
                                   n_kv_heads=2, max_seq_len=args.seq_len)
    torch.manual_seed(args.seed)                        # the same initial weights on every rank
    model = DecoderOnly(cfg, context_parallel_group=True, context_parallel_scheme=args.scheme).to(device, dtype)
    gen = torch.Generator().manual_seed(args.seed)      # the same batches on every rank

    def batch():
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        seq = torch.stack([data[s:s + args.seq_len + 1] for s in starts]).to(device)
        return seq[:, :-1], seq[:, 1:]

    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}), scheme {args.scheme}: {args.batch_size} x {args.seq_len} tokens "
              f"per step, {args.seq_len // world} per rank; DecoderOnly {cfg.dim}d x {cfg.n_layers}, "
              f"{model.num_params():,} parameters, {dtype}")
    if args.check:
        x, y = batch()
        worst = check_first_step(model, cfg, x, y, args.scheme, dtype, device)
        if rank == 0:
            print(f"check: the sharded loss and gradients match the unsharded model (max relative difference "
                  f"{worst:.1e})")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    t0 = time.time()
    with BackendCounter() as counter:
        for step in range(1, args.steps + 1):
            x, y = batch()
            loss = sharded_loss(model, x, y, args.scheme, y.numel())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_grads(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total = loss.detach().float()
            dist.all_reduce(total)
            if rank == 0 and (step % 10 == 0 or step == args.steps):
                print(f"step {step:4d}  loss {total.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    if rank == 0:
        print(f"uniform guess: {torch.log(torch.tensor(float(len(chars)))).item():.3f}")
        print(counter.report("rank 0: backend that ran each op"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
