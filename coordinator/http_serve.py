"""A small HTTP server for the status page and the metrics endpoint whose cost is bounded by its settings,
not by its clients.

    server = BoundedHTTPServer(("127.0.0.1", 0), SomeHandler, threads=8, idle_timeout_s=10)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ...
    server.shutdown(); server.server_close()

The standard library's ThreadingHTTPServer starts one thread per connection and waits on it without a
timeout, so 150 idle connections hold 150 threads for as long as their clients like. Here:

* accepted connections wait in a selector, with no thread, until their request starts to arrive; one that
  sends nothing within `idle_timeout_s` is closed (its client reads EOF);
* a connection with data goes to a fixed pool of `threads` threads, which serve ONE request on it and close
  it (`Connection: close`; the page polls every few seconds, so keep-alive saves little). Its socket has a
  timeout of `idle_timeout_s`, so a client that starts a request and stalls holds a thread that long at most;
* at most `max_connections` wait at once: past it the longest-waiting one is closed first.

Handlers are ordinary BaseHTTPRequestHandler subclasses (prometheus_client's MetricsHandler included) that
close the connection after their answer (HTTP/1.0, or `close_connection = True`): a handler that kept it
alive would hold its thread until the socket timeout.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import HTTPServer

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 10.0     # an accepted connection that sends no request within this is closed
THREADS = 8               # requests served at once
MAX_CONNECTIONS = 256     # accepted connections waiting for their request, at most


class BoundedHTTPServer(HTTPServer):
    request_queue_size = 128   # the listen backlog (socketserver's 5 makes a burst of clients retry their SYNs)

    def __init__(self, addr, handler, threads: int = THREADS, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS):
        self.idle_timeout_s, self.max_connections = idle_timeout_s, max_connections
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="http")
        self._waiting: dict[socket.socket, tuple[object, float]] = {}   # conn -> (client address, accepted at)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._wake_r, self._wake_w = socket.socketpair()  # shutdown() wakes the selector through it
        if ":" in addr[0]:  # an IPv6 address, e.g. "::"
            self.address_family = socket.AF_INET6
        try:
            super().__init__(addr, handler)
        except BaseException:
            self._pool.shutdown(wait=False)
            self._wake_r.close()
            self._wake_w.close()
            raise

    # The selector loop replaces socketserver's serve_forever: the listening socket and every waiting
    # connection in one select(), a thread only for a connection whose request arrived.
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        sel = selectors.DefaultSelector()
        sel.register(self.socket, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(min(poll_interval, self.idle_timeout_s / 2)):
                    if key.data == "listen":
                        self._accept(sel)
                    elif key.data == "wake":
                        self._wake_r.recv(64)
                    else:
                        conn = key.fileobj
                        sel.unregister(conn)
                        addr, _ = self._waiting.pop(conn)
                        self._pool.submit(self._serve_one, conn, addr)
                self._close_idle(sel, time.monotonic() - self.idle_timeout_s)
        finally:
            for conn in list(self._waiting):
                sel.unregister(conn)
                conn.close()
            self._waiting.clear()
            sel.close()
            self._stopped.set()

    def _accept(self, sel) -> None:
        try:
            conn, addr = self.socket.accept()
        except OSError:  # the client gave up between select and accept
            return
        if len(self._waiting) >= self.max_connections:  # make room: the longest-waiting goes first
            oldest = min(self._waiting, key=lambda c: self._waiting[c][1])
            sel.unregister(oldest)
            del self._waiting[oldest]
            oldest.close()
        conn.setblocking(False)
        self._waiting[conn] = (addr, time.monotonic())
        sel.register(conn, selectors.EVENT_READ, "conn")

    def _close_idle(self, sel, before: float) -> None:
        for conn in [c for c, (_, at) in self._waiting.items() if at < before]:
            sel.unregister(conn)
            del self._waiting[conn]
            conn.close()

    def _serve_one(self, conn: socket.socket, addr) -> None:
        conn.setblocking(True)
        conn.settimeout(self.idle_timeout_s)  # a request that stalls half-way holds this thread this long at most
        try:
            self.RequestHandlerClass(conn, addr, self)
        except OSError:  # timed out or reset by the client: nothing to answer
            pass
        except Exception:
            log.exception("http: serving %s failed", addr)
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        self._stopped.wait()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

