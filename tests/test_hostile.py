"""A hostile mirror: every way a server can lie or fail, and the host applies nothing.

Exit codes: network trouble that a later try or another mirror may cure (a body cut
short, a reset, a stall, 5xx, a redirect loop) is "unreachable" (3); an answer that
arrived but fails verification (wrong size, wrong bytes, a missing or wrong signature,
an old or foreign head) is "refused" (4): asking again would not make it true.
"""

import base64
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import Author, Keys, error_line

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


@pytest.fixture(scope="session")
def template(tmp_path_factory, keys):
    return Template(str(tmp_path_factory.mktemp("hostile")), keys)


@pytest.fixture(scope="session")
def attacker(tmp_path_factory):
    return Keys(str(tmp_path_factory.mktemp("attacker")), principal="mallory@example")


@pytest.fixture
def mirror(template):
    server = HostileMirror(template.repo)
    yield server
    server.stop()


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


@pytest.fixture
def world(template, mirror, host, keys, attacker, tmp_path, busybox_root):
    busybox_root(host.root)
    host.init(mirror.url, keys, *SLOW)
    return World(template, mirror, host, keys, attacker, tmp_path)


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


# --- network failures: unreachable (3), nothing applied ----------------------------------
# A body cut short, a reset, a stall, an error status, a redirect loop: the
# mirror is down or broken, not lying; another mirror or a later run may well succeed.

O2 = "/objects/" + sha(Template.ISSUE)


def case(name, at, path, behaviour, fragment, *marks):
    return pytest.param(at, path, behaviour, fragment, id=name, marks=marks)


UNREACHABLE = [
    case("head truncated", 0, HEAD, "truncate", "branches/web/head from"),
    case("journal truncated", 0, JOURNAL, "truncate", "branches/web/journal from"),
    case("object truncated", 2, O2, "truncate", "objects/"),
    case("head reset mid-body", 0, HEAD, "reset", "branches/web/head from"),
    case("journal reset mid-body", 0, JOURNAL, "reset", "branches/web/journal from"),
    case("object reset mid-body", 2, O2, "reset", "objects/"),
    case("head trickled", 0, HEAD, "trickle", "too slow"),
    case("journal trickled", 0, JOURNAL, "trickle", "too slow"),
    case("object trickled", 2, O2, "trickle", "too slow"),
    case("head 500", 0, HEAD, ("status", 500), "500"),
    case("head 503", 0, HEAD, ("status", 503), "503"),
    case("journal 500", 2, JOURNAL, ("status", 500), "500"),
    case("object 503", 2, O2, ("status", 503), "503"),
    case("head redirect loop", 0, HEAD, ("redirect", None), "redirects"),
    case("head headers trickled", 0, HEAD, "trickle-headers", "too slow"),
    case("head redirect to a malformed URL", 0, HEAD, ("redirect", "http://[::1/x"), "branches/web/head from"),
    case("head redirect to another scheme", 0, HEAD, ("redirect", "ftp://127.0.0.1/head"), "only http"),
]


