import pytest
import torch

from hfcompress.quant.packing import pack, packed_columns, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("k", [1, 8, 13, 576], ids=lambda k: f"K{k}")
def test_pack_unpack_roundtrip_is_bit_exact(bits, k):
    q = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed = pack(q, bits)
    assert packed.shape == (5, packed_columns(k, bits)) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits, k), q)


def test_int4_layout_is_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert pack(q, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]


@pytest.mark.parametrize("bits,k,cols", [(4, 576, 288), (3, 576, 216), (2, 10, 4), (8, 7, 7)])
def test_packed_columns(bits, k, cols):
    assert packed_columns(k, bits) == cols


def test_pack_rejects_wrong_dtype_and_bits():
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.zeros(2, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits=5"):
        pack(torch.zeros(2, 8, dtype=torch.uint8), 5)


def test_unpack_rejects_mismatched_width():
    with pytest.raises(ValueError, match="columns"):
        unpack(torch.zeros(2, 5, dtype=torch.uint8), 4, 16)
