"""Who can run a case: our backends (through the public API) and optional peer libraries.

A provider answers `unavailable(case, inp, device)` (None, or the reason it cannot run the case) and
`build(case, inp)` (a zero-argument callable returning the op's differentiable output). Our backends are
found through transformer.backends: explain() says whether a backend serves a call, so a kernel module that
is missing or rejects a shape shows up as "not available: <reason>" and never as a crash.

Peers (each optional, imported lazily; never a dependency):
    sdpa-flash    torch's F.scaled_dot_product_attention pinned to SDPBackend.FLASH_ATTENTION
    sdpa-cudnn    the same pinned to SDPBackend.CUDNN_ATTENTION (torch.nn.attention.sdpa_kernel)
    flash-attn    flash_attn_func, flash_attn_with_kvcache, flash_attn.ops.triton.layer_norm
    flash-attn3   flash_attn_interface.flash_attn_func (Hopper)
    flash-attn4   flash_attn.cute.flash_attn_func (CuTe DSL; Hopper/Blackwell)
    flashinfer    BatchPrefillWithRaggedKVCacheWrapper (fwd), BatchDecodeWithPagedKVCacheWrapper
    liger         LigerLayerNormFunction, LigerRMSNormFunction
    apex          fused_layer_norm_affine, fused_rms_norm_affine

Tuning variants of our backends (``BackendVariant``): ``VARIANTS`` below (CUDA knobs), plus whatever a Triton
kernel module declares in a module-level ``BENCH_VARIANTS = {name: {env var: value}}`` (the launcher reads
the variables at every call): each becomes a provider of the module's op(s), timed and profiled next to
the default path.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

import torch

import transformer
from transformer import backends

from .bench import Unavailable
from .cases import NORM_EPS, Case

OUR_BACKENDS = tuple(backends.BACKENDS)
EXPLAIN_RAISED = "explain() raised"         # prefix of a reason that is a bug, not a limitation


# ---------------------------------------------------------------------------------------------
# Our backends
# ---------------------------------------------------------------------------------------------

def call_args(case: Case, inp: dict):
    """(public function, positional args, keyword args) of the op for these inputs."""
    p = case.p
    if case.op == "flash_attention":
        drop = dict(dropout_p=p["dropout"]) if p.get("dropout") else {}
        return transformer.flash_attention, (inp["q"], inp["k"], inp["v"]), dict(causal=bool(p["causal"]), **drop)
    if case.op == "decode_attention":
        scales = dict(k_scale=inp["k_scale"], v_scale=inp["v_scale"]) if inp.get("k_scale") is not None else {}
        return (transformer.decode_attention, (inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"]),
                dict(block_table=inp["block_table"], causal=True, **scales))
    if case.op == "layer_norm":
        return transformer.layer_norm, (inp["x"], inp["weight"], inp["bias"], NORM_EPS), {}
    return transformer.rms_norm, (inp["x"], inp["weight"], NORM_EPS), {}


def backend_reason(op: str, backend: str, args, kwargs) -> Optional[str]:
    """None if `backend` can serve op(*args, **kwargs) here, else the dispatcher's reason."""
    try:
        text = backends.explain(op, *args, backend=backend, **kwargs)
    except Exception as e:  # an invalid call or a broken supports() predicate: report, do not crash the sweep
        return f"{EXPLAIN_RAISED} {type(e).__name__}: {e}"
    for line in text.splitlines()[2:]:
        name, _, status = line.strip().partition(":")
        if name == backend:
            status = status.strip()
            if status.startswith("selected (the call raises"):          # a forced kernel path that cannot run
                return status[len("selected ("):].rstrip(")")
            if status == "selected" or status.startswith("selected "):    # "selected (<which kernel>)"
                return None
            return status.split("rejected -- ", 1)[-1]
    return f"explain() did not mention {backend}"


class Backend:
    kind = "backend"

    def __init__(self, name):
        self.name = name
        self.backend = name          # the transformer backend it calls

    def unavailable(self, case: Case, inp: dict, device) -> Optional[str]:
        fn, args, kwargs = call_args(case, inp)
        with torch.set_grad_enabled(bool(inp["grad_inputs"]) and case.mode != "fwd"):
            return backend_reason(case.op, self.backend, args, kwargs)

    def build(self, case: Case, inp: dict) -> Callable:
        fn, args, kwargs = call_args(case, inp)
        kwargs = dict(kwargs, backend=self.backend)
        return lambda: fn(*args, **kwargs)


