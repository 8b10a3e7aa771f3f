"""URLs and HTTP: no credentials in a mirror URL, ever printed; interim 1xx answers skipped; numbers and times
in ASCII digits only, wherever a user or a mirror can write them."""

import argparse
import os
import re

import pytest

from conftest import error_line
from hostile import HEAD, HostileMirror

SECRET = "s3cret-pw"
NON_ASCII_DIGITS = ["\uff11\uff12", "\u0661\u0662", "12\u0663", "\u00b2", "1_2"]   # int() takes all but the 2nd-last


# --- credentials in a mirror URL --------------------------------------------------------------

CREDENTIAL_URLS = ["http://alice:%s@127.0.0.1:1/" % SECRET, "https://alice:%s@example.org/repo" % SECRET,
                   "file://alice:%s@/srv/isconf" % SECRET, "http://%s@127.0.0.1:1/" % SECRET,
                   "http://a:%s@b@127.0.0.1:1/" % SECRET]


def no_secret_under(root):
    for top, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(top, name), "rb") as f:
                assert SECRET.encode() not in f.read(), os.path.join(top, name)


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
@pytest.mark.parametrize("position", ["first", "second"])
def test_a_mirror_url_with_a_user_or_password_is_refused_at_init_without_showing_it(host, url, position):
    urls = [url, "http://127.0.0.1:1/"] if position == "first" else ["http://127.0.0.1:1/", url]
    proc = host("init", *urls, "--branch", "web", "--insecure", expect="usage")
    assert "holds a user name or password" in error_line(proc)
    assert SECRET not in proc.out + proc.err
    assert not os.path.exists(host.path("/etc/isconf/isconf.conf"))


@pytest.mark.parametrize("url", ["file://srv/isconf", "file://mirror.example/srv/isconf"])
def test_a_file_url_naming_a_host_is_refused_never_read_as_another_directory(host, url):
    # file://srv/isconf is host 'srv' and the directory /isconf: an admin meant /srv/isconf
    said = error_line(host("init", url, "--branch", "web", "--insecure", expect="usage"))
    assert "a file:// URL is a local directory, three slashes before its path" in said, said
    assert not os.path.exists(host.path("/etc/isconf/isconf.conf"))
    host("init", "file:///srv/isconf", "--branch", "web", "--insecure", expect="ok")
    with open(host.path("/etc/isconf/isconf.conf")) as f:
        text = f.read()
    with open(host.path("/etc/isconf/isconf.conf"), "w") as f:
        f.write(text.replace("file:///srv/isconf", url))
    said = error_line(host("status", expect="state"))
    assert "line 4: mirror %r names a host" % url in said, said


def test_a_config_edited_to_hold_a_password_is_refused_and_the_password_never_shown(host):
    host.init("http://127.0.0.1:1/", None, "--metrics", "/var/lib/node/isconf.prom")
    config = host.path("/etc/isconf/isconf.conf")
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(text.replace("http://127.0.0.1:1/", "/srv/isconf\n    https://bob:%s@127.0.0.1:1/" % SECRET))
    for verb in (["up"], ["status"], ["up", "--dry-run"], ["verify"]):
        proc = host(*verb, expect="state")
        assert "holds a user name or password" in error_line(proc) and SECRET not in proc.out + proc.err, verb
    os.unlink(config)
    no_secret_under(host.root)   # last-run, history, metrics: nowhere


def test_a_redirect_to_a_url_with_a_password_is_not_followed_nor_shown(world):
    world.mirror.behave[HEAD] = ("redirect", "http://bob:%s@127.0.0.1:1/branches/web/head" % SECRET)
    proc = world.host("up", expect="unreachable", timeout=60)
    assert "without a user or password" in proc.err and SECRET not in proc.out + proc.err
    no_secret_under(world.host.root)


def test_the_one_redaction_hides_any_userinfo(isconf):
    for url in CREDENTIAL_URLS + ["alice:%s@host/x" % SECRET, "//alice:%s@host/x" % SECRET]:
        assert SECRET not in isconf.redact_url(url) and "***@" in isconf.redact_url(url), url
    for url in ["http://127.0.0.1/a@b", "/srv/isconf@2", "file:///srv/a@b"]:
        assert isconf.redact_url(url) == url


# --- interim 1xx answers ----------------------------------------------------------------------

class InterimMirror(HostileMirror):
    """A HostileMirror that sends `interim` (bytes) before every answer."""

    interim = b""

    def _send(self, conn, status, body, headers=(), length=-1):
        conn.sendall(self.interim)
        return super(InterimMirror, self)._send(conn, status, body, headers, length)


@pytest.fixture
def mirror(template):
    server = InterimMirror(template.repo)
    yield server
    server.stop()


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"


