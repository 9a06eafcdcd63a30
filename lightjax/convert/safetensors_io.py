"""Read and write safetensors files with numpy (no torch), through the `safetensors` package.

The package validates a file before reading anything from it (header length within the file, the
header a JSON object, known dtypes, byte ranges inside the data section, contiguous and matching
the shapes), so a damaged or hostile file is one ValueError naming it, never a huge allocation.
bfloat16 comes back as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lightjax.runtime.files import atomic_path


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file."""
    try:
        with safe_open(str(path), framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """One .safetensors file, written whole or not at all (runtime/files.atomic_path)."""
    arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    try:
        with atomic_path(path) as partial:
            save_file(arrays, str(partial), metadata=metadata or {"format": "pt"})
    except (SafetensorError, ValueError, TypeError) as e:
        raise ValueError(f"Cannot write {path}: {e}") from None
