"""A hostile mirror and a repository crafted with the real author verbs, shared by the tests of
fetching, verification, output and fuzzing (their fixtures are in conftest.py)."""

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time

from conftest import Author, error_line

HEAD, SIG, JOURNAL = "/branches/web/head", "/branches/web/head.sig", "/branches/web/journal"
SLOW = ("--timeout", "1", "--deadline", "3", "--retries", "1")
HTML_ERROR = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>\n"
REASONS = {200: "OK", 206: "Partial Content", 302: "Found", 304: "Not Modified", 404: "Not Found",
           416: "Range Not Satisfiable", 500: "Internal Server Error", 503: "Service Unavailable"}
TRICKLE_FOR = 20     # seconds a trickle may last at most, so its thread always ends
RUN_TIMEOUT = 30     # no run should come near this; a hang fails instead of blocking the suite


class HostileMirror(object):
    """A threaded static server for a repository directory that misbehaves on request.

    behave[path] = name or (name, arg): how to answer that path (see _serve).
    replace[path] = bytes served as that file instead of the directory's (None: a 404).
    requests: (path, Range header) of every request, in order.
    """

    def __init__(self, directory):
        self.directory = directory
        self.behave, self.replace, self.requests = {}, {}, []
        self.stopping = threading.Event()
        self.threads = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.url = "http://127.0.0.1:%d/" % self.listener.getsockname()[1]
        self.acceptor = threading.Thread(target=self._accept, name="hostile-accept")
        self.acceptor.start()

    def stop(self):
        self.stopping.set()
        self.acceptor.join()
        self.listener.close()
        for thread in self.threads:
            thread.join(10)
        assert not any(t.is_alive() for t in self.threads), "a connection thread did not end"

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            thread = threading.Thread(target=self._connection, args=(conn,), name="hostile-conn")
            self.threads.append(thread)
            thread.start()

    def _connection(self, conn):
        # One request per connection ("Connection: close"): simple, and http.client copes.
        try:
            conn.settimeout(5)
            reader = conn.makefile("rb")
            try:
                request = reader.readline(65536).decode("latin-1").split()
                headers = {}
                for line in iter(lambda: reader.readline(65536), b""):
                    if line in (b"\r\n", b"\n"):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
            finally:
                reader.close()
            if len(request) == 3:
                self.requests.append((request[1].split("?")[0], headers.get("range")))
                self._serve(conn, request[1], headers)
        except OSError:
            pass  # the client went away: that is what some cases are about
        finally:
            conn.close()

    def _file(self, path, wanted, etag_wanted):
        """(status, body, headers) a correct server would answer."""
        if path.startswith("/moved/"):
            path = path[len("/moved"):]
        if path in self.replace:
            content = self.replace[path]
        else:
            try:
                with open(os.path.join(self.directory, path.lstrip("/")), "rb") as f:
                    content = f.read()
            except OSError:
                content = None
        if content is None:
            return 404, b"", []
        etag = '"%s"' % hashlib.sha256(content).hexdigest()[:16]
        if etag_wanted == etag:
            return 304, b"", [("ETag", etag)]
        m = re.match(r"^bytes=(\d+)-(\d*)$", wanted or "")
        if not m:
            return 200, content, [("ETag", etag)]
        start = int(m.group(1))
        stop = min(int(m.group(2)) + 1, len(content)) if m.group(2) else len(content)
        if start >= len(content):
            return 416, b"", [("Content-Range", "bytes */%d" % len(content))]
        return 206, content[start:stop], [("ETag", etag),
                                          ("Content-Range", "bytes %d-%d/%d" % (start, stop - 1, len(content)))]

    def _send(self, conn, status, body, headers=(), length=-1):
        """Headers then body; length: the Content-Length to claim (-1: the true one, None: none)."""
        lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Whatever")), "Connection: close"]
        lines += ["%s: %s" % h for h in headers]
        if length is not None:
            lines.append("Content-Length: %d" % (len(body) if length == -1 else length))
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _serve(self, conn, target, headers):
        path = target.split("?")[0]
        rule = self.behave.get(path)
        name, arg = rule if isinstance(rule, tuple) else (rule, None)
        if name == "status":            # a bare error status
            return self._send(conn, arg, b"error\n")
        if name == "html":              # a proxy's error page, but with 200
            return self._send(conn, 200, HTML_ERROR, [("Content-Type", "text/html")])
        if name == "redirect":          # to arg, or to the same place again (a loop)
            return self._send(conn, 302, b"", [("Location", arg or target)])
        wanted = headers.get("range")
        if name == "ignore-range":
            wanted = None
        if name == "range-to-end" and wanted:   # a 206 that runs past the end asked for
            wanted = wanted.split("-")[0] + "-"
        status, body, extra = self._file(path, wanted, headers.get("if-none-match"))
        if name == "content-range":     # a 206 claiming another range than the one asked for
            extra = [h for h in extra if h[0] != "Content-Range"] + [("Content-Range", arg)]
        if name == "short-length":      # Content-Length smaller than the body sent
            return self._send(conn, status, body, extra, length=len(body) // 2)
        if name == "oversize":          # arg bytes more than the file, announced
            return self._send(conn, status, body + b"x" * arg, extra)
        if name == "oversize-unannounced":  # arg bytes more, no Content-Length: ends at close
            return self._send(conn, status, body + b"x" * arg, extra, length=None)
        if name == "truncate":          # Content-Length promises more than is sent, then close
            return self._send(conn, status, body[:len(body) // 2], extra, length=len(body))
        if name == "reset":             # half the body, then a TCP reset
            self._send(conn, status, body[:len(body) // 2], extra, length=len(body))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None
        if name == "chunked-endless":   # the file, then junk without end, chunked (no Content-Length)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn.sendall(b"%x\r\n%s\r\n" % (len(body), body))
            junk = b"x" * 65536
            give_up = time.monotonic() + TRICKLE_FOR
            while not self.stopping.is_set() and time.monotonic() < give_up:
                conn.sendall(b"%x\r\n%s\r\n" % (len(junk), junk))  # raises once the client hangs up
            return None
        if name == "giant-etag":        # a validator far too long to be worth keeping
            return self._send(conn, status, body, [("ETag", '"%s"' % ("e" * 5000))])
        if name == "trickle-headers":   # the status line and headers, one byte every half second
            give_up = time.monotonic() + TRICKLE_FOR
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 200:
                if self.stopping.wait(0.5) or time.monotonic() > give_up:
                    return None
                conn.sendall(bytes([byte]))
            return None
        if name == "trickle":           # one byte every half second, for a bounded time
            self._send(conn, status, b"", extra, length=len(body))
            give_up = time.monotonic() + TRICKLE_FOR
            for i in range(len(body)):
                if self.stopping.wait(0.5) or time.monotonic() > give_up:
                    return None
                conn.sendall(body[i:i + 1])
            return None
        return self._send(conn, status, body, extra)

    def paths(self):
        return [p for p, _ in self.requests]


# --- a real repository, built once with the real author verbs -------------------------

def canon(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha(data):
    return hashlib.sha256(data).hexdigest()


def utc(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def sign(data, key, tmp, namespace="isconf"):
    """ssh-keygen -Y sign, as an author (or an attacker with a key) would."""
    path = os.path.join(str(tmp), "to-sign-%s" % sha(data + key.encode() + namespace.encode())[:12])
    with open(path, "wb") as f:
        f.write(data)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", key, "-n", namespace, path],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    with open(path + ".sig", "rb") as f:
        return f.read()


def head_bytes(lines, branch="web", **extra):
    """A head committing to journal lines (canonical bytes, no newlines)."""
    fields = {"format": 1, "branch": branch, "seq": len(lines), "id": sha(lines[-1]) if lines else "0" * 64,
              "length": sum(len(l) + 1 for l in lines), "time": utc(time.time())}
    fields.update(extra)
    return canon(fields) + b"\n"


def entry(prev_line, kind, **fields):
    """A journal line following prev_line (None: the first)."""
    prev = json.loads(prev_line) if prev_line else {"seq": 0}
    fields.update(seq=prev["seq"] + 1, prev=sha(prev_line) if prev_line else "0" * 64, kind=kind,
                  time=utc(time.time()), author="mallory@example", message="crafted")
    return canon(fields)


def file_record(path, content):
    return {"path": path, "type": "file", "uid": 0, "gid": 0, "user": "root", "group": "root", "mode": 0o644,
            "mtime_ns": 1700000000000000000, "size": len(content), "object": sha(content)}


class Template(object):
    """Branch web at seq 1, 2 and 4 (saved at each), and branch canary forked from it."""

    MOTD, ISSUE = b"welcome\n" * 8, b"second!\n" * 8   # same size, so one can stand in for the other
    MARKERS = {0: ["/etc/motd", "/tmp/two", "/etc/issue", "/tmp/four"], 2: ["/etc/issue", "/tmp/four"]}

    def __init__(self, top, keys):
        src = os.path.join(top, "src")
        os.makedirs(os.path.join(src, "etc"))
        for name, content in (("motd", self.MOTD), ("issue", self.ISSUE)):
            with open(os.path.join(src, "etc", name), "wb") as f:
                f.write(content)
        self.repo = os.path.join(top, "repo")
        author = Author(self.repo, keys=keys)
        self.versions = {}
        author.commit(["--root", src, "snap", "/etc/motd"])
        self.save(1)
        author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/two"])
        self.save(2)
        author.commit(["--root", src, "snap", "/etc/issue"], ["exec", "--no-run", "--", "/bin/touch", "/tmp/four"])
        self.save(4)
        author("fork", "canary", "--sign", keys.private)
        self.canary = {p: self.read("/branches/canary/" + p) for p in ("head", "head.sig")}
        self.lines = self.versions[4][JOURNAL].split(b"\n")[:-1]

    def read(self, path):
        with open(os.path.join(self.repo, path.lstrip("/")), "rb") as f:
            return f.read()

    def save(self, seq):
        self.versions[seq] = {p: self.read(p) for p in (HEAD, SIG, JOURNAL)}

    @staticmethod
    def object(content):
        return "/objects/" + sha(content)


class World(object):
    """One test's mirror, host and keys, and the moves an attacker can make on the mirror."""

    def __init__(self, template, mirror, host, keys, attacker, tmp):
        self.t, self.mirror, self.host, self.keys, self.attacker, self.tmp = (
            template, mirror, host, keys, attacker, tmp)

    def serve_version(self, seq):
        self.mirror.replace.update(self.t.versions[seq])

    def publish(self, lines, key=None, objects=()):
        """Serve a journal of these lines, with a head signed by key (default: the real one)."""
        head = head_bytes(lines)
        self.mirror.replace.update({JOURNAL: b"".join(l + b"\n" for l in lines), HEAD: head,
                                    SIG: sign(head, key or self.keys.private, self.tmp)})
        for content in objects:
            self.mirror.replace[Template.object(content)] = content

    def resign(self, head, key=None, namespace="isconf"):
        self.mirror.replace.update({HEAD: head, SIG: sign(head, key or self.keys.private, self.tmp, namespace)})

    def bring_to_seq_2(self):
        self.serve_version(2)
        self.host("up", expect="ok")
        assert os.path.exists(self.host.path("/tmp/two"))
        self.mirror.replace.clear()


def local_copy(host):
    """The host's verified journal copy and head, as bytes (None where absent)."""
    out = []
    for name in ("journal", "head", "head.sig"):
        try:
            with open(host.state(name), "rb") as f:
                out.append(f.read())
        except FileNotFoundError:
            out.append(None)
    return out


def up_applies_nothing(world, expect, fragment, markers, *args, **kw):
    """Run up; check the exit code, the one error line, and that nothing moved on the host."""
    host = world.host
    before, local = host.snapshot(), local_copy(host)
    proc = host("up", *args, expect=expect, timeout=kw.get("timeout", RUN_TIMEOUT))
    line = error_line(proc)
    assert proc.err.strip().splitlines() == [line]   # one line, and nothing else on stderr
    assert fragment in line, line
    for marker in markers:
        assert not os.path.lexists(host.path(marker)), marker
    after = host.snapshot()
    if expect == "unreachable":
        # What arrived of an object is kept as objects/SHA.part, for the next run to resume from.
        parts = [p for p in after if p.startswith("var/lib/isconf/objects/") and p.endswith(".part")]
        for p in parts:
            del after[p]
    assert after == before
    assert local_copy(host) == local
    return line
