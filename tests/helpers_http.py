"""
Local HTTP servers on 127.0.0.1 for testing downloaders: FlakyFileServer (plain files, misbehaving on
purpose) and HubMirror (a Hugging Face hub look-alike for HF_ENDPOINT, see its docstring).

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


class HubMirror:
    """A Hugging Face hub look-alike on 127.0.0.1 for HF_ENDPOINT: dataset repos answered the way
    huggingface_hub asks for them, plus plain files (for plain-URL sources such as the CORE bundle).

        with HubMirror({"owner/name": {"dir/file.parquet": data}}, files={"eval_bundle.zip": zip_bytes}) as hub:
            env["HF_ENDPOINT"] = hub.url                 # hf_hub_download / snapshot_download go here
            url = hub.url + "/files/eval_bundle.zip"     # a plain URL

    Endpoints (any revision name resolves to the repo's one commit):
      GET  /api/datasets/<repo>[/revision/<rev>]             repo info: {"id", "sha", "siblings": [{"rfilename"}]}
      GET  /api/datasets/<repo>/tree/<rev>[/<dir>]            [{"type": "file", "path", "size", "oid"}] (recursive)
      HEAD|GET /datasets/<repo>/resolve/<rev>/<path>          the file; X-Repo-Commit, ETag, Content-Length, Range
      GET  /files/<name>                                      a plain file, Range honoured
    Unknown repos/files are 404 with the hub's X-Error-Code (RepoNotFound / EntryNotFound).
    `requests` lists (method, path, status) of everything asked."""

    def __init__(self, repos, files=None):
        import hashlib
        self.repos = {repo: dict(contents) for repo, contents in repos.items()}
        self.files = dict(files or {})
        self.sha = {repo: hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in c.items())).encode())
                    .hexdigest() for repo, c in self.repos.items()}
        self.etag = {(repo, path): hashlib.sha256(data).hexdigest()
                     for repo, c in self.repos.items() for path, data in c.items()}
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

    def _split_repo(self, rest):
        """'owner/name/more/parts' -> ('owner/name', 'more/parts') for a known repo, else (None, None)."""
        parts = rest.split("/")
        repo = "/".join(parts[:2])
        return (repo, "/".join(parts[2:])) if repo in self.repos else (None, None)

    def _make_handler(self):
        import json
        import urllib.parse
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

            def _route(self, head):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                status = self._answer(path, head)
                with server.lock:
                    server.requests.append((self.command, path, status))

            def _answer(self, path, head):
                if path.startswith("/files/"):
                    data = server.files.get(path[len("/files/"):])
                    return self._file(data, head, {}) if data is not None else self._error(404, "EntryNotFound")
                if path.startswith("/api/datasets/"):
                    repo, rest = server._split_repo(path[len("/api/datasets/"):])
                    if repo is None:
                        return self._error(404, "RepoNotFound")
                    sha = server.sha[repo]
                    if rest == "" or rest.startswith("revision/"):
                        info = {"id": repo, "sha": sha, "private": False, "disabled": False, "gated": False,
                                "siblings": [{"rfilename": p} for p in sorted(server.repos[repo])]}
                        return self._json(info, head)
                    if rest.startswith("tree/"):
                        prefix = "/".join(rest.split("/")[2:])
                        entries = [{"type": "file", "path": p, "size": len(d), "oid": server.etag[(repo, p)][:40]}
                                   for p, d in sorted(server.repos[repo].items())
                                   if not prefix or p.startswith(prefix.rstrip("/") + "/")]
                        return self._json(entries, head)
                    return self._error(404, None)
                if path.startswith("/datasets/"):
                    repo, rest = server._split_repo(path[len("/datasets/"):])
                    if repo is None:
                        return self._error(404, "RepoNotFound")
                    parts = rest.split("/")
                    if len(parts) < 3 or parts[0] != "resolve":
                        return self._error(404, None)
                    name = "/".join(parts[2:])
                    data = server.repos[repo].get(name)
                    headers = {"X-Repo-Commit": server.sha[repo]}
                    if data is None:
                        return self._error(404, "EntryNotFound", headers)
                    headers["ETag"] = f'"{server.etag[(repo, name)]}"'
                    return self._file(data, head, headers)
                return self._error(404, None)

            def _file(self, data, head, headers):
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and not head:
                    start = int(match.group(1))
                    if start >= len(data):
                        return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                    headers = dict(headers, **{"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                headers = dict(headers, **{"Accept-Ranges": "bytes"})
                return self._send(206 if start else 200, data[start:], headers, head)

            def _json(self, obj, head):
                return self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

            def _error(self, status, code, headers=None):
                headers = dict(headers or {})
                if code:
                    headers["X-Error-Code"] = code
                return self._send(status, json.dumps({"error": code or "not found"}).encode(), headers,
                                  self.command == "HEAD")

            def _send(self, status, body, headers, head):
                self.send_response(status)
                headers = dict(headers)
                headers.setdefault("Content-Type", "application/octet-stream")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return status

        return Handler
