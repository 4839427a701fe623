"""A minimal OTLP/HTTP receiver for tests and benchmarks: answers every export with 200, counts
what came, and (decode=True) keeps each request decoded with opentelemetry-proto."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OtlpReceiver:
    def __init__(self, decode: bool = True):
        self.metrics, self.traces = [], []
        self.posts: dict[str, int] = {}
        self.bytes = 0
        rx = self
        if decode:
            from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import \
                ExportMetricsServiceRequest
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import \
                ExportTraceServiceRequest
            kinds = {"/v1/metrics": (ExportMetricsServiceRequest, self.metrics),
                     "/v1/traces": (ExportTraceServiceRequest, self.traces)}

        # HTTP/1.0: a connection per export, so a closed receiver is closed for its clients
        # (a keep-alive handler thread would go on answering after close())
        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path not in ("/v1/metrics", "/v1/traces"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rx.posts[self.path] = rx.posts.get(self.path, 0) + 1
                rx.bytes += len(body)
                if decode:
                    cls, into = kinds[self.path]
                    msg = cls()
                    msg.ParseFromString(body)
                    into.append(msg)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        return [s for req in self.traces for rs in req.resource_spans for ss in rs.scope_spans
                for s in ss.spans]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
