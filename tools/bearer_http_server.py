#!/usr/bin/env python3
"""An HTTP server that serves the files of a folder only to a bearer token.

For the tests of authenticated fetching (tests/pipeline.rs, `http_auth_*`), and to try
`[[fetch.http_auth]]` by hand:

    BEARER_TOKEN=s3cret python3 tools/bearer_http_server.py --root data/fashion-mnist --port 8111

The token comes from the environment (BEARER_TOKEN), not the command line, where `ps` would show
it. Answers: 401 without a valid `Authorization: Bearer <token>`; 403 for any path under
/forbidden/ even with it; 404 for a missing file; otherwise the file. `GET /_peak` (no token
needed) answers the largest number of requests that were ever in progress at once, so a test can
check a client's per-host concurrency limit; `--delay-ms` holds each file response that long to
make concurrency visible. Prints `listening on <port>` once it accepts connections.
"""

import argparse
import hmac
import http.server
import os
import sys
import threading
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder whose files are served")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=int, default=0, help="hold each file response this long")
    args = parser.parse_args()
    token = os.environ.get("BEARER_TOKEN", "")
    if not token:
        sys.exit("set BEARER_TOKEN to the token clients must send")
    root = os.path.realpath(args.root)
    expected = f"Bearer {token}".encode()
    lock = threading.Lock()
    state = {"active": 0, "peak": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass  # request lines only would be harmless, but the tests read nothing from here

        def reply(self, status, body, content_type="text/plain"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="images"')
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/_peak":
                return self.reply(200, str(state["peak"]).encode())
            sent = self.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(sent, expected):
                return self.reply(401, b"a bearer token is required\n")
            if self.path.startswith("/forbidden/"):
                return self.reply(403, b"this token may not read this\n")
            with lock:
                state["active"] += 1
                state["peak"] = max(state["peak"], state["active"])
            try:
                time.sleep(args.delay_ms / 1000)
                path = os.path.realpath(os.path.join(root, self.path.split("?")[0].lstrip("/")))
                if not path.startswith(root + os.sep) or not os.path.isfile(path):
                    return self.reply(404, b"no such file\n")
                with open(path, "rb") as f:
                    self.reply(200, f.read(), "application/octet-stream")
            finally:
                with lock:
                    state["active"] -= 1

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
