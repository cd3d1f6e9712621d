"""Real servers on 127.0.0.1 for the remote-store tests and the loader benchmark.

- :class:`S3Server`: moto's ``ThreadedMotoServer`` (an S3 API) with a public-read bucket
  that holds copies of local Zarr stores (uploaded file by file with boto3).
- :class:`LatencyServer`: a threaded HTTP server over a local directory (or a proxy in
  front of another server, e.g. moto's) that waits ``latency_s`` before answering each
  request, and records every request (its path, client's User-Agent, when it arrived and
  when it was answered), so a test can count how many were in flight at once and who asked.
  ``fail`` set to True makes it answer 503 (a transient outage) until it is set back.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

PUBLIC_READ = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": ["arn:aws:s3:::{b}", "arn:aws:s3:::{b}/*"]}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1; ``endpoint`` is its URL. Stop it with :meth:`stop`."""

    def __init__(self, port: int | None = None) -> None:
        from moto.server import ThreadedMotoServer

        self.port = port or free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")

    def public_bucket(self, bucket: str) -> None:
        """Create ``bucket`` readable (GET and list) by anyone, unsigned requests included."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        policy = json.loads(json.dumps(PUBLIC_READ).replace("{b}", bucket))
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def upload(self, local_dir: str, bucket: str, prefix: str) -> str:
        """Copy the directory ``local_dir`` (a Zarr store) to ``s3://bucket/prefix``; returns that URL."""
        client = self.client()
        for root, _, names in os.walk(local_dir):
            for name in names:
                path = os.path.join(root, name)
                key = f"{prefix}/{os.path.relpath(path, local_dir)}".replace(os.sep, "/")
                with open(path, "rb") as fh:
                    client.put_object(Bucket=bucket, Key=key, Body=fh.read())
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        self._server.stop()


class LatencyServer:
    """Serves ``root`` over HTTP on 127.0.0.1 (or forwards to ``upstream``, a URL), ``latency_s``
    late per request.

    ``requests``: ``(path, arrived, answered)`` per request (``time.perf_counter``), in
    the order they were answered; ``agents``: the User-Agent of each, in the same order.
    ``max_in_flight()``: the most requests open at once.
    """

    def __init__(self, root: str | None = None, latency_s: float = 0.05, upstream: str | None = None) -> None:
        self.root, self.latency_s, self.upstream = root, latency_s, upstream
        self.fail = False
        self.requests: list[tuple[str, float, float]] = []
        self.agents: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=server.root or ".", **kwargs)

            def _delayed(self, answer):
                arrived = time.perf_counter()
                time.sleep(server.latency_s)
                try:
                    if server.fail:
                        self.send_error(503, "injected outage")
                    elif server.upstream:
                        self._forward()
                    else:
                        answer()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on it (a cancelled read-ahead)
                    pass
                with server._lock:
                    server.requests.append((self.path, arrived, time.perf_counter()))
                    server.agents.append(self.headers.get("User-Agent", ""))

            def _forward(self):
                import http.client
                from urllib.parse import urlsplit

                target = urlsplit(server.upstream)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._delayed(self._send_file)

            def _send_file(self):
                """The file, or the byte range the Range header asks for (206), sent with sendfile."""
                path = self.translate_path(self.path.split("?")[0])
                try:
                    fh = open(path, "rb")
                except OSError:
                    self.send_error(404, "not found")
                    return
                with fh:
                    size = os.fstat(fh.fileno()).st_size
                    start, end = 0, size - 1
                    ranged = self.headers.get("Range", "").startswith("bytes=")
                    if ranged:
                        first, _, last = self.headers["Range"][6:].partition("-")
                        start = int(first) if first else max(size - int(last), 0)
                        end = min(int(last), size - 1) if first and last else size - 1
                    self.send_response(206 if ranged else 200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(end - start + 1))
                    if ranged:
                        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()
                    if end >= start:
                        self.connection.sendfile(fh, start, end - start + 1)

            def do_HEAD(self):  # noqa: N802
                self._delayed(super().do_HEAD)

            protocol_version = "HTTP/1.1"  # keep-alive: a reused connection per client thread

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # the default 5 drops a burst of connections (1 s SYN retries)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="latency-server", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.requests, self.agents = [], []

    def chunk_requests(self, agent: str | None = None) -> list[tuple[str, float, float]]:
        """The requests for chunks (not metadata: .zarray, .zattrs, .zgroup, .zmetadata, zarr.json,
        nor listings), of clients whose User-Agent starts with ``agent`` (None: all)."""
        meta = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")
        with self._lock:
            return [r for r, a in zip(self.requests, self.agents)
                    if not r[0].rstrip("/").endswith(meta) and "?" not in r[0] and (agent is None or a.startswith(agent))]

    def max_in_flight(self, requests: list[tuple[str, float, float]] | None = None) -> int:
        """The most of ``requests`` (default: all) that were open at one moment."""
        with self._lock:
            requests = list(self.requests if requests is None else requests)
        events = sorted([(a, 1) for _, a, _ in requests] + [(b, -1) for _, _, b in requests])
        open_, most = 0, 0
        for _, change in events:
            open_ += change
            most = max(most, open_)
        return most

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


if __name__ == "__main__":  # python -m tests.servers DIR LATENCY_S: serve DIR until killed (the benchmark's server)
    import sys

    server = LatencyServer(sys.argv[1], float(sys.argv[2]))
    print(server.url, flush=True)
    threading.Event().wait()