@pytest.mark.parametrize("at,path,behaviour,fragment", UNREACHABLE)
def test_network_failure_is_unreachable_and_applies_nothing(world, at, path, behaviour, fragment):
    if at:
        world.bring_to_seq_2()
    world.mirror.behave[path] = behaviour
    # A fetch gives up after --deadline 3 s plus 1 s per 16 KiB of its limit (64 KiB for a head):
    # a run still going a few seconds after that hangs.
    timeout = 9 if path == HEAD else 6
    up_applies_nothing(world, "unreachable", fragment, Template.MARKERS[at], timeout=timeout)
    assert path in world.mirror.paths()
    if path.startswith("/objects/") and behaviour == "truncate":   # the half that arrived is kept, to resume
        with open(world.host.state(path.lstrip("/") + ".part"), "rb") as f:
            assert f.read() == Template.ISSUE[:len(Template.ISSUE) // 2]


def test_missing_head_signature_is_refused(world):
    # Not a network failure: a host that trusts signers accepts only signed heads.
    world.mirror.replace[SIG] = None
    up_applies_nothing(world, "refused", "has no head.sig", Template.MARKERS[0])
    assert SIG in world.mirror.paths()


# --- bodies of the wrong size or kind: refused (4), nothing applied ----------------------------

# The answer arrived whole by HTTP's own account (a Content-Length that was kept, or a
# close-delimited body), but its size or content is wrong: the mirror is lying or broken.
REFUSED_BODIES = [
    case("head oversized", 0, HEAD, ("oversize", 70000), "more than the 65536 expected"),
    case("head oversized without Content-Length", 0, HEAD, ("oversize-unannounced", 70000), "longer than"),
    case("journal oversized", 0, JOURNAL, ("oversize", 4096), "more than"),
    case("object oversized", 2, O2, ("oversize", 4096), "more than"),
    case("head with a short Content-Length", 0, HEAD, "short-length", "does not verify"),
    case("journal with a short Content-Length", 0, JOURNAL, "short-length", "truncated or padded"),
    case("head as a 200 HTML error page", 0, HEAD, "html", "does not verify"),
    case("head.sig as a 200 HTML error page", 0, SIG, "html", "SSH SIGNATURE"),
    case("journal 206 with the wrong Content-Range", 2, JOURNAL, ("content-range", "bytes 0-99/500"), "wrong range"),
]


@pytest.mark.parametrize("at,path,behaviour,fragment", REFUSED_BODIES)
def test_body_of_wrong_size_or_kind_is_refused_and_applies_nothing(world, at, path, behaviour, fragment):
    if at:
        world.bring_to_seq_2()
    world.mirror.behave[path] = behaviour
    up_applies_nothing(world, "refused", fragment, Template.MARKERS[at])


def test_journal_past_the_signed_length_in_a_206_is_refused(world):
    # The mirror has seq 4's journal, the signed head says seq 2; the 206 runs to the end of the file.
    world.mirror.replace.update({HEAD: world.t.versions[2][HEAD], SIG: world.t.versions[2][SIG]})
    world.mirror.behave[JOURNAL] = "range-to-end"
    up_applies_nothing(world, "refused", "more than", Template.MARKERS[0])
    length = len(world.t.versions[2][JOURNAL])
    assert (JOURNAL, "bytes=0-%d" % (length - 1)) in world.mirror.requests


def test_server_ignoring_range_with_a_rewritten_prefix_is_refused(world):
    world.bring_to_seq_2()
    # Entry 1 rewritten (same length, still valid JSON), the rest as published.
    journal = world.t.versions[4][JOURNAL].replace(b'"author":"alice@example"', b'"author":"alice@examplf"', 1)
    assert journal != world.t.versions[4][JOURNAL]
    world.mirror.replace[JOURNAL] = journal
    world.mirror.behave[JOURNAL] = "ignore-range"
    up_applies_nothing(world, "refused", "does not begin with the journal this host verified",
                       Template.MARKERS[2])


def test_swapped_object_is_refused(world):
    world.bring_to_seq_2()
    world.mirror.replace[O2] = Template.MOTD   # another valid object's bytes, of the same size
    up_applies_nothing(world, "refused", "does not match the signed journal", Template.MARKERS[2])


def test_refused_object_leaves_no_other_object_staged(world):
    # A fresh host needs both objects; they are fetched in hash order, and the second is swapped.
    second = max(Template.MOTD, Template.ISSUE, key=sha)
    world.mirror.replace[Template.object(second)] = min(Template.MOTD, Template.ISSUE, key=sha)
    up_applies_nothing(world, "refused", "does not match the signed journal", Template.MARKERS[0])


def test_object_of_the_wrong_size_is_refused(world):
    world.bring_to_seq_2()
    world.mirror.replace[O2] = Template.ISSUE[:-1]
    line = up_applies_nothing(world, "refused", "does not match the signed journal", Template.MARKERS[2])
    assert re.search(r"\b%d\b" % (len(Template.ISSUE) - 1), line), line   # names the size it got


def test_new_head_with_an_old_journal_is_refused(world):
    # A mirror caught half-way through a sync: seq 4's head, seq 2's journal.
    world.mirror.replace[JOURNAL] = world.t.versions[2][JOURNAL]
    up_applies_nothing(world, "refused", "where the signed head says", Template.MARKERS[0])


# --- heads and signatures an attacker can serve: refused (4) ----------------------------------

def test_replayed_older_signed_head_is_refused_as_rollback(world):
    world.bring_to_seq_2()
    world.mirror.replace.update({HEAD: world.t.versions[1][HEAD], SIG: world.t.versions[1][SIG]})
    up_applies_nothing(world, "refused", "rollback", Template.MARKERS[2])


def test_same_seq_with_another_id_is_refused_as_fork(world):
    # Even signed with the real key: the host verified another entry 2.
    world.bring_to_seq_2()
    lines = world.t.lines[:1]
    lines.append(entry(lines[0], "exec", argv=["/bin/touch", "/tmp/evil"], cwd="/"))
    world.publish(lines)
    up_applies_nothing(world, "refused", "fork", Template.MARKERS[2] + ["/tmp/evil"])


def test_head_of_another_branch_is_refused(world):
    world.mirror.replace.update({HEAD: world.t.canary["head"], SIG: world.t.canary["head.sig"]})
    up_applies_nothing(world, "refused", "is for branch 'canary'", Template.MARKERS[0])


def test_garbage_head_signed_by_the_real_key_is_refused(world):
    world.resign(b"{\"format\":1,\"branch\":\"web\",\"seq\":\n")
    up_applies_nothing(world, "refused", "not valid JSON", Template.MARKERS[0])


def test_non_canonical_head_signed_by_the_real_key_is_refused(world):
    fields = json.loads(world.t.versions[4][HEAD])
    world.resign(json.dumps(fields, sort_keys=True, separators=(", ", ": ")).encode() + b"\n")
    up_applies_nothing(world, "refused", "canonical", Template.MARKERS[0])


def swapped(lines):
    lines = list(lines)
    lines[2], lines[3] = lines[3], lines[2]
    return lines


def test_reordered_journal_signed_by_an_untrusted_key_is_refused(world):
    world.publish(swapped(world.t.lines), key=world.attacker.private)
    up_applies_nothing(world, "refused", "not in allowed_signers", Template.MARKERS[0])


def test_reordered_journal_signed_by_the_real_key_is_refused(world):
    world.publish(swapped(world.t.lines))
    up_applies_nothing(world, "refused", "reordered", Template.MARKERS[0])


def test_signature_by_an_untrusted_key_is_refused(world):
    world.resign(world.t.versions[4][HEAD], key=world.attacker.private)
    up_applies_nothing(world, "refused", "not in allowed_signers", Template.MARKERS[0])


def test_signature_with_a_flipped_byte_is_refused(world):
    armour = world.t.versions[4][SIG].decode().splitlines()
    blob = bytearray(base64.b64decode("".join(armour[1:-1])))
    blob[-1] ^= 1   # the last byte of the Ed25519 signature value
    text = base64.b64encode(bytes(blob)).decode()
    body = "\n".join([armour[0]] + [text[i:i + 70] for i in range(0, len(text), 70)] + [armour[-1]]) + "\n"
    world.mirror.replace[SIG] = body.encode()
    up_applies_nothing(world, "refused", "does not verify", Template.MARKERS[0])


def test_signature_from_another_namespace_is_refused(world):
    world.resign(world.t.versions[4][HEAD], namespace="file")
    up_applies_nothing(world, "refused", "namespace 'file'", Template.MARKERS[0])


def test_expired_head_is_refused(world):
    fields = json.loads(world.t.versions[4][HEAD])
    fields["expires"] = utc(time.time() + 3600)
    world.resign(canon(fields) + b"\n")
    up_applies_nothing(world, "refused", "expired at", Template.MARKERS[0], "--now", "2099-01-01T00:00:00Z")


@pytest.mark.parametrize("options,fragment", [
    ('valid-before="20200101"', "expired at"),
    ('namespaces="other"', "may sign only namespaces"),
], ids=["key past its validity", "key not allowed the namespace"])
def test_key_not_usable_for_this_signature_is_refused(world, keys, tmp_path, options, fragment):
    signers = keys.write_signers(options=options, path=str(tmp_path / "signers"))
    world.host("init", world.mirror.url, "--branch", "web", "--signers", signers, "--force", *SLOW, expect="ok")
    up_applies_nothing(world, "refused", fragment, Template.MARKERS[0])


@pytest.mark.parametrize("path", ["/../etc/x", "/etc/../../x"])
def test_path_traversal_in_a_signed_snap_is_refused_before_anything_applies(world, path):
    # A compromised author: the journal is signed with the real key, and entry 1 is harmless.
    content = b"owned\n"
    lines = [entry(None, "exec", argv=["/bin/touch", "/tmp/first"], cwd="/")]
    lines.append(entry(lines[0], "snap", files=[file_record(path, content)]))
    world.publish(lines, objects=[content])
    up_applies_nothing(world, "refused", "not an absolute, normalised path", ["/tmp/first", "/x", "/etc/x"])
    assert not os.path.exists(os.path.join(os.path.dirname(world.host.root), "x"))


# --- what a hostile mirror cannot stop: these succeed -------------------------------------

def test_redirect_to_a_good_path_is_followed(world):
    world.mirror.behave[HEAD] = ("redirect", "/moved" + HEAD)
    world.host("up", expect="ok")
    assert open(world.host.path("/etc/issue"), "rb").read() == Template.ISSUE
    assert os.path.exists(world.host.path("/tmp/four"))
    assert world.mirror.paths()[:2] == [HEAD, "/moved" + HEAD]


def test_server_ignoring_range_with_the_right_prefix_is_accepted(world):
    world.bring_to_seq_2()
    world.mirror.behave[JOURNAL] = "ignore-range"
    world.host("up", expect="ok")
    assert os.path.exists(world.host.path("/tmp/four"))
    assert (JOURNAL, "bytes=%d-%d" % (len(world.t.versions[2][JOURNAL]), len(world.t.versions[4][JOURNAL]) - 1)) \
        in world.mirror.requests


def test_hostile_first_mirror_falls_back_to_a_good_second(world, template, keys, tmp_path):
    good = HostileMirror(template.repo)
    try:
        world.mirror.behave[HEAD] = "html"
        world.host("init", world.mirror.url, good.url, "--branch", "web", "--signers", keys.signers, "--force",
                   *SLOW, expect="ok")
        world.host("up", expect="ok")
        assert os.path.exists(world.host.path("/tmp/four"))
        assert HEAD in world.mirror.paths() and JOURNAL not in world.mirror.paths()
        assert JOURNAL in good.paths()
    finally:
        good.stop()


def test_after_a_refusal_the_next_up_against_a_good_mirror_succeeds(world):
    world.bring_to_seq_2()
    world.mirror.replace[O2] = Template.MOTD
    world.host("up", expect="refused")
    world.mirror.replace.clear()
    world.host("up", expect="ok")
    assert open(world.host.path("/etc/issue"), "rb").read() == Template.ISSUE
    assert world.host.status()["applied_seq"] == 4


# --- a hostile target tree: links lead back inside the root ---------------------------------
# Legitimate journals signed by the real key; the links were planted in the host's root.

@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_snap_through_a_symlink_lands_inside_the_root(world, tmp_path, kind):
    outside = str(tmp_path / "outside")
    os.makedirs(outside)
    target = outside if kind == "absolute" else "../" * 30 + outside.lstrip("/")
    os.symlink(target, world.host.path("/opt"))
    world.publish([entry(None, "snap", files=[file_record("/opt/x", b"confined\n")])], objects=[b"confined\n"])
    world.host("up", expect="ok")
    assert not os.path.exists(os.path.join(outside, "x"))
    inside = world.host.path(outside + "/x")
    assert open(inside, "rb").read() == b"confined\n"
    assert not os.path.islink(inside)


def test_exec_with_a_cwd_symlinked_outside_runs_inside_the_root(world, tmp_path):
    outside = str(tmp_path / "outside")
    os.makedirs(outside)
    os.makedirs(world.host.path(outside))
    os.symlink(outside, world.host.path("/srv"))
    world.publish([entry(None, "exec", argv=["/bin/touch", "here"], cwd="/srv")])
    world.host("up", expect="ok")
    assert not os.path.exists(os.path.join(outside, "here"))
    assert os.path.exists(world.host.path(outside + "/here"))


def test_mirror_leaves_no_thread_or_socket_behind(template):
    before = set(threading.enumerate())
    server = HostileMirror(template.repo)
    server.behave[HEAD] = "trickle"
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1].strip("/")))) as c:
        c.sendall(b"GET /branches/web/head HTTP/1.1\r\nHost: x\r\n\r\n")
        c.recv(100)
    server.stop()
    assert set(threading.enumerate()) <= before
    assert server.listener.fileno() == -1


