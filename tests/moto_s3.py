"""A real S3 API for the object-storage tests: moto's threaded server on loopback (importable as ``moto_s3``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1 and yield its endpoint URL (``http://127.0.0.1:PORT``); stop it on exit.

    The server binds port 0 itself and reports the port the OS gave it. A port found free beforehand (bind, read,
    close, then start the server on it) can be taken in between by anything else on the machine -- with two test
    processes, the other one's Dask cluster -- and the server would then fail to start."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
