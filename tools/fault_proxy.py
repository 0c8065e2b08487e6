#!/usr/bin/env python3
"""A reverse proxy that answers the first requests for each path with an error, then forwards.

Puts a real server's throttling in front of a real server for tests: S3 answers a client that
sends too much with `503 SlowDown`, and a well-behaved client backs off and retries. moto does
not throttle, so tests/s3.rs puts this in front of it:

    .venv/bin/python tools/fault_proxy.py http://127.0.0.1:9411 --fail-first 2

It listens on 127.0.0.1 (an ephemeral port unless --port), prints `listening on PORT` once ready,
and forwards every request unchanged (method, path, headers including Host and the signature,
body), so the upstream server checks signatures as if the client had called it directly. The
first --fail-first requests for each (method, path) get --status with an S3-style XML error body
(--code, default SlowDown) and a `Retry-After: 0` header instead. GET /__fault/stats answers
{"failed": N, "forwarded": M} as JSON.
"""
import argparse
import http.client
import http.server
import json
import sys
import threading
import urllib.parse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


def make_handler(upstream: urllib.parse.SplitResult, fail_first: int, status: int, code: str):
    lock = threading.Lock()
    seen: dict = {}
    stats = {"failed": 0, "forwarded": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: tests read stdout for the port only
            pass

        def _reply(self, status: int, body: bytes, headers: dict):
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path == "/__fault/stats":
                with lock:
                    answer = json.dumps(stats).encode()
                return self._reply(200, answer, {"Content-Type": "application/json"})
            key = (self.command, self.path.split("?")[0])
            with lock:
                seen[key] = seen.get(key, 0) + 1
                fail = seen[key] <= fail_first
                stats["failed" if fail else "forwarded"] += 1
            if fail:
                error = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>Please reduce your request rate.</Message><Resource>{key[1]}</Resource></Error>"
                ).encode()
                return self._reply(status, error, {"Content-Type": "application/xml", "Retry-After": "0"})
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port or 80, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            # send_response writes its own Server and Date.
            dropped = HOP_BY_HOP | {"content-length", "server", "date"}
            kept = {k: v for k, v in response.getheaders() if k.lower() not in dropped}
            connection.close()
            self._reply(response.status, data, kept)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", help="base URL of the real server, e.g. http://127.0.0.1:9411")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail-first", type=int, default=1, help="errors per (method, path) before forwarding")
    parser.add_argument("--status", type=int, default=503)
    parser.add_argument("--code", default="SlowDown")
    args = parser.parse_args()
    upstream = urllib.parse.urlsplit(args.upstream)
    handler = make_handler(upstream, args.fail_first, args.status, args.code)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