class BackendVariant(Backend):
    """One of our backends with a tuning knob set (environment variables its launcher reads at every call),
    timed next to the default so one GPU run compares the variants. Serves only `ops`."""

    def __init__(self, name, backend, env, ops):
        super().__init__(name)
        self.backend, self.env, self.ops = backend, dict(env), tuple(ops)

    def unavailable(self, case: Case, inp: dict, device) -> Optional[str]:
        if case.op not in self.ops:
            return f"{self.name} is a variant of {self.backend} for {', '.join(self.ops)} only"
        return self.wrap(super().unavailable)(case, inp, device)     # the dispatcher sees the knob too

    def build(self, case: Case, inp: dict) -> Callable:
        return self.wrap(super().build(case, inp))

    def wrap(self, fn: Callable) -> Callable:
        """fn with this variant's environment set during each call (the timed callable of a backward, which
        runs outside build()'s forward, is wrapped too)."""
        def run(*args, **kwargs):
            old = {k: os.environ.get(k) for k in self.env}
            os.environ.update(self.env)
            try:
                return fn(*args, **kwargs)
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return run


# The CUDA forward's first tiles (csrc/attention/launch.cuh FwdTiles: 4 warps, 64-query blocks, Q re-read
# from shared memory), against which the default 8-warp tiles were chosen without a GPU; and the sm_80 forward
# with its default tiles where "cuda" runs the sm_90a one (TILEFORMER_CUDA_ATTN_FWD auto on an H100 / H200). Both
# force the sm_80 forward. And the sm_80 backward where "cuda" runs the sm_90a one (TILEFORMER_CUDA_ATTN_BWD).
VARIANTS = (BackendVariant("cuda-fwd-w4", "cuda", {"TILEFORMER_CUDA_ATTN_FWD_TILES": "w4",
                                                   "TILEFORMER_CUDA_ATTN_FWD": "sm80"}, ("flash_attention",)),
            BackendVariant("cuda-fwd-sm80", "cuda", {"TILEFORMER_CUDA_ATTN_FWD": "sm80"}, ("flash_attention",)),
            BackendVariant("cuda-bwd-sm80", "cuda", {"TILEFORMER_CUDA_ATTN_BWD": "sm80"}, ("flash_attention",)))
# Triton kernel modules whose BENCH_VARIANTS become providers, and the ops they serve.
VARIANT_MODULES = {"triton_kernels.attention": ("flash_attention",), "triton_kernels.decode": ("decode_attention",),
                   "triton_kernels.norms": ("layer_norm", "rms_norm")}


def module_variants(modules=None):
    """BackendVariants declared by the Triton kernel modules (BENCH_VARIANTS = {name: {env var: value}}); a
    module with a forward-path switch (FWD_PATH_ENV, its values in _FWD_PATHS) and no BENCH_VARIANTS gets one
    variant per forced path, "triton-fwd-<path>". A module that does not import (no triton) declares none."""
    out = []
    for mod, ops in (modules or VARIANT_MODULES).items():
        try:
            m = importlib.import_module(mod)
        except Exception:  # no triton here: the triton backend is unavailable anyway
            continue
        declared = dict(getattr(m, "BENCH_VARIANTS", None) or {})
        env = getattr(m, "FWD_PATH_ENV", None)
        if not declared and env:
            declared = {f"triton-fwd-{p}": {env: p} for p in getattr(m, "_FWD_PATHS", ()) if p != "auto"}
        for name, values in declared.items():
            out.append(BackendVariant(name, "triton", dict(values), ops))
    return out


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------

def _import(name):
    try:
        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a wheel built for another torch
        return None, f"{name} not importable ({type(e).__name__}: {str(e)[:120]})"


class Peer:
    """Base class: a peer library that serves some ops on CUDA fp16/bf16 tensors."""
    kind = "peer"
    backend = None      # not one of ours
    name = "?"
    module = "?"
    ops: tuple = ()
    modes: tuple = ("fwd", "bwd", "fwd+bwd")
    dropout = False     # serves attention dropout (cases with a "dropout" param)

    def unavailable(self, case: Case, inp: dict, device) -> Optional[str]:
        if case.op not in self.ops:
            return f"{self.name} has no {case.op}"
        if case.p.get("dropout") and not self.dropout:
            return f"{self.name} has no attention dropout"
        if case.mode not in self.modes:
            return f"{self.name} has no {case.mode} for {case.op}"
        if torch.device(device).type != "cuda":
            return f"{self.name} needs a CUDA GPU"
        if case.p.get("kv"):
            return f"{self.name} has no {case.p['kv']} KV cache with per-token scales"
        if case.dtype not in ("fp16", "bf16"):
            return f"{self.name} takes fp16/bf16"
        return _import(self.module)[1] or self.extra_reason(case)

    def extra_reason(self, case: Case) -> Optional[str]:
        return None


