"""What an admin reads: one line per transaction, quiet cron runs, dated lines off a terminal."""

import os
import pty
import re
import select
import subprocess
import sys
import time

from conftest import AUTHOR, ISCONF, Host, error_line
from hostile import HostileMirror

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "


def two_execs(author, host, server, keys, busybox_root, second="/bin/true"):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo hello from one"],
                  ["exec", "--no-run", "--", "/bin/sh", "-c", second])
    host.init(server.url, keys)


def test_each_transaction_is_one_dated_line_off_a_terminal(author, host, server, keys, busybox_root):
    two_execs(author, host, server, keys, busybox_root)
    proc = host("up", expect="ok")
    lines = proc.stdout.decode().splitlines()
    done = [l for l in lines if re.search(r"\[\d+/2\] ", l)]
    assert len(done) == 2, lines
    assert re.match(STAMP + r"\[1/2\] exec /bin/sh -c 'echo hello from one' \.\.\. ok \(\d+\.\d s\)$", done[0]), done
    assert re.match(STAMP + r"\[2/2\] exec /bin/sh -c /bin/true \.\.\. ok \(\d+\.\d s\)$", done[1]), done
    assert "hello from one" in lines  # the command's own output, as it wrote it
    assert all(re.match(STAMP, l) for l in lines if "isconf:" in l), lines


def test_quiet_prints_nothing_when_all_goes_well(author, host, server, keys, busybox_root):
    two_execs(author, host, server, keys, busybox_root)
    proc = host("up", "-q", expect="ok")
    assert proc.stdout == b"" and proc.stderr == b"", (proc.stdout, proc.stderr)
    assert host.status()["applied_seq"] == 2
    again = host("up", "--quiet", expect="ok")  # up to date: still nothing
    assert again.stdout == b"" and again.stderr == b""


def test_quiet_still_says_what_went_wrong(author, host, server, keys, busybox_root):
    two_execs(author, host, server, keys, busybox_root, second="printf 'oops%s\\n' 42; exit 3")
    proc = host("up", "-q", expect="failed")
    assert "hello from one" not in proc.out and "oops42" not in proc.out  # the log has it
    assert re.search(r"\[2/2\] exec .* \.\.\. failed \(\d+\.\d s\)", proc.out), proc.out
    assert "transaction 2 failed" in error_line(proc)


def test_warnings_are_dated_and_shown_under_quiet(author, host, server, keys, busybox_root):
    two_execs(author, host, server, keys, busybox_root)
    host("init", "http://127.0.0.1:1/", server.url, "--branch", "web", "--signers", keys.signers, "--force",
         "--retries", "1", expect="ok")
    proc = host("up", "-q", expect="ok")
    warnings = proc.stderr.decode().splitlines()
    assert len(warnings) == 1 and re.match(STAMP + "isconf: warning: mirror http://127.0.0.1:1/: ", warnings[0]), \
        warnings


def read_all(fd):
    """Everything a program writes to a terminal, until it closes it (poll: the descriptor's
    number can be past what select() takes in a long test session)."""
    out, poller = b"", select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        if not poller.poll(60000):
            return out
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side closed
            return out
        if not chunk:
            return out
        out += chunk


def test_on_a_terminal_a_transaction_line_is_begun_then_ended_and_never_dated(author, host, server, keys,
                                                                           busybox_root):
    two_execs(author, host, server, keys, busybox_root)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdout=slave,
                            stderr=slave, stdin=subprocess.DEVNULL,
                            env={"PATH": os.environ["PATH"], "ISCONF_AUTHOR": AUTHOR, "LC_ALL": "C.UTF-8"})
    os.close(slave)
    try:
        text = read_all(master).decode().replace("\r\n", "\n")
    finally:
        os.close(master)
        proc.wait(60)
    assert proc.returncode == 0, text
    # The first command wrote output: its line was ended for it and the result comes on a line of its own.
    assert "[1/2] exec /bin/sh -c 'echo hello from one' ... \nhello from one\n" in text, text
    assert "\n[1/2] exec /bin/sh -c 'echo hello from one' ... ok (" in text, text
    # The second wrote nothing: one line, begun and ended.
    assert re.search(r"^\[2/2\] exec /bin/sh -c /bin/true \.\.\. ok \(\d+\.\d s\)$", text, re.M), text
    assert not re.search(STAMP, text), text


def test_text_from_the_journal_is_escaped_in_the_transaction_line(author, host, server, keys, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true", "\x1b[2J\rgotcha"])
    host.init(server.url, keys)
    proc = host("up", expect="ok")
    assert "\x1b" not in proc.out and "\r" not in proc.out
    assert "\\x1b[2J\\x0dgotcha" in proc.out, proc.out


class SlowMirror(HostileMirror):
    """Objects arrive a chunk every 20 ms, as from a distant mirror: long enough to show progress."""

    def _serve(self, conn, target, headers):
        if not target.startswith("/objects/"):
            return super(SlowMirror, self)._serve(conn, target, headers)
        with open(os.path.join(self.directory, target.lstrip("/")), "rb") as f:
            data = f.read()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(data))
        for offset in range(0, len(data), 256 * 1024):
            conn.sendall(data[offset:offset + 256 * 1024])
            time.sleep(0.02)


def test_a_large_download_shows_progress_on_a_terminal_only(author, host, keys, tmp_path):
    src = tmp_path / "src"
    (src / "srv").mkdir(parents=True)
    (src / "srv" / "big.img").write_bytes(os.urandom(24 * 1024 * 1024))
    author.commit(["--root", str(src), "snap", "/srv/big.img"])
    mirror = SlowMirror(author.repo)
    try:
        host.init(mirror.url, keys)
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdout=subprocess.PIPE,
                                stderr=slave, stdin=subprocess.DEVNULL,
                                env={"PATH": os.environ["PATH"], "ISCONF_AUTHOR": AUTHOR, "LC_ALL": "C.UTF-8"})
        os.close(slave)
        try:
            terminal = read_all(master).decode()
        finally:
            os.close(master)
            out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, terminal
        assert re.search(r"\risconf: fetching 1 object\(s\): \d+\.\d of 24\.0 MiB\x1b\[K", terminal), repr(terminal)
        assert terminal.endswith("\r\x1b[K"), repr(terminal)  # cleared before the next line
        assert "fetching" not in out and "\x1b" not in out, out  # progress goes to the terminal alone
        # Off a terminal (a cron log), the same download shows no progress line.
        other = Host(str(tmp_path / "other"))
        other.init(mirror.url, keys)
        quiet = other("up", expect="ok")
        assert "fetching" not in quiet.err and "\x1b" not in quiet.err, quiet.err
    finally:
        mirror.stop()
