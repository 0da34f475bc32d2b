"""The package's layering, checked on the source: imports point one way, only the dispatcher knows backends.

* ``triton_kernels/`` and the Python under ``csrc/`` are leaves: they never import ``transformer`` (read from
  the AST of every file, and checked at run time in a fresh interpreter).
* Modules, models, the SDPA drop-in and the integrations call the ops, never the dispatcher or an op's private
  helpers, so every call is dispatched, and counted by ``record_dispatches()``, in one place.
"""
from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

import pytest
import torch

import transformer
from transformer import backends
from transformer.models import EncoderDecoder, EncoderDecoderConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path):
    """Every module name a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(open(path).read(), path)
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


def _py_files(*dirs):
    return sorted(f for d in dirs for f in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True))


def test_import_graph_scanner_sees_imports():
    """The scanner itself: it finds absolute and relative imports (so the tests below can fail)."""
    names = _imports(os.path.join(ROOT, "transformer", "_triton", "attention.py"))
    assert "triton_kernels" in names and "transformer.ops" in names


@pytest.mark.parametrize("path", _py_files("triton_kernels", "csrc"), ids=lambda p: os.path.relpath(p, ROOT))
def test_kernel_packages_do_not_import_transformer(path):
    bad = [n for n in _imports(path) if n == "transformer" or n.startswith("transformer.")]
    assert not bad, f"{os.path.relpath(path, ROOT)} imports {bad}: the kernel packages are leaves"


def test_importing_a_triton_kernel_does_not_import_the_library():
    pytest.importorskip("triton")
    code = ("import sys, triton_kernels.attention, triton_kernels.norms, triton_kernels.decode\n"
            "print(sorted(m for m in sys.modules if m == 'transformer' or m.startswith('transformer.')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", f"importing the Triton kernels imported {res.stdout.strip()}"


_CALLERS = ["transformer/sdpa.py", "transformer/generate.py", "transformer/kv_cache.py",
            "transformer/flash_attn_interface.py"] + [
    os.path.relpath(p, ROOT) for p in _py_files("transformer/nn", "transformer/models", "transformer/integrations")]


@pytest.mark.parametrize("rel", _CALLERS)
def test_callers_use_the_ops_not_the_dispatcher(rel):
    """No `backends.select/dispatch`, no private names of other modules (the shared argument checks, _checks,
    excepted), no backend names in comparisons."""
    tree = ast.parse(open(os.path.join(ROOT, rel)).read(), rel)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("select", "dispatch") and \
                isinstance(node.value, ast.Name) and node.value.id == "backends":
            problems.append(f"line {node.lineno}: backends.{node.attr}")
        if isinstance(node, ast.ImportFrom):
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "_checks"]
            if private:
                problems.append(f"line {node.lineno}: imports private {private} from {node.module}")
        if isinstance(node, ast.Compare):
            for c in node.comparators + [node.left]:
                if isinstance(c, ast.Constant) and c.value in backends.BACKENDS:
                    problems.append(f"line {node.lineno}: compares with the backend name {c.value!r}")
    assert not problems, f"{rel}: " + "; ".join(problems)


def test_encoder_decoder_attention_calls_are_all_dispatched():
    """Forward + backward of an EncoderDecoder with padded source and target batches: 2 encoder self-attentions
    and 2 x (self + cross) decoder attentions, each one counted."""
    torch.manual_seed(0)
    cfg = EncoderDecoderConfig.preset("tiny")
    model = EncoderDecoder(cfg)
    src = torch.randint(1, cfg.vocab_size, (2, 7))
    tgt = torch.randint(1, cfg.vocab_size, (2, 5))
    with backends.record_dispatches() as counts:
        logits = model(src, tgt, src_lengths=torch.tensor([7, 4]), tgt_lengths=torch.tensor([5, 3]))
        logits.float().sum().backward()
    attention = {key: n for key, n in counts.items() if "attention" in key[0]}
    assert sum(attention.values()) == 3 * cfg.n_layers, counts
    assert sum(n for (op, _), n in counts.items() if op == "layer_norm") > 0, counts


def test_sdpa_and_multihead_attention_are_dispatched():
    q = torch.randn(2, 3, 9, 16)
    mha = transformer.MultiheadAttention(48, 3, batch_first=True)
    x = torch.randn(2, 9, 48)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    with backends.record_dispatches() as counts:
        transformer.scaled_dot_product_attention(q, q, q, is_causal=True)
        mha(x, x, x, need_weights=False)
        mha(x, x, x, key_padding_mask=pad, need_weights=False)
    assert counts == {("flash_attention", "torch"): 2, ("padded_attention", "torch"): 1}
