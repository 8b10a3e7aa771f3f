"""`isconf serve`, and replaying from a real nginx."""

import ctypes
import http.client
import os
import socket
import urllib.parse

import pytest

from conftest import Server, access_log, error_line


@pytest.fixture
def site(tmp_path):
    top = tmp_path / "site"
    (top / "dir").mkdir(parents=True)
    (top / "file").write_bytes(b"0123456789")
    (top / "dir" / "inner").write_bytes(b"inner")
    (tmp_path / "secret").write_bytes(b"outside")
    os.symlink(str(tmp_path / "secret"), str(top / "escape"))
    s = Server(str(top), str(tmp_path / "site.log"))
    yield s
    s.stop()


def request(server, path, headers=None, method="GET", conn=None):
    url = urllib.parse.urlsplit(server.url)
    own = conn is None
    conn = conn or http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if own:
            conn.close()


def test_get_sends_the_file_with_validators(site):
    status, headers, body = request(site, "/file")
    assert (status, body) == (200, b"0123456789")
    assert headers["Content-Length"] == "10" and headers["ETag"] and headers["Last-Modified"]


@pytest.mark.parametrize("wanted,status,body,content_range", [
    ("bytes=2-5", 206, b"2345", "bytes 2-5/10"),
    ("bytes=7-", 206, b"789", "bytes 7-9/10"),
    ("bytes=-3", 206, b"789", "bytes 7-9/10"),
    ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
    ("bytes=10-", 416, b"", "bytes */10"),
    ("bytes=5-2", 416, b"", "bytes */10"),
])
def test_range_requests(site, wanted, status, body, content_range):
    got_status, headers, got_body = request(site, "/file", {"Range": wanted})
    assert (got_status, got_body, headers["Content-Range"]) == (status, body, content_range)


def test_if_none_match_gives_304(site):
    etag = request(site, "/file")[1]["ETag"]
    status, _, body = request(site, "/file", {"If-None-Match": etag})
    assert (status, body) == (304, b"")
    assert request(site, "/file", {"If-None-Match": '"other"'})[0] == 200


@pytest.mark.parametrize("path", ["/", "/dir", "/dir/", "/../secret", "/dir/../../secret", "/escape",
                                  "/missing", "/%2e%2e/secret"])
def test_no_listing_and_no_escape(site, path):
    status, _, body = request(site, path)
    assert status == 404 and b"outside" not in body


