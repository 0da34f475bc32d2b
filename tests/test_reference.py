"""The references against PyTorch built-ins and against naive loops written independently."""
import math

import pytest
import torch
import torch.nn.functional as F

from transformer import reference

torch.manual_seed(0)


def naive_attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), slopes=None, softcap=0.0,
                    kpm=None, align="bottom_right"):
    """Element-by-element loops in float64, visibility rules spelled out again."""
    b, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, nq, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, nq), float("-inf"), dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(nq):
                pos = i + (nk - nq if align == "bottom_right" else 0)
                s = []
                for j in range(nk):
                    ok = True
                    if causal and j > pos:
                        ok = False
                    if window[0] >= 0 and j < pos - window[0]:
                        ok = False
                    if window[1] >= 0 and j > pos + window[1]:
                        ok = False
                    if kpm is not None and not kpm[bi, j]:
                        ok = False
                    if not ok:
                        continue
                    x = float(q[bi, i, h] @ k[bi, j, kh]) * scale
                    if softcap > 0:
                        x = softcap * math.tanh(x / softcap)
                    if slopes is not None:
                        sl = slopes[h] if slopes.dim() == 1 else slopes[bi, h]
                        x -= float(sl) * abs(pos - j)
                    s.append((j, x))
                if not s:
                    continue
                m = max(x for _, x in s)
                z = sum(math.exp(x - m) for _, x in s)
                lse[bi, h, i] = m + math.log(z)
                for j, x in s:
                    out[bi, i, h] += math.exp(x - m) / z * v[bi, j, kh]
    return out, lse


CASES = [
    # (nq, nk, hq, hkv, d, kwargs)
    (1, 13, 2, 2, 8, dict(causal=True)),
    (7, 5, 4, 2, 8, dict(causal=True)),                      # Nq > Nk: first rows see nothing
    (5, 9, 6, 2, 40 // 5, dict(window=(2, 1))),
    (6, 6, 8, 1, 8, dict(causal=True, window=(3, -1))),       # MQA 8:1
    (4, 11, 2, 1, 8, dict(slopes="h", softcap=2.0)),
    (4, 11, 2, 2, 8, dict(slopes="bh", causal=True, align="top_left")),
    (3, 7, 2, 2, 8, dict(kpm=True)),
]


@pytest.mark.parametrize("nq,nk,hq,hkv,d,kw", CASES)
def test_attention_matches_naive_loops(nq, nk, hq, hkv, d, kw):
    b = 2
    q, k, v = torch.randn(b, nq, hq, d), torch.randn(b, nk, hkv, d), torch.randn(b, nk, hkv, d)
    kw = dict(kw)
    slopes = kw.pop("slopes", None)
    if slopes == "h":
        slopes = torch.rand(hq) * 0.5
    elif slopes == "bh":
        slopes = torch.rand(b, hq) * 0.5
    kpm = None
    if kw.pop("kpm", False):
        kpm = torch.rand(b, nk) > 0.4
        kpm[0] = False  # a sequence with no visible key at all
    align = kw.pop("align", "bottom_right")
    window = kw.pop("window", (-1, -1))
    ref_out, ref_lse = naive_attention(q, k, v, window=window, slopes=slopes, kpm=kpm, align=align, **kw)
    out, lse = reference.attention(q, k, v, window_size=window, alibi_slopes=slopes, key_padding_mask=kpm,
                                   causal_align=align, return_lse=True, compute_dtype=torch.float64, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("nq,nk", [(1, 113), (113, 239), (239, 239), (239, 113)])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (8, 1), (4, 4)])
