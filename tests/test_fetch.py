"""Fetching: deadlines in any thread, strict headers and times, and moving on between mirrors."""

import hashlib
import json
import os
import socket
import threading

import pytest

from conftest import error_line
from hostile import HEAD, JOURNAL, SIG, SLOW, HostileMirror, Template, canon, up_applies_nothing


# --- deadlines hold in any thread -----------------------------------------------------------

class Trickler(object):
    """A server that answers one byte every 0.3 s: the status line and headers, or a body."""

    def __init__(self, body):
        self.stopping = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.url = "http://127.0.0.1:%d/" % self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, args=(body,))
        self.thread.start()

    def serve(self, body):
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)
            if body:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not self.stopping.wait(0.3):   # at most until stop(): the thread always ends
                try:
                    conn.sendall(b"x")   # a body byte, or one more of a header line without end
                except OSError:
                    return

    def stop(self):
        self.stopping.set()
        self.thread.join(10)
        self.listener.close()


@pytest.mark.parametrize("body", [False, True], ids=["headers", "body"])
def test_a_trickled_fetch_in_another_thread_ends_at_its_deadline(isconf, body):
    server = Trickler(body)
    outcome = []

    def fetch():
        mirror = isconf.Mirror(server.url, timeout=1, deadline=2)
        try:
            mirror.fetch("branches/web/head", 1000)
            outcome.append("returned")
        except Exception as e:   # noqa: B902 - what it raised is the point
            outcome.append(e)
        finally:
            mirror.close()
    try:
        thread = threading.Thread(target=fetch)
        thread.start()
        thread.join(60)   # generous: a fetch that ignores its deadline would trickle for ever
        assert not thread.is_alive()
    finally:
        server.stop()
    error, = outcome
    assert isinstance(error, isconf.Unreachable) and "too slow, gave up after 2 seconds" in str(error), error


# --- headers and times: exactly what the format and HTTP say ----------------------------------

@pytest.mark.parametrize("header,start,ok", [
    ("bytes 0-9/10", 0, True),
    ("bytes 5-9/*", 5, True),
    ("bytes 5-5/6", 5, True),
    ("bytes 4-9/10", 5, False),          # not the range asked for
    ("bytes 5-4/10", 5, False),          # ends before it starts
    ("bytes 5-10/10", 5, False),         # ends past the file
    ("bytes \u00b2-9/10", 2, False),     # a superscript two: int() and \d take it
    ("bytes \u0665-9/10", 5, False),     # an Arabic-Indic five
    ("bytes 5-9/10 ", 5, False),
    ("bytes 5-9/10\n", 5, False),
    ("bytes=5-9/10", 5, False),
    ("bytes 99999999999999999999-9/10", 5, False),
    ("", 0, False),
    (None, 0, False),
])
def test_content_range_is_checked_exactly(isconf, header, start, ok):
    if ok:
        assert isconf.parse_content_range(header, start, "journal") == start
    else:
        with pytest.raises(isconf.Refused, match="wrong range"):
            isconf.parse_content_range(header, start, "journal")


@pytest.mark.parametrize("header,length", [
    ("10", 10), ("0", 0), (None, None), ("", None), ("\u00b2", None), ("1e3", None), ("-1", None),
    (" 10", None), ("9" * 40, None),
])
def test_content_length_is_a_plain_number_or_ignored(isconf, header, length):
    assert isconf.parse_content_length(header) == length


GOOD_TIMES = [("2026-11-25T06:30:00Z", 1795588200), ("2024-02-29T23:59:59Z", 1709251199),
              ("1970-01-01T00:00:00Z", 0)]
BAD_TIMES = ["2026-1-5T1:2:3Z", "2026-11-25T6:30:00Z", "2026-11-25 06:30:00Z", "2026-11-25T06:30:00",
             "2026-11-25T06:30:00+00:00", "2026-11-25t06:30:00z", " 2026-11-25T06:30:00Z",
             "2026-11-25T06:30:00Z\n", "2026-11-25T06:30:00.5Z", "2025-02-29T00:00:00Z", "2026-04-31T00:00:00Z",
             "2026-13-01T00:00:00Z", "2026-00-10T00:00:00Z", "2026-11-00T00:00:00Z", "2026-11-25T24:00:00Z",
             "2026-11-25T06:60:00Z", "2026-11-25T06:30:60Z", "1969-12-31T23:59:59Z", "0000-01-01T00:00:00Z",
             "\uff12026-11-25T06:30:00Z", "2026-11-25T06:3\u0660:00Z", "", 20261125, None, ["2026-11-25T06:30:00Z"]]


@pytest.mark.parametrize("text,seconds", GOOD_TIMES)
def test_a_time_in_the_format_is_read(isconf, text, seconds):
    assert isconf.parse_time(text) == seconds


@pytest.mark.parametrize("text", BAD_TIMES, ids=repr)
def test_a_time_not_exactly_in_the_format_is_refused(isconf, text):
    with pytest.raises(isconf.Refused, match="is not a UTC time like"):
        isconf.parse_time(text)