class FlashAttn(Peer):
    name, module = "flash-attn", "flash_attn"
    ops = ("flash_attention", "decode_attention", "layer_norm", "rms_norm")
    dropout = True

    def extra_reason(self, case):
        if case.op in ("layer_norm", "rms_norm"):
            return _import("flash_attn.ops.triton.layer_norm")[1]
        if case.op == "decode_attention" and case.p["page"] % 256:
            return "flash_attn_with_kvcache needs pages of a multiple of 256 tokens"
        return None

    def build(self, case, inp):
        if case.op == "flash_attention":
            from flash_attn import flash_attn_func
            causal, drop = bool(case.p["causal"]), case.p.get("dropout", 0.0)
            return lambda: flash_attn_func(inp["q"], inp["k"], inp["v"], dropout_p=drop, causal=causal)
        if case.op == "decode_attention":
            from flash_attn import flash_attn_with_kvcache
            return lambda: flash_attn_with_kvcache(inp["q"], inp["k_cache"], inp["v_cache"],
                                                   cache_seqlens=inp["cache_seqlens"],
                                                   block_table=inp["block_table"], causal=True)
        from flash_attn.ops.triton.layer_norm import layer_norm_fn, rms_norm_fn
        if case.op == "layer_norm":
            return lambda: layer_norm_fn(inp["x"], inp["weight"], inp["bias"], eps=NORM_EPS)
        return lambda: rms_norm_fn(inp["x"], inp["weight"], None, eps=NORM_EPS)


class Sdpa(Peer):
    """torch's F.scaled_dot_product_attention pinned to one backend by torch.nn.attention.sdpa_kernel. q, k, v
    are passed as [B, H, N, D] views of the [B, N, H, D] inputs (no copy; the flash backend's own layout);
    GQA through enable_gqa. A backend that rejects the call ("No available kernel", "No viable backend") is
    not available."""
    module = "torch.nn.attention"
    ops = ("flash_attention",)
    dropout = True

    def __init__(self, name, backend):
        self.name, self.sdp_backend = name, backend

    def extra_reason(self, case):
        from torch.nn.attention import SDPBackend
        if not hasattr(SDPBackend, self.sdp_backend):
            return f"this torch has no SDPBackend.{self.sdp_backend}"
        return None

    def build(self, case, inp):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, self.sdp_backend)
        kwargs = dict(is_causal=bool(case.p["causal"]), dropout_p=case.p.get("dropout", 0.0))
        if case.p["Hq"] != case.p["Hkv"]:
            kwargs["enable_gqa"] = True
        q, k, v = (inp[n].transpose(1, 2) for n in ("q", "k", "v"))

        def run():
            try:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, **kwargs)
            except RuntimeError as e:
                if "No available kernel" in str(e) or "No viable backend" in str(e):
                    raise Unavailable(f"SDPBackend.{self.sdp_backend} does not serve this call") from e
                raise
        return run


class FlashAttn3(Peer):
    name, module = "flash-attn3", "flash_attn_interface"
    ops = ("flash_attention",)

    def build(self, case, inp):
        from flash_attn_interface import flash_attn_func
        causal = bool(case.p["causal"])

        def run():
            out = flash_attn_func(inp["q"], inp["k"], inp["v"], causal=causal)
            return out[0] if isinstance(out, tuple) else out   # some versions return (out, lse)
        return run


class FlashAttn4(Peer):
    name, module = "flash-attn4", "flash_attn.cute"
    ops = ("flash_attention",)

    def build(self, case, inp):
        from flash_attn.cute import flash_attn_func
        causal = bool(case.p["causal"])

        def run():
            out = flash_attn_func(inp["q"], inp["k"], inp["v"], causal=causal)
            return out[0] if isinstance(out, tuple) else out   # (out, lse)
        return run


