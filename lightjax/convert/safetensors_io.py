"""Read and write safetensors files with numpy, with no torch and no `safetensors` package needed.

The format is small: an 8-byte little-endian header length, a JSON header mapping each tensor name
to its dtype, shape and byte range, then the raw bytes. bfloat16 comes back as `ml_dtypes.bfloat16`
(a dependency of jax), which numpy alone cannot represent.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, memory-mapped (copied only when converted)."""
    path = Path(path)
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not one of {sorted(_DTYPES)}.")
        begin, end = info["data_offsets"]
        tensors[name] = data[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """One .safetensors file (as `safetensors.numpy.save_file` writes it: tensors in name order, each
    8-byte aligned), written to a temporary name first so that an interrupted write leaves no file."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset, blobs = 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in names:
            raise ValueError(f"Tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold.")
        blob = array.tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)
