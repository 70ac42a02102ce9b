"""A stdlib-only client of the node agent (HTTP/1.1 + JSON on a unix socket).

No third-party HTTP library on purpose: the package is copied into arbitrary
images and must not clash with (or require) the application's packages.
A fresh connection per request keeps the client trivially thread-safe; the
agent measures a full request at ~0.2 ms, far below a generate call.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import select
import socket
import time

from . import _log
from .exceptions import AgentError, AgentUnavailable


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("rm-agent", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def _wait_for_continue(sock, timeout):
    """After headers with `Expect: 100-continue`: True when the agent asks
    for the body (`100 Continue`, consumed here) or says nothing within
    `timeout` (RFC 9110: send it then); False when its final answer came
    first (left unread for `getresponse`)."""
    # poll, not select: select fails on descriptors past 1023, common in
    # processes that load large models.
    p = select.poll()
    p.register(sock, select.POLLIN)
    if not p.poll(None if timeout is None else int(timeout * 1000)):
        return True
    head = b""
    while len(head) < 12:
        # A status line may arrive in pieces: wait for the rest of a prefix
        # of "HTTP/1.x 100" before deciding.
        head = sock.recv(12, socket.MSG_PEEK)
        if not head or not (b"HTTP/1.1 100"[:len(head)] == head or b"HTTP/1.0 100"[:len(head)] == head):
            return False
        if len(head) < 12:
            time.sleep(0.005)
    # Consume the interim response (status line and empty header block).
    buf = b""
    while not buf.endswith(b"\r\n\r\n"):
        b = sock.recv(1)
        if not b:
            break
        buf += b
    return True


def _error_from(status, body):
    try:
        e = json.loads(body)["error"]
        msg, code = e.get("message", ""), e.get("code")
    except Exception:
        msg, code = body.decode("utf-8", "replace")[:500] or "no message", None
    cls = AgentUnavailable if status in (502, 503, 504) else AgentError
    return cls(status, msg, code)


class AgentClient:
    # Compiles can take hours on NPUs (the agent's worker limit is 4 h); the
    # socket timeout only guards against a hung agent between progress lines.
    def __init__(self, socket_path, token=None, timeout=600.0):
        self.socket_path = socket_path
        self.token = token
        self.timeout = timeout

    # -- transport ---------------------------------------------------------
    def _headers(self, extra=None):
        h = {"Host": "rm-agent"}
        if self.token:
            h["Authorization"] = "Bearer " + self.token
        if extra:
            h.update(extra)
        return h

    def _open(self, method, path, body=None, headers=None):
        h = self._headers(headers)
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise AgentUnavailable(None, self._why(e)) from None

    def _why(self, e):
        if isinstance(e, FileNotFoundError) or not os.path.exists(self.socket_path):
            return "no agent socket at %s (is rm-agent running on this node and its directory mounted?)" % self.socket_path
        if isinstance(e, PermissionError):
            return "agent socket %s is not accessible (permission denied: run as a member of its group or fix the mount)" % self.socket_path
        if isinstance(e, ConnectionRefusedError):
            return "agent socket %s refuses connections (stale socket: is rm-agent running?)" % self.socket_path
        return "cannot talk to the agent at %s: %s" % (self.socket_path, e)

    def request(self, method, path, body=None, headers=None):
        """One request; returns the decoded JSON (or None for empty bodies)."""
        conn, r = self._open(method, path, body, headers)
        try:
            data = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise AgentUnavailable(None, self._why(e)) from None
        finally:
            conn.close()
        if r.status >= 400:
            raise _error_from(r.status, data)
        return json.loads(data) if data else None

    def stream(self, path, body):
        """POST with "stream": true; yields each NDJSON event until done/error."""
        conn, r = self._open("POST", path, dict(body, stream=True))
        try:
            if r.status >= 400:
                raise _error_from(r.status, r.read())
            while True:
                line = r.readline()  # http.client undoes the chunked encoding
                if not line:
                    raise AgentUnavailable(None, "the agent closed the stream before it finished")
                if not line.strip():
                    continue
                ev = json.loads(line)
                if ev.get("event") == "error":
                    raise _error_from(ev.get("status", 500), json.dumps({"error": ev}).encode())
                yield ev
                if ev.get("event") == "done":
                    return
        except (OSError, http.client.HTTPException) as e:
            raise AgentUnavailable(None, self._why(e)) from None
        finally:
            conn.close()

    # -- API ---------------------------------------------------------------
    def health(self):
        return self.request("GET", "/healthz")

    def backends(self):
        return self.request("GET", "/v1/backends")["backends"]

    def register_path(self, path):
        return self.request("POST", "/v1/models", {"source": {"path": path}})

    def register_hub(self, model_id, revision=None):
        src = {"hub": model_id}
        if revision:
            src["revision"] = revision
        return self.request("POST", "/v1/models", {"source": src})

    def register_files(self, files):
        """files: [(relative name, absolute path)]. Uploads only missing blobs."""
        listing, missing = [], []
        for rel, path in files:
            digest = file_sha256(path)
            listing.append({"path": rel, "sha256": digest})
            if not self._has_blob(digest):
                missing.append((digest, path))
        if missing:
            size = sum(os.path.getsize(p) for _, p in missing)
            _log.info("uploading %d file(s), %.1f MiB, to the agent (once per node)" % (len(missing), size / 2**20))
        for digest, path in missing:
            self._put_blob(digest, path)
        return self.request("POST", "/v1/models", {"source": {"files": listing}})

    def _has_blob(self, digest):
        conn, r = self._open("HEAD", "/v1/blobs/" + digest)
        try:
            r.read()
        finally:
            conn.close()
        if r.status == 200:
            return True
        if r.status == 404:
            return False
        raise _error_from(r.status, b"")

    def _put_blob(self, digest, path):
        """PUT one file with `Expect: 100-continue`: the agent refuses an
        upload that cannot fit (size, quota, disk) from its headers, before a
        byte of the body is sent. Sending the body anyway would have the
        agent close a socket with unread data, which resets the connection
        and loses its answer; the client would say "cannot talk to the
        agent" instead of what to fix."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            conn = _UnixHTTPConnection(self.socket_path, self.timeout)
            try:
                conn.putrequest("PUT", "/v1/blobs/" + digest, skip_host=True)
                headers = self._headers({"Content-Length": str(size), "Expect": "100-continue",
                                         "Content-Type": "application/octet-stream"})
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders()
                if _wait_for_continue(conn.sock, timeout=30.0 if self.timeout is None else min(self.timeout, 30.0)):
                    # http.client streams a file object in blocks: no copy in
                    # memory.
                    conn.send(f)
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as e:
                raise AgentUnavailable(None, self._why(e)) from None
            finally:
                conn.close()
        if r.status >= 400:
            raise _error_from(r.status, data)

    def prepare(self, model, device, options, progress=None):
        """Compiles or finds the artifact; progress(fraction, stage) while compiling."""
        body = {"model": model, "device": device, "options": options or {}}
        if progress is None:
            return self.request("POST", "/v1/prepare", body)
        for ev in self.stream("/v1/prepare", body):
            if ev.get("event") == "progress":
                progress(ev.get("fraction"), ev.get("stage"))
            elif ev.get("event") == "done":
                return ev
        raise AgentUnavailable(None, "prepare stream ended without a result")

    def generate(self, body, on_token=None):
        if on_token is None:
            return self.request("POST", "/v1/generate", body)
        for ev in self.stream("/v1/generate", body):
            if ev.get("event") == "token":
                on_token(ev)
            elif ev.get("event") == "done":
                return ev
        raise AgentUnavailable(None, "generate stream ended without a result")


# File hashes are memoised per process by (path, size, mtime, inode), like the
# agent does, so loading the same directory twice reads it once.
_hash_memo = {}


def file_sha256(path):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _hash_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]