@pytest.mark.parametrize("interim", [
    EARLY_HINTS,
    b"HTTP/1.1 100 Continue\r\n\r\n" + EARLY_HINTS + b"HTTP/1.1 102 Processing\r\n\r\n",
    EARLY_HINTS * 10,                                                   # as many as are skipped
    b"HTTP/1.1 199 Whatever\r\n" + b"X-Hint: y\r\n" * 90 + b"\r\n",     # headers of its own, within bounds
], ids=["103", "100-103-102", "ten", "headers"])
def test_interim_answers_before_the_answer_are_skipped(world, interim):
    world.mirror.interim = interim
    world.serve_version(4)
    world.host("up", expect="ok", timeout=60)
    assert os.path.exists(world.host.path("/tmp/four"))


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",   # no interim answer: another protocol
    EARLY_HINTS * 11,                                                   # past the bound
    b"HTTP/1.1 103 Early Hints\r\n" + b"Link: <x>\r\n" * 101 + b"\r\n",  # headers past the bound
    b"HTTP/1.1 103 Early Hints\r\nLink: " + b"x" * 70000 + b"\r\n\r\n",  # a header line past the bound
], ids=["101", "eleven", "many-headers", "long-header"])
def test_a_switch_of_protocol_or_interim_answers_past_their_bounds_fail_the_mirror(world, interim):
    world.mirror.interim = interim
    world.serve_version(4)
    proc = world.host("up", expect="unreachable", timeout=60)
    assert not os.path.exists(world.host.path("/tmp/four")), proc.err


# --- ASCII digits only --------------------------------------------------------------------------

@pytest.mark.parametrize("text", NON_ASCII_DIGITS)
def test_a_number_not_in_ascii_digits_is_refused_by_every_parser(isconf, text):
    assert isconf.ascii_number(text) is None
    assert isconf.parse_content_length(text) is None
    with pytest.raises(isconf.Refused):
        isconf.parse_content_range("bytes %s-20/30" % text, 12, "x")
    with pytest.raises(isconf.Refused):
        isconf.parse_time("2026-01-01T00:%s:00Z" % text)
    with pytest.raises(ValueError):
        isconf.parse_positive(text, int, "retries", 100)
    with pytest.raises(argparse.ArgumentTypeError):
        isconf.whole_number(text)
    with pytest.raises(argparse.ArgumentTypeError):
        isconf.real_number(text)
    with pytest.raises(isconf.UsageError):
        isconf.parse_duration(text + "d")


@pytest.mark.parametrize("text", NON_ASCII_DIGITS + ["+12", " 12", "12 ", "-1", "0x12", "1e3"])
def test_a_header_number_is_plain_ascii_digits_or_nothing(isconf, text):
    assert isconf.ascii_number(text) is None and isconf.parse_content_length(text) is None


@pytest.mark.parametrize("text", ["\uff11\uff12", "\u0661\u0662", "12\u0663"])
@pytest.mark.parametrize("option", ["--timeout", "--deadline", "--retries", "--exec-timeout", "--interrupted-max",
                                    "--baseline"])
def test_an_init_option_not_in_ascii_digits_is_refused(host, option, text):
    proc = host("init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", option, text, expect="usage")
    assert not os.path.exists(host.path("/etc/isconf/isconf.conf")), proc.err


@pytest.mark.parametrize("text", ["\uff11\uff12", "\u0661\u0662", "12\u0663"])
@pytest.mark.parametrize("key", ["timeout", "deadline", "retries", "exec_timeout", "interrupted_max", "boot_wait"])
def test_a_config_number_not_in_ascii_digits_is_refused(host, key, text):
    host.init("http://127.0.0.1:1/", None)
    path = host.path("/etc/isconf/isconf.conf")
    with open(path, encoding="utf-8") as f:
        config = f.read()
    config = re.sub(r"(?m)^\[isconf\]$", "[isconf]\n%s = %s" % (key, text), config)
    with open(path, "w", encoding="utf-8") as f:
        f.write(config)
    assert key in error_line(host("up", expect="state"))


@pytest.mark.parametrize("verb", [["log", "-n"], ["skip", "-m", "why"]])
@pytest.mark.parametrize("text", ["\uff11\uff12", "\u0661\u0662", "12\u0663"])
def test_a_verb_argument_not_in_ascii_digits_is_refused(host, verb, text):
    host.init("http://127.0.0.1:1/", None)
    host(*(verb + [text]), expect="usage")


class StrictMirror(HostileMirror):
    """A HostileMirror whose every answer is spelt by `spell` (a function of the whole answer's bytes)."""

    spell = staticmethod(lambda answer: answer)

    def _send(self, conn, status, body, headers=(), length=-1):
        sent = []
        real = conn.sendall
        conn_sendall = conn.sendall

        class Capture(object):
            def sendall(self, data):
                sent.append(data)
        super(StrictMirror, self)._send(Capture(), status, body, headers, length)
        conn_sendall(self.spell(b"".join(sent)))
        del real


@pytest.mark.parametrize("spell", [
    lambda a: a.replace(b"HTTP/1.1 200 ", b"HTTP/1.1 2_00 ", 1),                    # int() takes '_'
    lambda a: a.replace(b"HTTP/1.1 200 ", b"HTTP/1.1 +200 ", 1),
    lambda a: re.sub(br"Content-Length: (\d+)\r\n\r\n", lambda m: b"Transfer-Encoding: chunked\r\n\r\n"
                     + (b"%x" % int(m.group(1))).replace(b"", b"_")[1:-1] + b"\r\n" + a.split(b"\r\n\r\n", 1)[1]
                     + b"\r\n0\r\n\r\n", a, 1),                                    # a chunk size '1_a'
], ids=["status-underscore", "status-plus", "chunk-size-underscore"])
def test_a_mirror_answer_with_a_number_int_would_take_is_refused(template, host, keys, busybox_root, spell):
    server = StrictMirror(template.repo)
    server.spell = staticmethod(spell)
    try:
        busybox_root(host.root)
        host.init(server.url, keys, "--timeout", "2", "--deadline", "5", "--retries", "1")
        proc = host("up", timeout=60)
        assert proc.returncode in (3, 4), proc.err
    finally:
        server.stop()

