"""decode_attention: the split-KV Triton kernels against the float32 PyTorch reference."""

import pytest
import torch
from tolerances import TOLERANCES

from cats_serve.kernels import (
    apply_rope,
    attention_tickets,
    decode_attention,
    decode_attention_reference,
    decode_attention_rope,
)
from cats_serve.kernels.attention import BLOCK_N, TARGET_PROGRAMS, split_plan


def make_cache(slots, nkv, seq, d, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, nkv, seq, d, generator=gen).to(dtype).to(device)
    v = torch.randn(slots, nkv, seq, d, generator=gen).to(dtype).to(device)
    return k, v


def poisoned(cache, positions, kv_len):
    """A copy whose positions past each row's own (and past kv_len) hold NaN."""
    out = cache.clone()
    for b, p in enumerate(positions.tolist()):
        out[b, :, min(p, kv_len - 1) + 1 :] = float("nan")
    out[len(positions) :] = float("nan")  # slots of other rows
    return out


# (batch, heads, kv heads, head_dim): multi-head, grouped (SmolLM2's 9/3), multi-query, odd D
SHAPES = [(1, 4, 4, 16), (3, 9, 3, 40), (2, 6, 1, 24), (5, 8, 2, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_reads_only_own_positions(device, dtype, shape):
    b, nh, nkv, d = shape
    seq, kv_len = 200, 157  # kv_len not a multiple of BLOCK_N; cache longer than kv_len
    k, v = make_cache(b + 2, nkv, seq, d, dtype, device, seed=nh * d)
    gen = torch.Generator().manual_seed(b)
    q = torch.randn(b, nh, d, generator=gen).to(dtype).to(device)
    # first position, last in kv_len, a block edge, and one past kv_len (clamped to kv_len)
    choices = [0, kv_len - 1, BLOCK_N - 1, BLOCK_N, kv_len + 20]
    positions = torch.tensor([choices[i % len(choices)] for i in range(b)], device=device)
    out = decode_attention(q, poisoned(k, positions, kv_len), poisoned(v, positions, kv_len),
                           positions, kv_len)  # fmt: skip
    ref = decode_attention_reference(q, k, v, positions, kv_len)
    assert out.shape == (b, nh * d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


def test_first_position_returns_its_own_value(device):
    """At position 0 a row sees one key: its output is that position's V, exactly."""
    k, v = make_cache(2, 2, 70, 32, torch.float32, device, seed=3)
    q = torch.randn(2, 6, 32).to(device)
    out = decode_attention(q, k, v, torch.zeros(2, dtype=torch.int64, device=device), 70)
    want = v[:2, :, 0].repeat_interleave(3, dim=1).reshape(2, 6 * 32)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def rope_inputs(b, nh, nkv, d, dtype, device, seed):
    """A QKV output [B, (nh + 2 nkv) * D] and the rotation's cos/sin [B, D / 2]."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (nh + 2 * nkv) * d, generator=gen).to(dtype).to(device)
    angles = torch.rand(b, d // 2, generator=gen) * 50.0
    return qkv, angles.cos().to(device), angles.sin().to(device)


def rope_reference(qkv, cos, sin, k, v, positions, kv_len, nh):
    """RoPE, the cache write and the float32 reference attention, step by step in torch."""
    b, d, nkv = qkv.shape[0], k.shape[3], k.shape[1]
    q, kn, vn = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    q = apply_rope(q.view(b, nh, d), cos[:, None], sin[:, None])
    slots = torch.arange(b, device=qkv.device)
    k[slots, :, positions] = apply_rope(kn.view(b, nkv, d), cos[:, None], sin[:, None])
    v[slots, :, positions] = vn.view(b, nkv, d)
    return decode_attention_reference(q, k, v, positions, kv_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_form_rotates_writes_the_cache_and_attends(device, dtype, shape):
    b, nh, nkv, d = shape
    seq, kv_len = 200, 157
    k, v = make_cache(b + 2, nkv, seq, d, dtype, device, seed=nh + d)
    qkv, cos, sin = rope_inputs(b, nh, nkv, d, dtype, device, seed=b + d)
    choices = [0, kv_len - 1, BLOCK_N - 1, BLOCK_N, kv_len + 20]
    positions = torch.tensor([choices[i % len(choices)] for i in range(b)], device=device)
    want_k, want_v = k.clone(), v.clone()
    ref = rope_reference(qkv, cos, sin, want_k, want_v, positions, kv_len, nh)
    # NaN past each row's position, at the position itself (overwritten by the kernel) and in
    # other rows' slots: the kernel may read none of it
    got_k, got_v = poisoned(k, positions, kv_len), poisoned(v, positions, kv_len)
    slots = torch.arange(b, device=device)
    got_k[slots, :, positions] = float("nan")
    got_v[slots, :, positions] = float("nan")
    out = decode_attention_rope(qkv, cos, sin, got_k, got_v, positions, kv_len, nh)
    assert out.shape == (b, nh * d) and out.dtype == dtype and torch.isfinite(out).all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)
    for got, want in ((got_k, want_k), (got_v, want_v)):  # the new entries, where they belong
        torch.testing.assert_close(
            got[slots, :, positions], want[slots, :, positions], atol=tol.atol, rtol=tol.rtol
        )


def test_rope_form_matches_rotated_queries_on_a_long_context(device):
    """Many splits (one KV head, a long cache): only split 0 writes the new entry, and the
    split holding the row's own position uses it from registers."""
    seq = 12 * BLOCK_N + 3
    k, v = make_cache(4, 1, seq, 16, torch.float32, device, seed=5)
    qkv, cos, sin = rope_inputs(4, 2, 1, 16, torch.float32, device, seed=6)
    positions = torch.tensor([seq - 2, 5 * BLOCK_N, BLOCK_N + 1, 3], device=device)
    want_k, want_v = k.clone(), v.clone()
    ref = rope_reference(qkv, cos, sin, want_k, want_v, positions, seq, 2)
    out = decode_attention_rope(qkv, cos, sin, k, v, positions, seq, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(v, want_v)


@pytest.mark.parametrize("kv_len", [40, 157, 12 * BLOCK_N + 3], ids=["1-split", "3", "13"])
def test_tickets_come_back_zeroed_and_serve_the_next_calls(device, kv_len):
    """The last split of each (row, KV head) merges and puts its ticket back to 0, so one set
    of tickets serves many calls (as the layers of a decode step share the cache's)."""
    b, nh, nkv, d = 3, 4, 1, 16
    k, v = make_cache(b, nkv, kv_len, d, torch.float32, device, seed=kv_len)
    tickets = attention_tickets(k)
    assert tickets.shape == (b * nkv,) and not tickets.any()
    positions = torch.tensor([kv_len - 1, kv_len // 2, 0], device=device)
    for seed in range(3):
        q = torch.randn(b, nh, d, generator=torch.Generator().manual_seed(seed)).to(device)
        out = decode_attention(q, k, v, positions, kv_len, tickets)
        ref = decode_attention_reference(q, k, v, positions, kv_len)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert not tickets.any(), "a ticket was left set"
    with pytest.raises(ValueError, match="tickets must be int32"):
        decode_attention(q, k, v, positions, kv_len, tickets[:1])


def test_rope_form_without_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k, v = make_cache(3, 3, 90, 40, torch.bfloat16, "cpu", seed=7)
    qkv, cos, sin = rope_inputs(3, 9, 3, 40, torch.bfloat16, "cpu", seed=8)
    positions = torch.tensor([0, 50, 89])
    want_k, want_v = k.clone(), v.clone()
    ref = rope_reference(qkv, cos, sin, want_k, want_v, positions, 90, 9)
    out = decode_attention_rope(qkv, cos, sin, k, v, positions, 90, 9)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(qkv=a["qkv"][:, :-16]), "qkv must be"),
        (lambda a: a.update(num_heads=5), "qkv must be"),
        (lambda a: a.update(cos=a["cos"][:, :4]), "cos must be"),
        (lambda a: a.update(sin=a["sin"].double()), "sin must be"),
        (lambda a: a.update(positions=torch.tensor([3, 40])), "positions must be <"),
    ],
)
def test_rope_form_bad_arguments(change, message):
    k, v = make_cache(2, 3, 40, 16, torch.float32, "cpu", seed=1)
    qkv, cos, sin = rope_inputs(2, 6, 3, 16, torch.float32, "cpu", seed=2)
    args = dict(qkv=qkv, cos=cos, sin=sin, k_cache=k, v_cache=v,
                positions=torch.tensor([3, 9]), kv_len=40, num_heads=6)  # fmt: skip
    change(args)
    with pytest.raises(ValueError, match=message):
        decode_attention_rope(**args)


@pytest.mark.parametrize("kv_len", [1, BLOCK_N, 3 * BLOCK_N + 5, 40 * BLOCK_N])
def test_split_plan_has_work_for_every_split_of_a_full_cache(kv_len):
    for batch, nkv in [(1, 1), (1, 32), (8, 8), (64, 32)]:
        splits = split_plan(batch, nkv, kv_len)
        assert 1 <= splits <= -(-kv_len // BLOCK_N)  # never more splits than blocks
        assert batch * nkv * splits >= min(TARGET_PROGRAMS, batch * nkv * -(-kv_len // BLOCK_N))


def test_many_splits_long_context(device):
    """One KV head, a long cache: each row's context is shared among many splits and merged,
    whatever its length (shares of one block, of several, and splits left empty)."""
    seq = 12 * BLOCK_N + 3
    k, v = make_cache(4, 1, seq, 16, torch.float32, device, seed=5)
    q = torch.randn(4, 2, 16).to(device)
    assert split_plan(4, 1, seq) == 13
    positions = torch.tensor([seq - 2, 5 * BLOCK_N, BLOCK_N + 1, 3], device=device)
    out = decode_attention(q, k, v, positions, seq)
    ref = decode_attention_reference(q, k, v, positions, seq)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_path_without_triton(monkeypatch):
    """On a CPU without the interpreter the reference runs in the input dtype."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k, v = make_cache(3, 3, 90, 40, torch.bfloat16, "cpu", seed=7)
    q = torch.randn(3, 9, 40).to(torch.bfloat16)
    positions = torch.tensor([0, 50, 89])
    out = decode_attention(q, k, v, positions, 90)
    ref = decode_attention_reference(q, k, v, positions, 90)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(q=a["q"][0]), "3-D"),
        (lambda a: a.update(q=a["q"].to(torch.int32)), "dtype"),
        (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache must have q's dtype"),
        (lambda a: a.update(v_cache=a["v_cache"][:, :, :, :8]), "v_cache must hold"),
        (lambda a: a.update(k_cache=a["k_cache"][:1]), "k_cache must hold"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :2]), "kv_heads divides"),
        (lambda a: a.update(positions=a["positions"][:1]), "positions must be"),
        (lambda a: a.update(positions=a["positions"].float()), "int32 or int64"),
        (lambda a: a.update(kv_len=0), "kv_len"),
        (lambda a: a.update(kv_len=41), "kv_len"),
    ],
)
def test_bad_arguments_name_the_problem(device, change, message):
    k, v = make_cache(2, 3, 40, 16, torch.float32, device, seed=1)
    args = dict(q=torch.randn(2, 6, 16).to(device), k_cache=k, v_cache=v,
                positions=torch.tensor([3, 9], device=device), kv_len=40)  # fmt: skip
    change(args)
    with pytest.raises(ValueError, match=message):
        decode_attention(**args)
