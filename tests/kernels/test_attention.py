"""decode_attention: the split-KV Triton kernels against the float32 PyTorch reference."""

import pytest
import torch
from tolerances import TOLERANCES

from cats_serve.kernels import decode_attention, decode_attention_reference
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
