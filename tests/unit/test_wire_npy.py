"""Tensors as the ``.npy`` bytes of Flower's Arrays, many at a time: the same bytes as Flower's own
conversion, read back exactly, hostile bytes refused with the array's name."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedlora.wire.npy import header_end, moved_together, npy_fields, npy_layout, npy_tensor

TENSORS = {
    "A": torch.randn(4, 32),
    "B": torch.randn(32, 4),
    "probe": torch.randn(32, 4, dtype=torch.float64),
    "scalar": torch.tensor(3.0),
    "empty": torch.zeros(0, 5),
    "steps": torch.arange(7),
    "mask": torch.tensor([True, False]),
}


def read(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: npy_tensor(key, array.stype, array.data) for key, array in record.items()}


def test_the_fields_are_the_bytes_flower_writes_and_read_back_exactly():
    ours = {key: Array(*fields) for key, fields in npy_fields(TENSORS).items()}
    flowers = ArrayRecord(TENSORS)
    assert list(ours) == list(TENSORS)
    for key, array in ours.items():
        theirs = flowers[key]
        assert (array.dtype, array.shape, array.stype, array.data) == (
            theirs.dtype,
            theirs.shape,
            theirs.stype,
            theirs.data,
        ), key
    back = read(ArrayRecord(ours))
    expected = flowers.to_torch_state_dict()
    assert all(
        torch.equal(back[k], expected[k]) and back[k].dtype == expected[k].dtype for k in back
    )


def test_a_strided_tensor_is_written_in_c_order_with_its_values():
    transposed = torch.randn(5, 3).T
    (fields,) = npy_fields({"t": transposed}).values()
    assert torch.equal(npy_tensor("t", fields[2], fields[3]), transposed)


def test_flowers_other_npy_bytes_are_read_as_flower_reads_them():
    fortran = np.asfortranarray(np.random.default_rng(0).standard_normal((3, 4)))
    array = Array(fortran)
    assert torch.equal(npy_tensor("f", array.stype, array.data), torch.from_numpy(array.numpy()))


def test_a_tensor_read_is_a_writable_copy():
    (fields,) = npy_fields({"A": TENSORS["A"]}).values()
    tensor = npy_tensor("A", fields[2], fields[3])
    tensor.zero_()
    assert torch.equal(npy_tensor("A", fields[2], fields[3]), TENSORS["A"])


def test_hostile_bytes_are_refused_naming_the_array():
    _, _, stype, data = npy_fields({"A": TENSORS["A"]})["A"]
    with pytest.raises(ValueError, match="array 'A': 496 bytes of data, its header says 512"):
        npy_tensor("A", stype, data[:-16])
    with pytest.raises(ValueError, match="array 'A'"):
        npy_tensor("A", stype, data + b"\0" * 4)
    with pytest.raises(ValueError):
        npy_tensor("A", stype, b"not an array at all")
    with pytest.raises(TypeError, match="array 'A': unsupported serialization type"):
        npy_tensor("A", "pickle", data)


def test_moved_together_keeps_order_shapes_and_values():
    moved = moved_together(TENSORS, "meta")
    assert list(moved) == list(TENSORS)
    assert all(t.device.type == "meta" for t in moved.values())
    assert all(moved[k].shape == t.shape and moved[k].dtype == t.dtype for k, t in TENSORS.items())
    back = moved_together({"A": TENSORS["A"], "B": TENSORS["B"].T}, "cpu")
    assert torch.equal(back["A"], TENSORS["A"]) and torch.equal(back["B"], TENSORS["B"].T)


def test_an_oversized_header_claim_is_not_cached_and_is_refused():
    _, _, stype, data = npy_fields({"A": TENSORS["A"]})["A"]
    claims_more = data[:8] + (len(data) + 1).to_bytes(2, "little") + data[10:]
    huge = b"\x93NUMPY\x02\x00" + (2**20).to_bytes(4, "little") + b" " * 2**20
    before = npy_layout.cache_info().currsize
    assert header_end(claims_more) == 0 and header_end(huge) == 0
    for bad in (claims_more, huge):
        with pytest.raises(ValueError):
            npy_tensor("A", stype, bad)
    assert npy_layout.cache_info().currsize == before