def test_304_to_an_unconditional_request_is_refused(world):
    # A fresh host sends no validator, so "not modified" can only be a broken or lying mirror.
    world.mirror.behave[HEAD] = ("status", 304)
    up_applies_nothing(world, "refused", "not conditional", Template.MARKERS[0])


def test_server_ignoring_range_on_a_journal_longer_than_signed_is_accepted(world):
    # A ci that died after appending leaves bytes past the head: a host reads the signed bytes only.
    world.bring_to_seq_2()
    world.mirror.replace[JOURNAL] = world.t.versions[4][JOURNAL] + b'{"half an entry'
    world.mirror.behave[JOURNAL] = "ignore-range"
    world.host("up", expect="ok")
    assert os.path.exists(world.host.path("/tmp/four"))


def test_state_directory_linked_outside_the_root_stays_inside(template, mirror, keys, tmp_path, busybox_root):
    from conftest import Host
    outside = str(tmp_path / "outside")
    os.makedirs(outside)
    host = Host(str(tmp_path / "linked-host"))
    busybox_root(host.root)
    os.symlink(outside, host.path("/var"))
    host.init(mirror.url, keys, *SLOW)
    host("up", expect="ok")
    assert os.listdir(outside) == []
    assert os.path.exists(host.path(outside + "/lib/isconf/history"))


