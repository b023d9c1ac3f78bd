"""A TCP forwarder on loopback that cuts connections on demand: network faults between a real
client and a real server (the S3 store), with nothing mocked on either side."""

from __future__ import annotations

import socket
import struct
import threading

from builder.serve.ports import free_port


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)   # wakes the other pump's recv; else close() would wait for it
    except OSError:
        pass
    sock.close()


class ResettingProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>. While `cut_after` is set, each connection is reset
    once that many bytes have crossed it in the `direction` ("down": server to client, "up":
    client to server); connections opened or flowing while it is None pass everything.

    `trip_on`: once a request containing these bytes has been answered with a 200 by the server,
    that answer and every response from then on are cut: the server did the work, the client never
    hears of it. (A "100 Continue" interim answer still passes, so the request body gets sent.)
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.cut_after: int | None = None
        self.direction = "down"
        self.resets = 0
        self.trip_on: bytes | None = None
        self.tripped = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            done, armed = threading.Event(), threading.Event()
            threading.Thread(target=self._pump, args=(client, server, "up", done, armed), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down", done, armed), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, done: threading.Event,
              armed: threading.Event) -> None:
        passed = 0
        try:
            while not done.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if direction == "down" and armed.is_set() and b" 200 " in data:
                    self.direction, self.cut_after = "down", 0
                    self.tripped.set()
                limit = self.cut_after if direction == self.direction else None
                if limit is not None and passed + len(data) > limit:
                    dst.sendall(data[:max(0, limit - passed)])
                    with self._lock:
                        self.resets += 1
                    break
                dst.sendall(data)
                passed += len(data)
                if direction == "up" and self.trip_on and self.trip_on in data:
                    armed.set()
        except OSError:
            pass
        if not done.is_set():
            done.set()
            _reset(src)
            _reset(dst)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