@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /file HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
], ids=["bad request line", "long path", "too many headers"])
def test_a_malformed_request_gets_its_error_status_and_one_log_line(site, raw, status):
    url = urllib.parse.urlsplit(site.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(raw)
        answer = s.recv(300)
    assert b"%d" % status in answer.split(b"\n")[0] + answer.split(b"<title>")[-1], answer  # an HTTP/0.9 one: its body
    assert request(site, "/file")[0] == 200   # the server carries on
    assert "Traceback" not in site.log_text(), site.log_text()


@pytest.mark.parametrize("swapped", ["a link out of the directory", "a directory on the way now a link", "a FIFO",
                                     "the authors' work area through a link"])
def test_a_name_swapped_after_it_was_judged_is_judged_again_as_the_file_opened(isconf, tmp_path, swapped):
    # serve judges the request's path, then opens it: whatever the name became in between (anyone who can
    # write the directory may swap it), the opened file is judged again, and a FIFO never holds the thread.
    top, outside = tmp_path / "repo", tmp_path / "outside"
    for directory in (top / "branches" / "web", top / "authoring" / "web", outside):
        directory.mkdir(parents=True)
    (outside / "secret").write_text("not the repository's\n")
    (top / "authoring" / "web" / "staged").write_text("staged work\n")
    (top / "branches" / "web" / "head").write_text("a head\n")
    name = top / "branches" / "web" / "head"
    handler = type("Handler", (isconf.StaticHandler,), {"directory": str(top)})()
    assert handler.opened(str(name)).read() == b"a head\n"  # as it was judged
    name.unlink()
    if swapped == "a link out of the directory":
        name.symlink_to(outside / "secret")
    elif swapped == "a directory on the way now a link":
        (top / "branches" / "web").rename(top / "old")
        (top / "branches" / "web").symlink_to(outside)
        name = top / "branches" / "web" / "secret"
    elif swapped == "a FIFO":
        os.mkfifo(str(name))
    else:
        (top / "branches" / "web").rmdir()
        (top / "branches" / "web").symlink_to(top / "authoring" / "web")
        name = top / "branches" / "web" / "staged"
    with pytest.raises(OSError):
        handler.opened(str(name))


def test_head_has_headers_and_no_body(site):
    status, headers, body = request(site, "/file", method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "10", b"")


def test_keep_alive_serves_several_requests_on_one_connection(site):
    url = urllib.parse.urlsplit(site.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        assert request(site, "/file", conn=conn)[2] == b"0123456789"
        sock = conn.sock
        assert request(site, "/dir/inner", conn=conn)[2] == b"inner"
        assert conn.sock is sock
    finally:
        conn.close()


def server_side_of(pid, conn):
    """The server's own socket of connection conn, copied out of process pid (pidfd_getfd, Linux 5.6)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir("/proc/%d/fd" % pid):
            if not os.readlink("/proc/%d/fd/%s" % (pid, name)).startswith("socket:"):
                continue
            fd = libc.syscall(438, pidfd, int(name), 0)  # SYS_pidfd_getfd
            assert fd >= 0, os.strerror(ctypes.get_errno())
            sock = socket.socket(fileno=fd)
            try:  # the listening socket has the same name, and no peer
                if sock.getsockname() == conn.sock.getpeername() and sock.getpeername():
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError("no socket of the server's serves this connection")


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs os.pidfd_open (Python 3.9)")
def test_a_kept_alive_connection_sends_each_answer_at_once(site):
    # Headers and body leave in two writes: with Nagle's algorithm on, the body waits for the client's delayed
    # ACK of the headers, 40 ms per request of a run fetching small objects one after another.
    url = urllib.parse.urlsplit(site.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        assert request(site, "/file", conn=conn)[2] == b"0123456789"
        with server_side_of(site.proc.pid, conn) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        conn.close()


def test_one_access_log_line_per_request(site):
    request(site, "/file", {"Range": "bytes=1-2"})
    request(site, "/missing")
    lines = site.requests()
    assert len(lines) == 2
    assert '"GET /file HTTP/1.1" 206 range=bytes=1-2' in lines[0] and '"GET /missing HTTP/1.1" 404' in lines[1]


def test_replays_from_nginx_with_range(author, keys, host, nginx, busybox_root):
    url, log = nginx
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    host.init(url, keys)
    host("up", expect="ok")
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/two"])
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/two"))
    journal = [status for status, path, _ in access_log(log) if path.endswith("/journal")]
    assert journal == ["206", "206"]


def test_up_to_date_run_is_one_small_unconditional_request(author, keys, host, nginx, busybox_root):
    url, log = nginx
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    host.init(url, keys)
    host("up", expect="ok")
    before = len(access_log(log))
    assert "up to date at seq 1" in host("up", expect="ok").out
    (status, path, sent), = access_log(log)[before:]
    assert (status, path) == ("200", "/branches/web/head")
    # What nginx wrote to the socket for it, headers included.
    assert sent < 1024


def test_two_check_ins_in_one_second_with_same_size_heads_are_not_missed(author, keys, host, nginx,
                                                                        busybox_root):
    # nginx's ETag and Last-Modified are the mtime in whole seconds and the size: a host that
    # trusted them would stay at seq 1 for good.
    url, log = nginx
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    head = author.path("head")
    size, second = os.path.getsize(head), int(os.stat(head).st_mtime)
    host.init(url, keys)
    host("up", expect="ok")
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/two"])
    assert os.path.getsize(head) == size   # seq 1 -> 2, same number of digits
    for name in ("head", "head.sig"):
        os.utime(author.path(name), (second, second))
    assert "applied through seq 2" in host("up", expect="ok").out
    assert os.path.exists(host.path("/tmp/two"))
    assert host.status()["applied_seq"] == 2


def test_an_expired_head_that_did_not_change_is_refused(author, keys, host, nginx, busybox_root):
    # The freeze check on the up-to-date path: the mirror serves the very head this host holds.
    url, log = nginx
    busybox_root(host.root)
    author("lock", "-m", "expiring")
    author("exec", "--no-run", "--", "/bin/touch", "/tmp/x")
    author.ci("--expires", "1d")
    host.init(url, keys)
    host("up", expect="ok")
    before = len(access_log(log))
    refused = host("up", "--now", "2099-01-01T00:00:00Z", expect="refused")
    assert "expired at" in error_line(refused)
    assert [path for _, path, _ in access_log(log)[before:]] == ["/branches/web/head"]