@pytest.mark.parametrize("plant", ["/dev/zero", "fifo", "/etc/passwd"])
def test_a_planted_passwd_file_is_not_followed_out_of_the_root(world, plant):
    # Owner names are looked up in the target's own /etc/passwd: never a device, a FIFO or the host's file.
    passwd = world.host.path("/etc/passwd")
    os.unlink(passwd)
    if plant == "fifo":
        os.mkfifo(passwd)
    else:
        os.symlink(plant, passwd)
    world.publish([entry(None, "snap", files=[dict(file_record("/etc/x", b"owned\n"), user="nobody", uid=1234)])],
                  objects=[b"owned\n"])
    world.host("up", expect="ok", timeout=RUN_TIMEOUT)
    assert os.stat(world.host.path("/etc/x")).st_uid == 1234


def test_endless_chunked_answer_to_a_range_request_is_cut_at_the_signed_length(world):
    # A server that ignores Range and streams for ever: the host reads the signed bytes and hangs up.
    world.mirror.behave[JOURNAL] = "chunked-endless"
    world.host("up", expect="ok", timeout=RUN_TIMEOUT)
    assert os.path.exists(world.host.path("/tmp/four"))


def test_a_giant_etag_is_ignored_and_costs_nothing_later(world):
    # Validators are never kept or sent: the next run is the head alone, unconditional.
    world.mirror.behave[HEAD] = "giant-etag"
    world.host("up", expect="ok")
    del world.mirror.requests[:]
    world.host("up", expect="ok")
    assert world.mirror.paths() == [HEAD]
    assert not os.path.exists(world.host.state("etags.json"))


def test_a_link_with_dotdot_below_a_missing_directory_cannot_place_state_outside(template, mirror, keys,
                                                                                  tmp_path, busybox_root):
    from conftest import Host
    host = Host(str(tmp_path / "dotdot-host"))
    busybox_root(host.root)
    escape = str(tmp_path / "escaped")
    os.symlink("missing/" + "../" * 20 + escape.lstrip("/"), host.path("/var"))
    proc = host("init", mirror.url, "--branch", "web", "--signers", keys.signers)
    assert proc.returncode == 7 and "No such file" in error_line(proc)
    assert not os.path.exists(escape)