@pytest.mark.parametrize("d", [40, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa(nq, nk, hq, hkv, d, causal):
    q, k, v = torch.randn(2, nq, hq, d), torch.randn(2, nk, hkv, d), torch.randn(2, nk, hkv, d)
    # SDPA's is_causal is top-left aligned.
    out = reference.attention(q, k, v, causal=causal, causal_align="top_left")
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_rows_are_zero_with_zero_grads():
    q = torch.randn(1, 6, 2, 16, requires_grad=True)
    k = torch.randn(1, 3, 2, 16, requires_grad=True)
    v = torch.randn(1, 3, 2, 16, requires_grad=True)
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)   # rows 0..2 see nothing
    assert torch.all(out[:, :3] == 0) and torch.all(torch.isneginf(lse[..., :3]))
    assert torch.isfinite(lse[..., 3:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :3] == 0)


def test_attention_varlen_matches_dense_per_sequence():
    lens_q, lens_k = [5, 1, 0, 9], [7, 1, 4, 9]
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q, k, v = torch.randn(sum(lens_q), 6, 16), torch.randn(sum(lens_k), 2, 16), torch.randn(sum(lens_k), 2, 16)
    slopes = torch.rand(4, 6)
    out, lse = reference.attention_varlen(q, k, v, cq, ck, 9, 9, causal=True, alibi_slopes=slopes, return_lse=True)
    for i in range(4):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        if lens_q[i] == 0:
            continue
        o, l = reference.attention(q[None, qs], k[None, ks], v[None, ks], causal=True, alibi_slopes=slopes[i],
                                   return_lse=True)
        torch.testing.assert_close(out[qs], o[0])
        torch.testing.assert_close(lse[:, qs], l[0])


@pytest.mark.parametrize("n", [1, 7, 127, 768, 1000])
@pytest.mark.parametrize("affine", [False, True])
def test_norms_match_torch(n, affine):
    x = torch.randn(3, 5, n)
    w = torch.randn(n) if affine else None
    b = torch.randn(n) if affine else None
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (n,), w, b, 1e-5))
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-6), F.rms_norm(x, (n,), w, 1e-6))


def test_norm_residual_prenorm():
    x, r, w = torch.randn(4, 33), torch.randn(4, 33), torch.randn(33)
    out, h = reference.rms_norm(x, w, 1e-6, residual=r, prenorm=True)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (33,), w, 1e-6))
    out, h = reference.layer_norm(x.half(), w, None, 1e-5, residual=r.half(), prenorm=True)
    assert out.dtype == torch.float32 and h.dtype == torch.float32


def _paged(k_cache_contig, page_size, generator):
    """Scatter a contiguous [B, S, H, D] cache into shuffled pages; returns (paged cache, block_table)."""
    b, s, h, d = k_cache_contig.shape
    pages_per_seq = -(-s // page_size)
    n_pages = b * pages_per_seq + 3
    perm = torch.randperm(n_pages, generator=generator)[: b * pages_per_seq].view(b, pages_per_seq)
    paged = torch.zeros(n_pages, page_size, h, d, dtype=k_cache_contig.dtype)
    for bi in range(b):
        for t in range(s):
            paged[perm[bi, t // page_size], t % page_size] = k_cache_contig[bi, t]
    return paged, perm.to(torch.int32)


@pytest.mark.parametrize("page_size", [None, 1, 16])
@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("sq", [1, 4])
def test_decode_matches_dense_attention(page_size, append, sq):
    g = torch.Generator().manual_seed(1)
    b, s_max, hq, hkv, d = 4, 40, 8, 2, 16
    lens = torch.tensor([0, 1, 17, 36], dtype=torch.int32)
    kc, vc = torch.randn(b, s_max, hkv, d, generator=g), torch.randn(b, s_max, hkv, d, generator=g)
    q = torch.randn(b, sq, hq, d, generator=g)
    k_new = torch.randn(b, sq, hkv, d, generator=g) if append else None
    v_new = torch.randn(b, sq, hkv, d, generator=g) if append else None
    # Expected: dense attention over the (appended) prefix of each sequence, queries at the end.
    expected = []
    for i in range(b):
        n = int(lens[i])
        ki, vi = kc[i, :n], vc[i, :n]
        if append:
            ki, vi = torch.cat([ki, k_new[i]]), torch.cat([vi, v_new[i]])
        if ki.shape[0] == 0:
            expected.append(torch.zeros(sq, hq, d))
        else:
            expected.append(reference.attention(q[i:i + 1], ki[None], vi[None], causal=True)[0])
    expected = torch.stack(expected)
    if page_size is None:
        kcache, vcache, bt = kc.clone(), vc.clone(), None
    else:
        kcache, bt = _paged(kc, page_size, torch.Generator().manual_seed(2))
        vcache, _ = _paged(vc, page_size, torch.Generator().manual_seed(2))
    out = reference.decode_attention(q, kcache, vcache, lens, k=k_new, v=v_new, block_table=bt)
    torch.testing.assert_close(out, expected)
    if append:  # the new tokens are in the cache, at cache_seqlens..
        for i in range(b):
            for t in range(sq):
                pos = int(lens[i]) + t
                got = kcache[i, pos] if bt is None else kcache[bt[i, pos // page_size], pos % page_size]
                torch.testing.assert_close(got, k_new[i, t])


def test_reference_computes_in_low_precision_on_request():
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert reference.attention(q, q, q, compute_dtype=None).dtype == torch.bfloat16
    assert reference.attention(q, q, q).dtype == torch.float32
    assert reference.attention(q, q, q, compute_dtype=torch.float64).dtype == torch.float64
