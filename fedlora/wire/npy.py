"""Tensors as the ``.npy`` bytes of Flower's Arrays, many at a time (no Flower here: the records on
both sides, `clients.records` and `strategies.records`, wrap these fields in ``flwr.app.Array``).

A message carries one Array per tensor (a client's reply: A and B of every module, its probe
responses, its head), each in NumPy's ``.npy`` format. Flower converts them one by one with
``np.save`` and ``np.load``, which format and parse a header for every array, and moves each tensor
off its GPU with a synchronisation of its own: for a 0.4B Llama's reply, hundreds of arrays that
cost more than their bytes. Here they are made and read in the same format, faster:

- `npy_fields`: the tensors leave their device in one copy per dtype (`moved_together`); each
  array's header is made once per (dtype, shape) by ``np.save`` itself and reused;
- `npy_tensor`: each distinct header is parsed once (NumPy's own reader), the data length is
  checked against it, and the values are copied out of the bytes (other ``.npy`` bytes, Fortran
  order say, through ``np.load`` as Flower's ``Array.numpy`` reads them).
"""

from __future__ import annotations

import functools
import io
import math
import struct
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

NUMPY_STYPE = "numpy.ndarray"
"""Flower's serialisation type of an array in NumPy's format (``flwr.common.constant.SType``)."""
MAGIC = b"\x93NUMPY"
LENGTH_FORMATS = {1: "<H", 2: "<I", 3: "<I"}
"""The header length's struct format by major format version."""
MAX_HEADER_BYTES = 10_000
"""The longest header read through the cache: NumPy's own limit for ``np.load``
(``max_header_size``). A longer one, or one that claims more bytes than the array holds, is left to
``np.load`` (which refuses it), so that no sender can fill the cache with large keys."""


def moved_together(tensors: Mapping[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """The tensors on ``device``: those of one dtype and device moved in one copy (flattened into
    one buffer, then split into views), in the mapping's order; each copy between a GPU and the
    host costs a synchronisation, whatever its size."""
    device = torch.device(device)
    moved: dict[str, Tensor] = {}
    batches: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for key, tensor in tensors.items():
        if tensor.device == device:
            moved[key] = tensor.detach()
        else:
            batches.setdefault((tensor.dtype, tensor.device), []).append(key)
    for keys in batches.values():
        sources = [tensors[key].detach() for key in keys]
        if len(sources) == 1:
            moved[keys[0]] = sources[0].to(device)
            continue
        flat = torch.cat([source.reshape(-1) for source in sources]).to(device)
        pieces = flat.split([source.numel() for source in sources])
        moved.update(
            {key: piece.view(source.shape) for key, piece, source in zip(keys, pieces, sources)}
        )
    return {key: moved[key] for key in tensors}


ArrayFields = tuple[str, tuple[int, ...], str, bytes]
"""An Array's (dtype, shape, stype, data), in the order of ``flwr.app.Array``'s arguments."""


def npy_fields(tensors: Mapping[str, Tensor]) -> dict[str, ArrayFields]:
    """Each tensor's Array fields, as ``ArrayRecord(tensors)`` makes them (the same bytes where a
    tensor is C-contiguous; others are written in C order)."""
    on_host = moved_together(tensors, "cpu")
    return {key: array_fields(tensor.numpy()) for key, tensor in on_host.items()}


def array_fields(values: np.ndarray) -> ArrayFields:
    """The Array fields of ``values`` in NumPy's format, C order."""
    if not values.flags.c_contiguous:
        values = values.copy(order="C")
    data = npy_header(values.dtype.str, values.shape) + values.tobytes()
    return str(values.dtype), values.shape, NUMPY_STYPE, data


@functools.lru_cache(maxsize=4096)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of this dtype and shape (cut
    from what it writes for such an array, once per process)."""
    values = np.empty(shape, dtype=dtype)
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()[: buffer.tell() - values.nbytes]


def npy_tensor(key: str, stype: str, data: bytes) -> Tensor:
    """The tensor of an Array's fields (a writable copy), as ``Array.numpy`` reads it: a C-ordered
    ``.npy`` array through its cached header, any other ``.npy`` bytes through ``np.load``. Raises
    ValueError naming the array when its bytes are not an array or not what their header says,
    TypeError for another serialisation type."""
    if stype != NUMPY_STYPE:
        raise TypeError(f"array {key!r}: unsupported serialization type {stype!r}")
    layout = npy_layout(data[: header_end(data)])
    if layout is None:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    dtype, shape, end = layout
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(
            f"array {key!r}: {len(data) - end} bytes of data, its header says "
            f"{count * dtype.itemsize} ({dtype}, shape {shape})"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)
    return torch.from_numpy(values.copy())


def header_end(data: bytes) -> int:
    """Where an ``.npy`` header ends (0 when ``data`` does not start like one, or its header is
    longer than `MAX_HEADER_BYTES` or than ``data``)."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 2:
        return 0
    length_format = LENGTH_FORMATS.get(data[len(MAGIC)])
    start = len(MAGIC) + 2
    if length_format is None or len(data) < start + struct.calcsize(length_format):
        return 0
    (length,) = struct.unpack_from(length_format, data, start)
    end = start + struct.calcsize(length_format) + length
    return end if end <= min(len(data), MAX_HEADER_BYTES) else 0


@functools.lru_cache(maxsize=4096)
def npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, data offset) of a C-ordered array's ``.npy`` header, read by NumPy's own
    reader; None for anything else."""
    if not header:
        return None
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return None
    except ValueError:
        return None
    if fortran_order or dtype.hasobject or stream.tell() != len(header):
        return None
    return dtype, tuple(shape), len(header)