class FlashInfer(Peer):
    name, module = "flashinfer", "flashinfer"
    ops = ("flash_attention", "decode_attention")
    modes = ("fwd",)
    _workspace = None

    def _ws(self, device):
        if self._workspace is None or self._workspace.device != device:
            FlashInfer._workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
        return self._workspace

    @staticmethod
    def _plan(wrapper, *args, **kwargs):
        """wrapper.plan (>= 0.2) or begin_forward (older); q/kv dtype keywords dropped if unknown."""
        plan = getattr(wrapper, "plan", None) or wrapper.begin_forward
        try:
            plan(*args, **kwargs)
        except TypeError:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("q_data_type", "kv_data_type")}
            plan(*args, **kwargs)
        return getattr(wrapper, "run", None) or wrapper.forward

    def build(self, case, inp):
        import flashinfer
        p = case.p
        q = inp["q"]
        dev = q.device
        i32 = dict(dtype=torch.int32, device=dev)
        if case.op == "flash_attention":   # ragged prefill: the batch packed as [B * N, H, D] views
            b, nq, nk = p["B"], p["Nq"], p["Nk"]
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self._ws(dev), "NHD")
            run = self._plan(w, torch.arange(b + 1, **i32) * nq, torch.arange(b + 1, **i32) * nk, p["Hq"],
                             p["Hkv"], p["D"], causal=bool(p["causal"]), q_data_type=q.dtype, kv_data_type=q.dtype)
            qf, kf, vf = (inp[n].reshape(-1, *inp[n].shape[2:]) for n in ("q", "k", "v"))
            return lambda: run(qf, kf, vf)
        # decode: a contiguous [B, L, Hkv, D] cache is a paged cache with one L-token page per sequence
        b, L = p["B"], p["L"]
        page = p["page"] or L
        table = inp["block_table"] if inp["block_table"] is not None else torch.arange(b, **i32)[:, None]
        per_seq = table.shape[1]
        last = (L - 1) % page + 1
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._ws(dev), "NHD")
        run = self._plan(w, torch.arange(b + 1, **i32) * per_seq, table.reshape(-1).contiguous(),
                         torch.full((b,), last, **i32), p["Hq"], p["Hkv"], p["D"], page,
                         q_data_type=q.dtype, kv_data_type=q.dtype)
        q1 = q[:, 0]
        kv = (inp["k_cache"], inp["v_cache"])
        return lambda: run(q1, kv)


class Liger(Peer):
    name, module = "liger", "liger_kernel"
    ops = ("layer_norm", "rms_norm")

    def build(self, case, inp):
        if case.op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            return lambda: LigerLayerNormFunction.apply(inp["x"], inp["weight"], inp["bias"], NORM_EPS)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        def run():
            try:   # (X, W, eps, offset, casting_mode, in_place): keep dout intact between repetitions
                return LigerRMSNormFunction.apply(inp["x"], inp["weight"], NORM_EPS, 0.0, "llama", False)
            except TypeError:
                return LigerRMSNormFunction.apply(inp["x"], inp["weight"], NORM_EPS)
        return run


class Apex(Peer):
    name, module = "apex", "apex.normalization.fused_layer_norm"
    ops = ("layer_norm", "rms_norm")

    def build(self, case, inp):
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
        n = (case.p["N"],)
        if case.op == "layer_norm":
            return lambda: fused_layer_norm_affine(inp["x"], inp["weight"], inp["bias"], n, NORM_EPS)
        return lambda: fused_rms_norm_affine(inp["x"], inp["weight"], n, NORM_EPS)


PEERS = (Sdpa("sdpa-flash", "FLASH_ATTENTION"), Sdpa("sdpa-cudnn", "CUDNN_ATTENTION"), FlashAttn(), FlashAttn3(),
         FlashAttn4(), FlashInfer(), Liger(), Apex())


def providers(names=None, *, peers=True):
    """Our backends (reference, torch, triton, cuda), their tuning variants (VARIANTS and the Triton modules'
    BENCH_VARIANTS), then the peers; `names` filters by name."""
    out = [Backend(b) for b in ("reference", "torch", "triton", "cuda")] + list(VARIANTS) + module_variants()
    if peers:
        out += list(PEERS)
    if names:
        unknown = set(names) - {p.name for p in out}
        if unknown:
            raise ValueError(f"unknown provider(s) {sorted(unknown)}; known: {[p.name for p in out]}")
        out = [p for p in out if p.name in names]
    return out


def peer_status():
    """{peer name: "importable" or why not} (import only; no GPU touched)."""
    return {p.name: _import(p.module)[1] or "importable" for p in PEERS}
