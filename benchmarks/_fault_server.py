"""A backend that misbehaves one way, in its own process (so that its Python work does not
share the measured process's GIL): ``python _fault_server.py PORT FAULT``.

Faults: ``ok``, ``503``, ``503-retry-after`` (``Retry-After: 1``), ``500``, ``429``,
``reset`` (the connection is accepted, then reset), ``hang`` (accepted, never answered).
The workspace lookup (``GET``) answers normally unless the fault is at the socket level.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STATUS = {"ok": 200, "503": 503, "503-retry-after": 503, "500": 500, "429": 429}


def serve(port: int, fault: str) -> None:
    if fault in ("reset", "hang"):
        _serve_socket(port, fault)
        return
    status = STATUS[fault]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._reply(200, json.dumps({"workspace": "bench"}).encode())

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._reply(status, b"{}" if status == 200 else b'{"detail": "unavailable"}')

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            if fault == "503-retry-after" and code != 200:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


def _serve_socket(port: int, fault: str) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    held: list[socket.socket] = []
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if fault == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            threading.Timer(0.001, conn.close).start()
        else:
            held.append(conn)  # never answered, never closed


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
