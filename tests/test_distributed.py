"""Context parallelism (transformer.distributed): ring, zigzag and Ulysses attention over gloo ranks on the CPU.

Each multi-process test group spawns 2 or 4 ranks (fresh interpreters running this file as a script, a free
localhost port, a process-group timeout and a wall-clock limit), runs a list of cases in them and writes one
result per case; the tests below read them. A case builds the full q/k/v (same seed on every rank), shards them,
runs `context_parallel_attention` forward and backward, gathers the output, lse and gradients with
`unshard_sequence`, and rank 0 compares them with the single-process reference on the full tensors by the
tolerance rule (fp32 inputs: against fp64, baseline PyTorch in fp32; fp16/bf16: against fp32, baseline PyTorch in
the same dtype). The triton (interpreter) and cuda (emulator) backends run in the children with
TRITON_INTERPRET=1 / TILEFORMER_EMULATE_CUDA=1 set in their environment.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

import transformer  # noqa: E402
from transformer import reference  # noqa: E402
from transformer.testing import assert_close  # noqa: E402

import helpers  # noqa: E402

PG_TIMEOUT_S = 60          # process-group timeout inside the ranks (a lost peer fails a case, it does not hang)
FAIL_PG_TIMEOUT_S = 4      # the failure-handling group's timeout


# ---------------------------------------------------------------------------------------------
# Launching ranks
# ---------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env():
    """The ranks' environment: every tensor of these tests lives on the CPU (gloo), so the kernel backends run
    through the Triton interpreter and the CUDA host emulation, with the harness settings of conftest.py."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["TILEFORMER_EMULATE_CUDA"] = "1"
    env.setdefault("TILEFORMER_POISON", "1")
    env.setdefault("TILEFORMER_EMU_CHECK_BOUNDS", "1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


_RESULTS: dict = {}


def _run_group(name, world, cases, *, pg_timeout=PG_TIMEOUT_S, wall_timeout=240):
    """Run `cases` in `world` fresh ranks; {case name: {rank: result}} (memoised per group name)."""
    if name in _RESULTS:
        return _RESULTS[name]
    tmp = tempfile.mkdtemp(prefix=f"tf_dist_{name}_")
    spec = dict(world=world, port=_free_port(), pg_timeout=pg_timeout, cases=cases, out=tmp)
    spec_path = os.path.join(tmp, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    procs, logs = [], []
    for rank in range(world):
        log = open(os.path.join(tmp, f"rank{rank}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), spec_path, str(rank)],
                                      cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + wall_timeout
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            timed_out = True
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for log in logs:
        log.close()
    ranks = {}
    for rank in range(world):
        path = os.path.join(tmp, f"rank{rank}.json")
        ranks[rank] = json.load(open(path)) if os.path.exists(path) else {}
    tails = {r: open(os.path.join(tmp, f"rank{r}.log")).read()[-3000:] for r in range(world)}
    results = {c["name"]: dict(ranks={r: ranks[r].get(c["name"]) for r in range(world)}, tails=tails,
                               timed_out=timed_out, logs=tmp) for c in cases}
    if all(r is not None and r.get("status") == "ok" for res in results.values() for r in res["ranks"].values()):
        shutil.rmtree(tmp, ignore_errors=True)      # kept (and named in the errors) when a case failed
    _RESULTS[name] = results
    return results


def _expect_ok(results, case):
    """{rank: that rank's result} of a case that passed on every rank; AssertionError with the errors otherwise."""
    res = results[case]
    errors = []
    for rank, r in res["ranks"].items():
        if r is None:
            errors.append(f"rank {rank} did not report (timed out: {res['timed_out']}); its log ends:\n"
                          f"{res['tails'][rank]}")
        elif r.get("status") != "ok":
            errors.append(f"rank {rank}: {r.get('error')}")
    assert not errors, "\n".join(errors) + f"\n(the ranks' logs: {res['logs']})"
    return res["ranks"]


# ---------------------------------------------------------------------------------------------
# Inside a rank
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _full_inputs(c, world):
    """Full q, k, v, dout, dlse and ALiBi slopes of a case (the same on every rank)."""
    g = torch.Generator().manual_seed(c.get("seed", 0))
    b, n, hq, hkv, d = c["b"], c["n"], c["hq"], c["hkv"], c["d"]
    big = n * world
    dt = DTYPES[c["dtype"]]
    q = torch.randn(b, big, hq, d, generator=g).to(dt)
    k = torch.randn(b, big, hkv, d, generator=g).to(dt)
    v = torch.randn(b, big, hkv, d, generator=g).to(dt)
    dout = torch.randn(b, big, hq, d, generator=g).to(dt)
    dlse = torch.randn(b, hq, big, generator=g) if c.get("lse_grad") else None
    slopes = None
    if c.get("alibi"):
        shape = (hq,) if c["alibi"] == "h" else (b, hq)
        slopes = torch.rand(*shape, generator=g) * 0.5 + 0.05
    return q, k, v, dout, dlse, slopes


def _attn_kw(c, slopes):
    return dict(causal=c.get("causal", False), window_size=tuple(c.get("window", (-1, -1))), alibi_slopes=slopes,
                softcap=c.get("softcap", 0.0))


def _reference(c, q, k, v, dout, dlse, slopes, want_lse):
    """(ref, low): each a list [out, lse, dq, dk, dv] (lse entries None without return_lse)."""
    kw = _attn_kw(c, slopes)
    low_dtype = q.dtype
    ref_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    res = []
    for compute in (ref_dtype, None if low_dtype != torch.float32 else torch.float32):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = reference.attention(*leaves, return_lse=True, compute_dtype=compute, **kw)
        outs, gouts = [out], [dout.to(out.dtype)]
        if dlse is not None:
            outs.append(lse)
            gouts.append(dlse.to(lse.dtype))
        grads = torch.autograd.grad(outs, leaves, gouts)
        res.append([out.detach(), lse.detach().float() if want_lse else None, *grads])
    return res


def _case_attention(c, group, rank, world):
    from transformer import distributed as tfd
    q, k, v, dout, dlse, slopes = _full_inputs(c, world)
    scheme, want_lse = c["scheme"], c.get("return_lse", True)
    shard = lambda t, dim=1: tfd.shard_sequence(t, scheme, group, dim=dim)   # noqa: E731
    qs, ks, vs = (shard(t).detach().requires_grad_() for t in (q, k, v))
    with transformer.backends.record_dispatches() as counts:
        res = tfd.context_parallel_attention(qs, ks, vs, group, scheme=scheme, return_lse=want_lse,
                                             backend=c["backend"], **_attn_kw(c, slopes))
        out, lse = res if want_lse else (res, None)
        outs, gouts = [out], [shard(dout)]
        if want_lse and dlse is not None:
            outs.append(lse)
            gouts.append(shard(dlse, 2))
        torch.autograd.backward(outs, gouts)
    got = [tfd.unshard_sequence(out.detach(), scheme, group),
           tfd.unshard_sequence(lse.detach(), scheme, group, dim=2) if want_lse else None,
           *(tfd.unshard_sequence(t.grad, scheme, group) for t in (qs, ks, vs))]
    used = sorted({be for (op, be) in counts})
    if c["backend"] != "auto":
        assert used == [c["backend"]] or (used == [] and c.get("alibi")), used
    info = dict(backends=used, calls=sum(counts.values()))
    if rank != 0:
        return info
    ref, low = _reference(c, q, k, v, dout, dlse, slopes, want_lse)
    for name, a, r, rl in zip(("out", "lse", "dq", "dk", "dv"), got, ref, low):
        if a is None:
            continue
        assert a.dtype == (torch.float32 if name == "lse" else q.dtype), (name, a.dtype)
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        assert_close(a, r, rl, factor=2.0 if name in ("out", "lse") else 3.0, name=name, config=c["name"])
    return info


class _CountComm:
    """Bytes this rank sends through torch.distributed's P2P and all-to-all calls (a wrapper around them)."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.bytes = dist, {"p2p": 0, "all_to_all": 0}
        self._orig = (dist.batch_isend_irecv, dist.all_to_all_single)

    def __enter__(self):
        dist = self.dist
        orig_batch, orig_a2a = self._orig

        def batch(ops):
            for op in ops:
                if op.op is dist.isend:
                    self.bytes["p2p"] += op.tensor.numel() * op.tensor.element_size()
            return orig_batch(ops)

        def a2a(output, input, *args, **kw):
            world = dist.get_world_size(kw.get("group"))
            self.bytes["all_to_all"] += input.numel() * input.element_size() * (world - 1) // world
            return orig_a2a(output, input, *args, **kw)

        dist.batch_isend_irecv, dist.all_to_all_single = batch, a2a
        return self

    def __exit__(self, *exc):
        self.dist.batch_isend_irecv, self.dist.all_to_all_single = self._orig

    def take(self):
        total = sum(self.bytes.values())
        self.bytes = {k: 0 for k in self.bytes}
        return total


def _case_volume(c, group, rank, world):
    """Bytes sent per rank, forward and backward, against the scheme's formula; and the largest tensor any aten op
    produced during the call (no rank may hold a K or V of the whole sequence)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from transformer import distributed as tfd

    class Largest(TorchDispatchMode):
        numel, shape, op = 0, None, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                    self.numel, self.shape, self.op = t.numel(), tuple(t.shape), str(func)
            return out

    q, k, v, dout, _, slopes = _full_inputs(c, world)
    scheme = c["scheme"]
    qs, ks, vs = (tfd.shard_sequence(t, scheme, group).detach().requires_grad_() for t in (q, k, v))
    d_s = tfd.shard_sequence(dout, scheme, group)
    with _CountComm() as comm, Largest() as largest:
        out, lse = tfd.context_parallel_attention(qs, ks, vs, group, scheme=scheme, return_lse=True,
                                                  backend=c["backend"], **_attn_kw(c, slopes))
        fwd = comm.take()
        out.backward(d_s)
        bwd = comm.take()
    size = lambda t: t.numel() * t.element_size()   # noqa: E731
    kv = size(ks) + size(vs)
    if scheme == "ulysses":
        want_fwd = (size(qs) + kv + size(out) + size(lse)) * (world - 1) // world
        want_bwd = (size(out) + size(qs) + kv) * (world - 1) // world    # dout in, dq/dk/dv back (lse unused)
    else:
        want_fwd = (world - 1) * kv
        want_bwd = (world - 1) * kv + world * kv * 4 // qs.element_size()   # + the fp32 dK/dV accumulators
    assert (fwd, bwd) == (want_fwd, want_bwd), f"{scheme}: sent {fwd} / {bwd} bytes, formula {want_fwd} / {want_bwd}"
    full_k, pair = k.numel(), ks.numel() + vs.numel()
    assert largest.numel <= pair < full_k, (f"{scheme}: rank {rank} produced a tensor {largest.shape} ({largest.op}) "
                                            f"of {largest.numel} elements; a K/V pair of one shard has {pair}, a "
                                            f"full-sequence K {full_k}")
    return dict(fwd_bytes=fwd, bwd_bytes=bwd, largest=largest.numel, full_k=full_k)


def _case_model(c, group, rank, world):
    """DecoderOnly forward + backward over the sharded sequence == the unsharded model (loss and every gradient),
    by the tolerance rule with the baseline |torch backend - reference backend| of the unsharded model."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformer import distributed as tfd
    from transformer.models import DecoderOnly, DecoderOnlyConfig
    cfg = DecoderOnlyConfig.preset("tiny", **c.get("config", {}))
    torch.manual_seed(0)
    base = DecoderOnly(cfg)
    g = torch.Generator().manual_seed(1)
    n = c["n"] * world
    ids = torch.randint(0, cfg.vocab_size, (2, n + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    scheme = c["scheme"]

    def loss_and_grads(model, xs, ys, denom):
        loss = F.cross_entropy(model(xs).flatten(0, 1), ys.flatten(), reduction="sum") / denom
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.detach(), grads

    cp = DecoderOnly(cfg, context_parallel_group=group, context_parallel_scheme=scheme)
    cp.load_state_dict(base.state_dict())
    xs, ys = (tfd.shard_sequence(t, scheme, group) for t in (x, y))
    with transformer.backends.record_dispatches() as counts:
        loss, grads = loss_and_grads(cp, xs, ys, y.numel())
    dist.all_reduce(loss, group=group)
    for t in grads:
        dist.all_reduce(t, group=group)
    if rank != 0:
        return {}
    results = {}
    for be in ("reference", "torch"):
        ref_model = DecoderOnly(cfg, backend=be)
        ref_model.load_state_dict(base.state_dict())
        results[be] = loss_and_grads(ref_model, x, y, y.numel())
    (ref_loss, ref_grads), (low_loss, low_grads) = results["reference"], results["torch"]
    assert_close(loss, ref_loss, low_loss, name="loss", config=c["name"])
    for (pname, _), a, r, rl in zip(base.named_parameters(), grads, ref_grads, low_grads):
        assert_close(a, r, rl, factor=3.0, name=f"d {pname}", config=c["name"])
    attn_calls = sum(v for (op, _), v in counts.items() if op == "flash_attention")
    return dict(loss=float(loss), attention_calls=attn_calls)


def _case_failure(c, group, rank, world):
    """Each kind must raise the expected error on every rank, without waiting for the process-group timeout."""
    import torch.distributed as dist
    from transformer import distributed as tfd
    kind = c["kind"]
    n = 4
    q = torch.randn(1, n, 4, 8)
    k = torch.randn(1, n, 2, 8)
    v = torch.randn(1, n, 2, 8)
    kw = dict(scheme="ring", backend="reference")
    if kind == "shape_mismatch":
        if rank == 1:
            q, k, v = q[:, :3], k[:, :3], v[:, :3]
        expect = (ValueError, "disagree on n")
    elif kind == "one_rank_bad_argument":
        if rank == 1:
            k = k.half()
            expect = (TypeError, "k must have the same dtype as q")
        else:
            expect = (ValueError, r"rank\(s\) \[1\] of the group rejected their arguments")
    elif kind == "argument_mismatch":
        kw["causal"] = rank == 0
        expect = (ValueError, "disagree on causal")
    elif kind == "torch_backend_ring":
        kw["backend"] = "torch"
        expect = (ValueError, "log-sum-exp")
    elif kind == "zigzag_odd":
        q, k, v = q[:, :3], k[:, :3], v[:, :3]
        kw["scheme"] = "zigzag"
        expect = (ValueError, "zigzag.*even")
    elif kind == "ulysses_heads":
        q = torch.randn(1, n, 3, 8)
        k = v = torch.randn(1, n, 3, 8)
        kw["scheme"] = "ulysses"
        expect = (ValueError, "q has 3 heads")
    elif kind == "raise_inside":
        # Rank 1 fails inside the ring (its first block); rank 0 must get an error from torch.distributed within
        # the process group's timeout instead of waiting forever.
        if rank == 1:
            def boom(*a, **k):
                raise RuntimeError("injected failure in a block")
            tfd._run = boom
            expect = (RuntimeError, "injected failure")
        else:
            expect = (RuntimeError, "")
        t0 = time.time()
        try:
            out = tfd.context_parallel_attention(q.requires_grad_(), k, v, group, **kw)
            if rank == 0:
                out.sum().backward()   # the ring's backward needs rank 1 again
        except expect[0] as e:
            elapsed = round(time.time() - t0, 2)
            if rank == 1:
                time.sleep(FAIL_PG_TIMEOUT_S + 2)   # stay alive: rank 0 must give up by the group's timeout
            return dict(error=f"{type(e).__name__}: {e}"[:300], op_seconds=elapsed)
        raise AssertionError(f"rank {rank}: no error")
    else:
        raise ValueError(kind)
    import re
    t0 = time.time()
    try:
        tfd.context_parallel_attention(q, k, v, group, **kw)
    except expect[0] as e:
        assert re.search(expect[1], str(e)), f"rank {rank}: {type(e).__name__}: {e}"
        # every rank raised within the check (no rank waits in the attention): the group is usable afterwards
        flag = torch.ones(1)
        dist.all_reduce(flag, group=group)
        assert flag.item() == world
        return dict(error=f"{type(e).__name__}: {e}"[:300], op_seconds=round(time.time() - t0, 2))
    raise AssertionError(f"rank {rank}: expected {expect[0].__name__} matching {expect[1]!r}, nothing raised")


def _case_unshard(c, group, rank, world):
    """unshard_sequence(shard_sequence(x)) == x; the backward of unshard gives each shard the sum over the ranks of
    the gradients at its positions."""
    from transformer import distributed as tfd
    scheme = c["scheme"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4 * world, 3, generator=g)
    w = torch.randn(2, 4 * world, 3, generator=g)
    shard = tfd.shard_sequence(x, scheme, group).requires_grad_()
    full = tfd.unshard_sequence(shard, scheme, group)
    assert torch.equal(full, x)
    (full * w * (rank + 1)).sum().backward()
    weight = world * (world + 1) / 2                 # sum over the ranks of (rank + 1)
    assert torch.allclose(shard.grad, tfd.shard_sequence(w, scheme, group) * weight), scheme
    pos = tfd.sequence_positions(4, scheme, group)
    assert torch.equal(pos, tfd.shard_sequence(torch.arange(4 * world), scheme, group, dim=0))
    return {}


_CASE_KINDS = {"attention": _case_attention, "volume": _case_volume, "model": _case_model,
               "failure": _case_failure, "unshard": _case_unshard}


def _worker(spec_path, rank):
    import torch.distributed as dist
    spec = json.load(open(spec_path))
    torch.set_num_threads(1)
    world = spec["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=spec["pg_timeout"]))
    group = dist.group.WORLD
    results = {}
    out_path = os.path.join(spec["out"], f"rank{rank}.json")
    for c in spec["cases"]:
        t0 = time.time()
        try:
            info = _CASE_KINDS[c.get("type", "attention")](c, group, rank, world)
            results[c["name"]] = dict(status="ok", seconds=round(time.time() - t0, 2), **(info or {}))
        except Exception as e:  # noqa: BLE001  -- reported to the test
            results[c["name"]] = dict(status="fail", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"[-4000:])
        with open(out_path, "w") as f:
            json.dump(results, f)
        print(f"rank {rank}: {c['name']}: {results[c['name']]['status']} ({time.time() - t0:.1f}s)", flush=True)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001  -- a failure case may leave the group broken
        pass


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def _case(name, scheme, backend, dtype="fp32", b=1, n=5, hq=4, hkv=1, d=8, **kw):
    return dict(name=name, scheme=scheme, backend=backend, dtype=dtype, b=b, n=n, hq=hq, hkv=hkv, d=d, **kw)


FP32_2 = [
    _case("ring-causal-gqa4-lse", "ring", "reference", b=2, causal=True, lse_grad=True),
    _case("ring-win3_2-alibi", "ring", "reference", hq=2, hkv=2, window=(3, 2), alibi="h"),
    _case("zigzag-causal-gqa4-alibi_bh-win4_0", "zigzag", "reference", b=2, n=6, causal=True, alibi="bh",
          window=(4, 0), lse_grad=True),
    _case("zigzag-softcap", "zigzag", "reference", n=4, hq=2, hkv=2, softcap=2.0),
    _case("ulysses-causal-gqa-torch", "ulysses", "torch", hkv=2, causal=True, return_lse=False),
    _case("ulysses-causal-win-alibi-lse", "ulysses", "reference", hkv=2, causal=True, window=(3, -1), alibi="h",
          lse_grad=True),
    _case("ulysses-gqa4-replicated-win-torch", "ulysses", "torch", window=(2, 2), return_lse=False),
    _case("ring-causal-auto", "ring", "auto", n=3, causal=True),
]
FP32_4 = [
    _case("ring-causal-gqa4-lse", "ring", "reference", n=3, causal=True, lse_grad=True),
    _case("zigzag-causal-gqa-win5_0", "zigzag", "reference", n=4, hkv=2, causal=True, window=(5, 0)),
    _case("zigzag-causal-alibi-chunk1", "zigzag", "reference", n=2, causal=True, alibi="h"),
    _case("ulysses-causal-gqa-torch", "ulysses", "torch", n=3, hq=8, hkv=4, causal=True, return_lse=False),
    _case("ulysses-alibi_bh-replicated-lse", "ulysses", "reference", n=3, hkv=2, alibi="bh", lse_grad=True),
    _case("ring-win0_5-softcap", "ring", "reference", n=3, hq=2, hkv=2, window=(0, 5), softcap=3.0),
] + [dict(_case(f"volume-{s}", s, "reference", n=4, hq=4, hkv=4, d=16, causal=True), type="volume")
     for s in ("ring", "zigzag", "ulysses")]


def _kernel_cases(backend):
    return [
        _case(f"{backend}-ring-causal-gqa4-fp16-lse", "ring", backend, "fp16", n=8, d=16, causal=True,
              lse_grad=True),
        _case(f"{backend}-zigzag-causal-win5_0-bf16", "zigzag", backend, "bf16", n=6, d=16, hkv=2, causal=True,
              window=(5, 0)),
        _case(f"{backend}-ring-alibi-softcap-fp16", "ring", backend, "fp16", n=5, d=16, hq=2, hkv=2, causal=True,
              alibi="h", softcap=3.0),
        _case(f"{backend}-ulysses-causal-gqa-alibi-bf16", "ulysses", backend, "bf16", n=7, d=16, hkv=2,
              causal=True, alibi="h"),
    ]


ONE_RANK = [
    _case("ring-causal-gqa4-win2_0-lse", "ring", "reference", n=6, causal=True, window=(2, 0), lse_grad=True),
    _case("zigzag-causal-alibi", "zigzag", "reference", n=6, hq=2, hkv=2, causal=True, alibi="h"),
    _case("ulysses-causal-torch", "ulysses", "torch", n=6, hkv=2, causal=True, return_lse=False),
    dict(name="model-zigzag-rope", type="model", scheme="zigzag", n=6),
] + [dict(name=f"unshard-{s}", type="unshard", scheme=s) for s in ("ring", "zigzag")]

UNSHARD = [dict(name=f"unshard-{s}", type="unshard", scheme=s) for s in ("ring", "zigzag", "ulysses")]

KERNELS_4 = [
    _case("cuda-zigzag-causal-gqa-win3_0-fp16-lse", "zigzag", "cuda", "fp16", n=4, d=16, hkv=2, causal=True,
          window=(3, 0), lse_grad=True),
    _case("triton-ring-causal-alibi-bf16", "ring", "triton", "bf16", n=3, d=16, hq=2, hkv=2, causal=True, alibi="h"),
]

MODEL = [
    dict(name="model-zigzag-rope", type="model", scheme="zigzag", n=6),
    dict(name="model-ring-learned", type="model", scheme="ring", n=5,
         config=dict(positions="learned", norm="layer", mlp="gelu", bias=True)),
    dict(name="model-ulysses-alibi-window", type="model", scheme="ulysses", n=5,
         config=dict(positions="alibi", sliding_window=4)),
    dict(name="model-zigzag-window", type="model", scheme="zigzag", n=4, config=dict(sliding_window=3)),
]

FAILURES = [dict(name=k, type="failure", kind=k) for k in
            ("shape_mismatch", "one_rank_bad_argument", "argument_mismatch", "torch_backend_ring", "zigzag_odd",
             "ulysses_heads", "raise_inside")]


def _ids(cases):
    return [c["name"] for c in cases]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_plan_covers_the_global_mask_exactly():
    """Single process: for every rank and every K/V shard it holds, the planned blocks cover exactly the pairs the
    global mask allows (no pair twice, no row without a visible key), and every block that carries ALiBi has the
    kernels' alignment at the true position difference."""
    from transformer import distributed as tfd
    from transformer.reference import attention_mask
    count = 0
    for scheme in ("ring", "zigzag"):
        for world in (1, 2, 3, 4):
            for n in (1, 2, 5, 6):
                if scheme == "zigzag" and n % 2:
                    continue
                for causal in (False, True):
                    for window in [(-1, -1), (0, 0), (1, 0), (3, 2), (0, 4), (7, -1), (-1, 3), (20, 1)]:
                        for alibi in (False, True):
                            big = n * world
                            full = attention_mask(big, big, causal=causal, window_size=window)
                            for rank in range(world):
                                for src in range(world):
                                    count += 1
                                    _check_plan(tfd, attention_mask, full, scheme, world, n, rank, src, causal,
                                                window, alibi)
    assert count > 1000


def _check_plan(tfd, attention_mask, full, scheme, world, n, rank, src, causal, window, alibi):
    pos = lambda r: torch.cat([torch.arange(s, s + c) for s, c in tfd._segments(scheme, r, world, n)])  # noqa: E731
    qp, kp = pos(rank), pos(src)
    covered = torch.zeros(n, n, dtype=torch.int32)
    for t in tfd._plan(scheme, rank, src, world, n, causal, window, alibi, 3):
        m, w = t.q1 - t.q0, t.k1 - t.k0
        true_delta = qp[t.q0:t.q1, None] - kp[None, t.k0:t.k1]
        if t.full:
            seen = torch.ones(m, w, dtype=torch.bool)
        elif t.explicit:
            dd = (torch.arange(m) + t.delta)[:, None] - torch.arange(w)[None]
            assert torch.equal(dd, true_delta), t
            seen = torch.ones(m, w, dtype=torch.bool)
            if t.left >= 0:
                seen &= dd <= t.left
            if t.right >= 0:
                seen &= -dd <= t.right
        else:
            seen = attention_mask(m, w, causal=t.causal, window_size=t.window, causal_align=t.align)
            if alibi:
                o = 0 if t.align == "top_left" else w - m
                assert torch.equal((torch.arange(m) + o)[:, None] - torch.arange(w)[None], true_delta), t
        assert seen.any(dim=1).all(), f"a row of {t} sees no key"
        covered[t.q0:t.q1, t.k0:t.k1] += seen.int()
    cfg = (scheme, world, n, rank, src, causal, window, alibi)
    assert int(covered.max()) <= 1, f"a pair is computed twice: {cfg}"
    assert torch.equal(covered.bool(), full[qp][:, kp]), f"plan differs from the global mask: {cfg}"


def test_import_is_lazy_and_needs_a_process_group():
    code = ("import sys, transformer; assert 'transformer.distributed' not in sys.modules; "
            "import transformer.models; assert 'transformer.distributed' not in sys.modules; "
            "d = transformer.distributed; assert 'triton' not in sys.modules; print(d.SCHEMES)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TILEFORMER_EMULATE_CUDA")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "zigzag" in res.stdout
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        transformer.distributed.context_parallel_attention(q, q, q)
    with pytest.raises(ValueError, match="scheme must be one of"):
        transformer.distributed.shard_sequence(q, "rings")


@pytest.fixture(scope="module")
def fp32_2():
    return _run_group("fp32_2", 2, FP32_2 + MODEL)


@pytest.fixture(scope="module")
def four_ranks():
    return _run_group("four_ranks", 4, FP32_4 + KERNELS_4 + UNSHARD)


@pytest.fixture(scope="module")
def one_rank():
    return _run_group("one_rank", 1, ONE_RANK)


@pytest.fixture(scope="module")
def failures():
    return _run_group("failures", 2, FAILURES, pg_timeout=FAIL_PG_TIMEOUT_S, wall_timeout=120)


@pytest.mark.parametrize("case", _ids(FP32_2))
def test_two_ranks_fp32(fp32_2, case):
    _expect_ok(fp32_2, case)


@pytest.mark.parametrize("case", _ids(FP32_4))
def test_four_ranks_fp32(four_ranks, case):
    _expect_ok(four_ranks, case)


@pytest.mark.parametrize("case", _ids(ONE_RANK))
def test_one_rank(one_rank, case):
    """A group of one process: every scheme reduces to the local attention (no communication)."""
    _expect_ok(one_rank, case)


@pytest.mark.parametrize("case", _ids(UNSHARD))
def test_shard_unshard_and_positions(four_ranks, case):
    _expect_ok(four_ranks, case)


@pytest.mark.parametrize("case", _ids(MODEL))
def test_decoder_only_sharded_equals_unsharded(fp32_2, case):
    _expect_ok(fp32_2, case)


def test_communication_and_memory_per_rank(four_ranks):
    """Ring/zigzag send (P-1)/P of K+V forward; Ulysses (P-1)/P of q, k, v, out, lse (formulas checked in each rank
    against a wrapper of torch.distributed's calls); no aten op of forward + backward produces a tensor larger than
    one shard's K and V together (a full-sequence K is P/2 times that)."""
    for s in ("ring", "zigzag", "ulysses"):
        res = _expect_ok(four_ranks, f"volume-{s}")
        for rank in range(4):
            assert res[rank]["largest"] < res[rank]["full_k"], res[rank]


@pytest.mark.parametrize("backend", helpers.kernel_backends("triton", "cuda"))
def test_kernel_backends_two_ranks(backend):
    helpers.require_backend(backend)
    cases = _kernel_cases(backend)
    results = _run_group(f"kernels_{backend}", 2, cases)
    failed = []
    for c in cases:
        try:
            _expect_ok(results, c["name"])
        except AssertionError as e:
            failed.append(f"{c['name']}: {e}")
    assert not failed, "\n\n".join(failed)


@pytest.mark.parametrize("backend", helpers.kernel_backends("triton", "cuda"))
def test_kernel_backends_four_ranks(four_ranks, backend):
    helpers.require_backend(backend)
    for c in KERNELS_4:
        if c["backend"] == backend:
            _expect_ok(four_ranks, c["name"])


@pytest.mark.parametrize("case", _ids(FAILURES))
def test_failure_handling(failures, case):
    res = _expect_ok(failures, case)
    if case == "raise_inside":
        assert "injected failure" in res[1]["error"], res[1]
        assert res[0]["op_seconds"] < FAIL_PG_TIMEOUT_S + 10, res[0]
    else:
        for rank in (0, 1):
            assert res[rank]["op_seconds"] < FAIL_PG_TIMEOUT_S, res[rank]


def test_example_trains_under_torchrun():
    """examples/train_context_parallel.py under torchrun with 2 gloo ranks: 2 steps, the first checked against the
    unsharded model."""
    script = os.path.join(ROOT, "examples", "train_context_parallel.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
           "--steps", "2", "--check"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_child_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "match the unsharded model" in res.stdout


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
