"""Tiny Shakespeare: the text, its checksum, and TFDS's 90/5/5 character split."""

from __future__ import annotations

import hashlib
from pathlib import Path

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
NUM_CHARS = 1_115_394


def read_verified(path: str | Path) -> str:
    """The text of a local input.txt, after checking it is the expected file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config.data.local_path={str(path)!r} does not exist (expected Tiny "
                                f"Shakespeare's input.txt, {NUM_CHARS:,} characters).")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{path} has sha256 {digest}, not Tiny Shakespeare's {SHA256}.")
    return data.decode("utf-8")


def split(text: str) -> dict[str, str]:
    """TFDS's split by characters: train the first 90%, validation the next 5%, test the last 5%."""
    n = len(text)
    train_end = int(0.9 * n)
    val_end = train_end + (n - train_end) // 2
    return {"train": text[:train_end], "validation": text[train_end:val_end], "test": text[val_end:]}
