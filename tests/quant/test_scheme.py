"""QuantScheme / QuantArgs: validation, names, dict round trips."""

import pytest

from hfcompress import CheckpointError, QuantArgs, QuantScheme

W4G128 = QuantArgs(num_bits=4, strategy="group", group_size=128)
W8_CHANNEL = QuantArgs(num_bits=8, symmetric=True, strategy="channel", group_size=None, zp_dtype=None)
A8_TOKEN = QuantArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True, observer=None, zp_dtype=None)
A8_STATIC = QuantArgs(num_bits=8, symmetric=True, strategy="tensor", zp_dtype=None)

SCHEMES = {
    "W4A16": QuantScheme(weights=W4G128),
    "W8A8": QuantScheme(weights=W8_CHANNEL, input_activations=A8_TOKEN),
    "W4A8": QuantScheme(weights=W4G128, input_activations=A8_STATIC),
}


@pytest.mark.parametrize("name", SCHEMES, ids=list(SCHEMES))
def test_name_and_dict_round_trip(name):
    scheme = SCHEMES[name]
    assert scheme.name == name
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme


BAD_ARGS = [
    (dict(num_bits=4, strategy="group", group_size=None), "group_size=None is invalid"),
    (dict(num_bits=4, strategy="channel", group_size=64), "group_size=64 is invalid"),
    (dict(num_bits=9, strategy="channel"), "num_bits=9 is invalid"),
    (dict(num_bits=4, strategy="channel", symmetric=True, zp_dtype="uint8"), "zp_dtype='uint8' is invalid"),
    (dict(num_bits=4, strategy="channel", zp_dtype="float32"), r"accepted: 'uint8' or 'float16'"),
    (dict(num_bits=8, strategy="channel", dynamic=True), "dynamic=True is invalid"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGS, ids=[m.split(" ")[0] for _, m in BAD_ARGS])
def test_invalid_args_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantArgs(**kwargs)


def test_activations_must_be_8_bit_symmetric_token_or_tensor():
    with pytest.raises(ValueError, match=r"input_activations\.strategy='group'"):
        QuantScheme(
            weights=W4G128, input_activations=QuantArgs(num_bits=8, symmetric=True, group_size=32, zp_dtype=None)
        )
    with pytest.raises(ValueError, match=r"input_activations\.symmetric=False"):
        QuantScheme(weights=W4G128, input_activations=QuantArgs(num_bits=8, strategy="tensor"))


def test_weight_only_per_channel_when_the_group_spans_the_input():
    scheme = QuantScheme.weight_only(num_bits=4, group_size=64, in_features=64, symmetric=False)
    assert scheme.weights.strategy == "channel" and scheme.weights.group_size is None


def test_malformed_dict_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="unknown quantization args"):
        QuantScheme.from_dict({"weights": {"num_bits": 4, "strategy": "channel", "bits": 4}})
