"""
A small HTTP file server on 127.0.0.1 that misbehaves on purpose, for testing downloaders.

    with FlakyFileServer({"a.bin": data}, faults={"a.bin": ["drop", "500"]}) as server:
        url = server.url + "/a.bin"   # 1st request: connection dropped mid-file, 2nd: HTTP 500, then fine
        ...
        server.requests  # [(name, range_header_or_None, status), ...]

Each request for a file takes the next fault from its list (none left: behave):
  "drop"          send the headers of the full answer, half the body, then close the connection
  "truncate"      a complete, well-formed 200 answer whose body is the first 60% of the file
  "500"           HTTP 500
  "ignore_range"  answer a Range request with 200 and the whole file (as some servers do)
Range requests are honoured with 206 + Content-Range unless the fault says otherwise.
"""

import http.server
import re
import socket
import threading


class FlakyFileServer:
    def __init__(self, files, faults=None):
        self.files = dict(files)
        self.faults = {name: list(f) for name, f in (faults or {}).items()}
        self.requests = []
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._make_handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def requests_for(self, name):
        with self.lock:
            return [r for r in self.requests if r[0] == name]

    def _next_fault(self, name):
        with self.lock:
            pending = self.faults.get(name)
            return pending.pop(0) if pending else None

    def _log(self, name, range_header, status):
        with self.lock:
            self.requests.append((name, range_header, status))

    def _make_handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                range_header = self.headers.get("Range")
                data = server.files.get(name)
                if data is None:
                    server._log(name, range_header, 404)
                    return self._send(404, b"not found")
                fault = server._next_fault(name)
                if fault == "500":
                    server._log(name, range_header, 500)
                    return self._send(500, b"oops")
                if fault == "truncate":
                    server._log(name, range_header, 200)
                    return self._send(200, data[: int(len(data) * 0.6)])
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and fault != "ignore_range":
                    start = int(match.group(1))
                    if start >= len(data):
                        server._log(name, range_header, 416)
                        return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                status = 206 if start else 200
                server._log(name, range_header, status)
                body = data[start:]
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
                headers["Accept-Ranges"] = "bytes"
                if fault == "drop":
                    self._send_headers(status, len(body), headers)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(status, body, headers)

            def _send_headers(self, status, length, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def _send(self, status, body, headers=None):
                self._send_headers(status, len(body), headers)
                self.wfile.write(body)

        return Handler
