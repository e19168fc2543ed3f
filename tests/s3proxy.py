"""A recording proxy in front of the test S3 server: every request a job makes, as the IAM action it needs.

A job pointed at it (``AWS_ENDPOINT_URL``) talks to the real server through it unchanged (the signature
covers the ``Host`` header, which is passed on as sent); the proxy notes each request's method, bucket, key
and query, and for a multi-object delete the keys in its body. :func:`iam_requests` turns those into
``(action, resource ARN, list prefix)`` the way AWS authorises them, so a test can check an IAM policy
against what the code really does rather than against what it is thought to do.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from ports import free_port


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raw = b""
            while True:  # pass chunks on as sent (aws-chunked payloads carry signatures per chunk)
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while (trailer := self.rfile.readline()) not in (b"\r\n", b""):
                        raw += trailer
                    return raw + b"\r\n"
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _proxy(self) -> None:
        body = self._body()
        self.server.requests.append((self.command, self.path, body if "delete" in self.path else b""))
        head = f"{self.command} {self.path} HTTP/1.1\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items() if k.lower() != "connection")
        with socket.create_connection(("127.0.0.1", self.server.upstream)) as up:
            up.sendall((head + "Connection: close\r\n\r\n").encode("latin-1") + body)
            resp = http.client.HTTPResponse(up, method=self.command)
            resp.begin()
            data = resp.read()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy


class RecordingProxy:
    """``with RecordingProxy(upstream_port) as p:`` point ``AWS_ENDPOINT_URL`` at ``p.endpoint``."""

    def __init__(self, upstream: int):
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
        self.server.daemon_threads = True
        self.server.upstream = upstream
        self.server.requests = []
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests(self) -> list[tuple[str, str, bytes]]:
        return list(self.server.requests)

    def __enter__(self) -> RecordingProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def iam_requests(requests: list[tuple[str, str, bytes]]) -> set[tuple[str, str, str | None]]:
    """``(action, resource ARN, s3:prefix or None)`` for each recorded path-style request, as IAM sees it."""
    out: set[tuple[str, str, str | None]] = set()
    for method, target, body in requests:
        url = urlsplit(target)
        query = parse_qs(url.query, keep_blank_values=True)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        obj = f"arn:aws:s3:::{bucket}/{key}"
        if not key:
            if method == "POST" and "delete" in query:  # DeleteObjects: s3:DeleteObject on every key
                for k in re.findall(rb"<Key>(.*?)</Key>", body):
                    out.add(("s3:DeleteObject", f"arn:aws:s3:::{bucket}/{k.decode()}", None))
            elif method == "GET" and "uploads" in query:
                out.add(("s3:ListBucketMultipartUploads", f"arn:aws:s3:::{bucket}", None))
            elif method in ("GET", "HEAD"):  # ListObjects(V2), HeadBucket
                out.add(("s3:ListBucket", f"arn:aws:s3:::{bucket}", query.get("prefix", [""])[0]))
            else:
                out.add((f"bucket {method}", f"arn:aws:s3:::{bucket}", None))
        elif method == "DELETE":
            out.add(("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject", obj, None))
        elif method in ("PUT", "POST"):  # PutObject, Create/UploadPart/CompleteMultipartUpload
            out.add(("s3:PutObject", obj, None))
        elif method == "GET" and "uploadId" in query:
            out.add(("s3:ListMultipartUploadParts", obj, None))
        else:  # GetObject, HeadObject
            out.add(("s3:GetObject", obj, None))
    return out
