"""The Triton block-sparse attention against its torch twin (TRITON_INTERPRET=1 on CPU, see
conftest): forward within 1e-4, gradients within 1e-3 in float32; and the twin against dense
attention where the layout keeps every tile."""

import math

import pytest
import torch
import torch.nn.functional as F
from hfcompress_triton import block_sparse_ref

from hfcompress.techniques.block_sparse.layout import local_layout, num_blocks, random_layout, sink_layout

# (batch, query heads, key heads, tokens, head dim, block, causal): odd lengths with a partial
# last block, grouped-query heads, a head dim that is not a power of two.
CASES = [
    (1, 2, 2, 64, 16, 16, True),
    (2, 4, 2, 75, 32, 16, True),
    (1, 3, 1, 50, 24, 16, False),
    (2, 2, 1, 97, 16, 32, False),
    (1, 6, 2, 129, 32, 32, True),
]
IDS = [f"b{b}-h{h}k{hk}-t{t}-d{d}-blk{blk}-{'causal' if c else 'bidir'}" for b, h, hk, t, d, blk, c in CASES]


def _inputs(b, h, hk, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, hk, t, d, generator=g)
    v = torch.randn(b, hk, t, d, generator=g)
    return q, k, v


def _layout(b, h, t, block, causal, seed=0):
    n = num_blocks(t, block)
    per_head = random_layout(n, n, 1, causal=causal, seed=seed, heads=b * h) | sink_layout(n, n, 1, causal=causal)
    return per_head.view(b, h, n, n)


def _run(fn, q, k, v, layout, block, causal, grad_out, device="cpu", dtype=torch.float32):
    q, k, v = (x.to(device, dtype).requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, layout.to(device), block, causal, 1 / math.sqrt(q.shape[-1]))
    out.backward(grad_out.to(device, dtype))
    return tuple(x.float().cpu() for x in (out.detach(), q.grad, k.grad, v.grad))


@pytest.mark.parametrize(("b", "h", "hk", "t", "d", "block", "causal"), CASES, ids=IDS)
def test_kernel_equals_its_twin_forward_and_backward(b, h, hk, t, d, block, causal, device):
    from hfcompress_triton.block_sparse import block_sparse_attention

    q, k, v = _inputs(b, h, hk, t, d)
    layout = _layout(b, h, t, block, causal)
    grad_out = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(1))
    got = _run(block_sparse_attention, q, k, v, layout, block, causal, grad_out, device)
    want = _run(block_sparse_ref.block_sparse_attention_ref, q, k, v, layout, block, causal, grad_out)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_kernel_rows_keeping_only_the_diagonal(causal, device):
    from hfcompress_triton.block_sparse import block_sparse_attention

    q, k, v = _inputs(1, 2, 1, 70, 16)
    n = num_blocks(70, 16)
    layout = torch.eye(n, dtype=torch.bool).expand(1, 2, n, n).clone()
    layout[0, 1, 3, 0] = True  # one row of one head keeps a second tile
    grad_out = torch.randn(1, 2, 70, 16)
    got = _run(block_sparse_attention, q, k, v, layout, 16, causal, grad_out, device)
    want = _run(block_sparse_ref.block_sparse_attention_ref, q, k, v, layout, 16, causal, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=0)


def test_kernel_a_wrong_head_mapping_would_show(device):
    # Key heads that differ a lot: reading key head h % Hk instead of h // (H / Hk) fails this.
    from hfcompress_triton.block_sparse import block_sparse_attention

    q, k, v = _inputs(1, 4, 2, 32, 16)
    v[:, 1] += 100
    layout = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    q, k, v, layout = (x.to(device) for x in (q, k, v, layout))
    out = block_sparse_attention(q, k, v, layout, 16, True, 0.25).cpu()
    assert (out[:, :2].mean() < 10) and (out[:, 2:].mean() > 90)


def test_twin_with_every_tile_kept_is_dense_attention():
    q, k, v = _inputs(2, 4, 2, 45, 16)
    n = num_blocks(45, 16)
    layout = local_layout(n, n, n, causal=False)[None, None]
    out = block_sparse_ref.block_sparse_attention_ref(q, k, v, layout, 16, True, 0.25)
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.25
    )
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=0)


def test_twin_drops_the_tiles_the_layout_drops():
    # Values that are one-hot per key block: the output mixes only the kept blocks' values.
    t, block = 48, 16
    q, k, _ = _inputs(1, 1, 1, t, 16)
    v = torch.zeros(1, 1, t, 16)
    for j in range(3):
        v[0, 0, j * block : (j + 1) * block, j] = 1.0
    layout = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)[None, None]
    out = block_sparse_ref.block_sparse_attention_ref(q, k, v, layout, block, False, 0.25)[0, 0]
    assert torch.allclose(out[:16, 0], torch.ones(16)) and out[32:, 1].abs().max() == 0
    assert torch.allclose(out[32:, 0] + out[32:, 2], torch.ones(16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("block", [64, 128])
def test_kernel_half_precision_on_gpu(dtype, block):
    # Half-precision inputs, float32 accumulation: within 2e-2 of the float32 twin (the
    # inputs' own rounding); the interpreter computes bf16 dots wrongly, so this is GPU only.
    from hfcompress_triton.block_sparse import block_sparse_attention

    q, k, v = _inputs(2, 8, 2, 1000, 64)
    layout = _layout(2, 8, 1000, block, True)
    grad_out = torch.randn(2, 8, 1000, 64)
    got = _run(block_sparse_attention, q, k, v, layout, block, True, grad_out, "cuda", dtype)
    q, k, v, grad_out = (x.to(dtype).float() for x in (q, k, v, grad_out))
    want = _run(block_sparse_ref.block_sparse_attention_ref, q, k, v, layout, block, True, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((1, 1, 3, 2), "does not fit"), ((2, 1, 4, 4), "does not fit")],
    ids=["wrong-blocks", "wrong-batch"],
)
def test_launcher_names_the_shapes_that_disagree(shape, match):
    from hfcompress_triton.block_sparse import block_sparse_attention

    q, k, v = _inputs(3, 2, 1, 64, 16)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, torch.ones(shape, dtype=torch.bool), 16, True, 0.25)


def test_launcher_refuses_a_block_the_tiles_cannot_use():
    from hfcompress_triton.block_sparse import block_sparse_attention

    q, k, v = _inputs(1, 2, 1, 16, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), 8, True, 0.25)