@pytest.mark.parametrize("field", ["time", "expires"])
def test_a_head_with_a_slack_time_is_refused(isconf, template, field):
    fields = json.loads(template.versions[4][HEAD])
    fields[field] = "2026-1-5T1:2:3Z"
    with pytest.raises(isconf.Refused, match="head: %s '2026-1-5T1:2:3Z' is not a UTC time" % field):
        isconf.Head.parse(canon(fields) + b"\n")


def test_an_entry_with_a_slack_time_is_refused(isconf, template):
    fields = json.loads(template.lines[0])
    fields["time"] = "2026-11-25T06:30:00"
    with pytest.raises(isconf.Refused, match="entry 1: time '2026-11-25T06:30:00' is not a UTC time"):
        isconf.Entry.parse(canon(fields), "entry 1")


def test_a_signed_head_with_a_slack_time_is_refused_end_to_end(world):
    fields = json.loads(world.t.versions[4][HEAD])
    fields["time"] = "2026-1-5T1:2:3Z"
    world.resign(canon(fields) + b"\n")
    up_applies_nothing(world, "refused", "time '2026-1-5T1:2:3Z' is not a UTC time", Template.MARKERS[0])


# --- an unsigned tail of any shape is a refusal naming the mirror and the entry ---------------

def serve_tail(world, line):
    """Genuine seq 2, then line as entry 3, under a head signed by the real key: only the tail is hostile."""
    journal = world.t.versions[2][JOURNAL] + line + b"\n"
    head = json.loads(world.t.versions[2][HEAD])
    head.update(seq=3, id=hashlib.sha256(line).hexdigest(), length=len(journal))
    world.resign(canon(head) + b"\n")
    world.mirror.replace[JOURNAL] = journal


@pytest.mark.parametrize("line", [
    b'{"kind":[]}', b'{"kind":{}}', b'[]', b'"entry"', b'1e999', b'{"kind":' + b'[' * 100000 + b']' * 100000 + b'}',
    b'{"seq":' + b'9' * 5000 + b'}',
], ids=["kind a list", "kind an object", "an array", "a string", "a huge float", "nested deep", "huge number"])
def test_a_journal_line_of_any_shape_is_refused_naming_mirror_and_entry(world, line):
    world.bring_to_seq_2()
    serve_tail(world, line)
    got = up_applies_nothing(world, "refused", "journal from %s entry 3" % world.mirror.url, Template.MARKERS[2])
    assert "Traceback" not in got


# --- mirrors: a bad answer moves on to the next; each one that failed is named ----------------

@pytest.fixture
def second(template):
    server = HostileMirror(template.repo)
    yield server
    server.stop()


def two_mirrors(world, second):
    world.host("init", world.mirror.url, second.url, "--branch", "web", "--signers", world.keys.signers,
               "--force", *SLOW, expect="ok")


def warnings(proc):
    return [line for line in proc.err.splitlines() if line.startswith("isconf: warning: ")]


@pytest.mark.parametrize("behaviour,fragment", [
    ("tail", "entry 3 has missing fields"),
    (("status", 503), "server answered 503"),
    ("truncate", "connection closed after"),
], ids=["refused", "error status", "cut short"])
def test_a_good_second_mirror_wins_and_the_first_is_warned_of(world, second, behaviour, fragment):
    world.bring_to_seq_2()
    two_mirrors(world, second)
    if behaviour == "tail":
        serve_tail(world, b'{"kind":[]}')
    else:
        world.mirror.behave[HEAD] = behaviour
    proc = world.host("up", expect="ok")
    assert os.path.exists(world.host.path("/tmp/four"))
    line, = warnings(proc)
    assert line.startswith("isconf: warning: mirror %s: " % world.mirror.url) and fragment in line, line
    assert "error" not in proc.err


def test_when_every_mirror_refuses_the_first_refusal_is_the_error_and_the_others_warnings(world, second):
    two_mirrors(world, second)
    world.mirror.behave[HEAD] = "html"
    second.replace[SIG] = None
    proc = world.host("up", expect="refused")
    assert "signature does not verify" in error_line(proc) and world.mirror.url in error_line(proc)
    line, = warnings(proc)
    assert line.startswith("isconf: warning: mirror %s: " % second.url) and "has no head.sig" in line
    assert not os.path.exists(world.host.path("/etc/motd"))


def test_a_refusal_outweighs_an_unreachable_mirror(world, second):
    # Exit 4, not 3: one mirror answered, and its answer was a lie.
    two_mirrors(world, second)
    world.mirror.behave[HEAD] = ("status", 500)
    second.behave[HEAD] = "html"
    proc = world.host("up", expect="refused")
    assert second.url in error_line(proc) and "signature does not verify" in error_line(proc)
    line, = warnings(proc)
    assert line.startswith("isconf: warning: mirror %s: " % world.mirror.url) and "500" in line


def test_when_no_mirror_answers_the_run_is_unreachable_and_each_is_named(world, second):
    two_mirrors(world, second)
    world.mirror.behave[HEAD] = ("status", 500)
    second.behave[HEAD] = ("status", 502)
    proc = world.host("up", expect="unreachable")
    assert "no mirror could be reached" in error_line(proc) and second.url in error_line(proc)
    line, = warnings(proc)
    assert line.startswith("isconf: warning: mirror %s: " % world.mirror.url) and "500" in line
