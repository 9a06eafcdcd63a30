"""Tiny Shakespeare: the text, its download, its checksum, and TFDS's 90/5/5 character split."""

from __future__ import annotations

import hashlib
import threading
import urllib.request
from pathlib import Path

from lightjax.runtime.files import write_atomic

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


def download(url: str, dest: Path, timeout_s: float = 10.0) -> Path:
    """Fetch `url` (the Tiny Shakespeare text, or a mirror of it) into `dest` once, whole or not at all.

    One attempt with an overall deadline (name lookup included, which socket timeouts do not bound):
    without network, a ConnectionError after `timeout_s` at most, naming the offline alternative."""
    if dest.is_file():
        return dest
    result: dict[str, object] = {}

    def fetch() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                result["data"] = response.read()
        except Exception as e:  # noqa: BLE001 (reported below, in one line)
            result["error"] = e

    worker = threading.Thread(target=fetch, daemon=True)  # daemon: a stuck name lookup cannot hold the exit
    worker.start()
    worker.join(timeout_s)
    if "data" not in result:
        error = result.get("error")
        reason = f"{type(error).__name__}: {getattr(error, 'reason', error)}" if error else "no answer"
        reason += f" within {timeout_s:.0f} s" if not error else ""
        raise ConnectionError(f"Cannot download Tiny Shakespeare from {url} ({reason}). Without network, point "
                              "--config.data.local_path at a copy of its input.txt.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, result["data"])
    return dest
