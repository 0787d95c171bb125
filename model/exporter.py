"""A Prometheus endpoint for the trainer's rank 0, in the standard library.

model/ stays free of prometheus-client (it is also imported by the worker's executors, which have
their own registry): the trainer's figures are a handful of gauges, and the text exposition format
for gauges is a HELP line, a TYPE line and one sample line each. Scraped at /metrics:

    mujina_train_loss{run="dense",phase="pretrain"} 2.31
"""

from __future__ import annotations

import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GAUGES = {
    "step": "Optimizer steps done",
    "tokens_total": "Training tokens processed (all processes)",
    "loss": "Training loss of the last logged step",
    "eval_loss": "Held-out loss of the last evaluation",
    "grad_norm": "Global gradient norm before clipping, last logged step",
    "tokens_per_second": "Training tokens per second (all processes), last logging interval",
    "mfu": "Model FLOPs utilisation, 0..1, last logging interval",
    "lr": "Learning rate of the last step",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class TrainExporter:
    """Serves the latest value of each gauge (mujina_train_*) with labels `run` (the output directory's name)
    and `phase` (train.phase: pretrain, moe, sft...); update() replaces them."""

    def __init__(self, run: str, port: int, host: str = "0.0.0.0", phase: str = "pretrain"):
        self.run, self.phase = run, phase
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "see /metrics")
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds would flood the training log
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def update(self, **values: float) -> None:
        with self._lock:
            for k, v in values.items():
                if k in GAUGES and v is not None:
                    self._values[k] = float(v)

    def render(self) -> str:
        label = f'{{run="{_escape(self.run)}",phase="{_escape(self.phase)}"}}'
        lines = []
        with self._lock:
            for name, help_text in GAUGES.items():
                if name not in self._values:
                    continue
                v = self._values[name]
                text = "NaN" if math.isnan(v) else ("+Inf" if v == math.inf else "-Inf" if v == -math.inf else repr(v))
                lines += [f"# HELP mujina_train_{name} {help_text}", f"# TYPE mujina_train_{name} gauge",
                          f"mujina_train_{name}{label} {text}"]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
