"""The author's easy path is the safe one: nothing unsigned by accident, clear hints for slips."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

from conftest import AUTHOR_STATE, ISCONF, Author, Server, agent_for_nobody, error_line, run_isconf, source_tree


def test_ci_without_a_key_is_refused_and_publishes_nothing(author):
    author("lock", "-m", "x")
    author("reboot")
    line = error_line(author("ci", expect="usage"))
    assert "needs a signing key" in line and "--unsigned" in line
    assert not os.path.exists(author.path("head")) and not os.path.exists(author.path("journal"))
    assert "(UNSIGNED)" in author("ci", "--unsigned").out
    assert os.path.exists(author.path("head")) and not os.path.exists(author.path("head.sig"))


def test_ci_takes_its_key_from_the_environment(author, keys):
    author("lock", "-m", "x")
    author("reboot")
    author("ci", env={"ISCONF_SIGN_KEY": keys.private})
    assert os.path.exists(author.path("head.sig"))


def test_unsigned_and_a_key_together_are_a_usage_error(author, keys):
    author("lock", "-m", "x")
    author("reboot")
    assert "contradict" in error_line(author("ci", "--unsigned", "--sign", keys.private, expect="usage"))


def test_fork_without_a_key_is_refused(author):
    author.commit(["reboot"])
    assert "needs a signing key" in error_line(author("fork", "canary", expect="usage"))
    assert not os.path.exists(os.path.join(author.repo, "branches", "canary"))
    author("fork", "canary", "--unsigned")
    assert os.path.exists(os.path.join(author.repo, "branches", "canary", "head"))


def test_sign_renews_the_expiry_without_a_new_entry(author, server, keys, host):
    author.commit(["reboot"], why="first")
    journal = author.journal()
    old = json.loads(open(author.path("head")).read())
    author("sign", "--sign", keys.private, "--expires", "30d")
    new = json.loads(open(author.path("head")).read())
    assert (new["seq"], new["id"], new["length"]) == (old["seq"], old["id"], old["length"])
    assert "expires" in new and "expires" not in old
    assert author.journal() == journal
    host.init(server.url, keys)
    host("up", expect="reboot")  # the renewed head verifies on a host


def test_sign_repairs_an_unsigned_publication(tmp_path, keys, host, busybox_root):
    unsigned = Author(str(tmp_path / "repo"))  # no keys: commits with --unsigned
    unsigned.commit(["exec", "--no-run", "--", "/bin/true"])
    s = Server(unsigned.repo, str(tmp_path / "access.log"))
    busybox_root(host.root)
    try:
        host.init(s.url, keys, "--retries", "1")
        assert "no head.sig" in error_line(host("up", expect="refused"))
        assert "--adopt 1" in error_line(unsigned("sign", "--sign", keys.private, expect="refused"))
        unsigned("sign", "--sign", keys.private, "--adopt", "1", env={"ISCONF_SIGNERS": keys.signers})
        host("up", expect="ok")  # verified now, and applied
        assert (host.status()["head_seq"], host.status()["applied_seq"]) == (1, 1)
    finally:
        s.stop()


def test_sign_of_a_branch_that_does_not_exist_is_refused(author, keys):
    assert "does not exist" in error_line(author("sign", "--sign", keys.private, expect="usage"))


def test_init_requires_branch_even_with_isconf_branch_set(tmp_path):
    proc = run_isconf("--root", str(tmp_path), "init", "http://127.0.0.1:1/", "--insecure",
                      env={"ISCONF_BRANCH": "web"}, expect="usage")
    assert "init needs --branch NAME" in error_line(proc)
    assert not os.path.exists(str(tmp_path / "etc/isconf/isconf.conf"))


def test_insecure_with_signers_is_a_usage_error(tmp_path, keys):
    proc = run_isconf("--root", str(tmp_path), "init", "http://127.0.0.1:1/", "--branch", "web", "--insecure",
                      "--signers", keys.signers, expect="usage")
    assert "contradict" in error_line(proc)


def test_a_pub_file_given_as_signers_gets_the_line_to_write(tmp_path, keys):
    proc = run_isconf("--root", str(tmp_path), "init", "http://127.0.0.1:1/", "--branch", "web",
                      "--signers", keys.public, expect="usage")
    line = error_line(proc)
    key = " ".join(keys.public_line.split()[:2])
    assert keys.public in line and "not an allowed_signers line" in line and "admin@example " + key in line


def test_a_missing_signers_file_is_named(tmp_path):
    missing = str(tmp_path / "no-such-signers")
    proc = run_isconf("--root", str(tmp_path), "init", "http://127.0.0.1:1/", "--branch", "web",
                      "--signers", missing, expect="usage")
    assert missing in error_line(proc)


def test_skip_with_an_empty_reason_is_refused(tmp_path):
    run_isconf("--root", str(tmp_path), "init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    assert "needs a reason" in error_line(run_isconf("--root", str(tmp_path), "skip", "1", "-m", " ",
                                                      expect="usage"))


@pytest.mark.parametrize("path", ["/authoring/web/lock", "/authoring/web/staged", "/isconf-repo",
                                  "/./authoring/web/lock", "/%2e/authoring/web/lock", "/./isconf-repo",
                                  "//authoring/web/lock", "/branches/../authoring/web/lock", "/linked/web/lock"])
def test_serve_keeps_the_authoring_area_and_marker_private(author, server, path):
    author.commit(["reboot"])
    author("lock", "-m", "secret plans")
    author("reboot")
    os.symlink("authoring", os.path.join(author.repo, "linked"))
    url = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("GET", path)  # sent as written: no client normalises it
        response = conn.getresponse()
        assert (response.status, response.read()) == (404, b"")
        conn.request("GET", "/branches/web/journal")
        assert conn.getresponse().status == 200  # what hosts need is still served
    finally:
        conn.close()


def test_serve_on_a_port_in_use_says_so(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        proc = run_isconf("serve", str(tmp_path), "--port", str(taken.getsockname()[1]), expect="usage")
        assert "in use" in error_line(proc)
    finally:
        taken.close()


SKEWED = """
import sys, time
sys.path.insert(0, sys.argv[1])
import isconf
real = time.time
time.time = lambda: real() + 365 * 86400   # this author's clock runs a year fast
sys.exit(isconf.main(sys.argv[2:]))
"""


def test_a_head_dated_by_a_fast_clock_does_not_make_later_heads_look_expired(author, server, keys, host):
    author("lock", "-m", "from a machine with a fast clock")
    author("reboot")
    subprocess.run([sys.executable, "-I", "-c", SKEWED, os.path.dirname(ISCONF), "--repo", author.repo, "--branch",
                    "web", "ci", "--sign", keys.private], check=True, env={"ISCONF_AUTHOR": "alice@example",
                                                                          "PATH": os.environ["PATH"],
                                                                          "ISCONF_SIGNERS": keys.signers,
                                                                          "XDG_STATE_HOME": AUTHOR_STATE})
    host.init(server.url, keys)
    host("up", expect="reboot")
    author("lock", "-m", "from a machine with a good clock")
    author("reboot")
    ci = author.ci("--expires", "30d")
    assert "ahead of this machine's clock" in ci.err
    head = json.loads(open(author.path("head")).read())
    skewed_time = head["time"]
    assert head["expires"] > skewed_time  # 30 days after the head's own time, not after this clock's now
    assert "expired" not in host("up", "-r").err


def test_ci_refuses_a_snap_whose_object_left_the_repository(author, tmp_path):
    src = source_tree(tmp_path, "/etc/motd", "hello\n")
    author("lock", "-m", "x")
    author("--root", src, "snap", "/etc/motd")
    for name in os.listdir(os.path.join(author.repo, "objects")):
        os.unlink(os.path.join(author.repo, "objects", name))
    line = error_line(author.ci(expect="refused"))
    assert "for /etc/motd is missing" in line and "nothing written" in line
    assert not os.path.exists(author.path("head"))


def test_ci_warns_when_the_new_head_drops_an_expiry(author):
    author.commit(["reboot"])
    author("lock", "-m", "x")
    author("reboot")
    author.ci("--expires", "30d")
    author("lock", "-m", "y")
    author("reboot")
    assert "never expires" in author.ci().err


def test_an_author_name_with_control_characters_is_refused(author):
    proc = author("lock", "-m", "x", env={"ISCONF_AUTHOR": "bob\x1b[31m"}, expect="usage")
    assert "ISCONF_AUTHOR" in error_line(proc)


def test_unlock_force_prints_the_other_authors_words_escaped(author):
    author("lock", "-m", "plans\x1b[2J")
    proc = author("unlock", "--force", env={"ISCONF_AUTHOR": "bob@example"})
    assert "\x1b" not in proc.err and "plans\\x1b[2J" in proc.err


def test_serve_logs_a_hostile_request_line_escaped(author, server):
    url = urllib.parse.urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"GET /\x1b[31mred HTTP/1.0\r\nRange: bytes=\x1b[2J\r\n\r\n")
        s.recv(4096)
    deadline = time.time() + 10
    while "red" not in server.log_text() and time.time() < deadline:
        time.sleep(0.05)
    assert "\\x1b[31mred" in server.log_text() and "\x1b" not in server.log_text()


def test_verify_sig_with_a_missing_signers_file_is_a_usage_error_naming_it(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "file.sig").write_bytes(b"x")
    proc = run_isconf("verify-sig", str(tmp_path / "file"), "--signature", str(tmp_path / "file.sig"), "--signers",
                      str(tmp_path / "nope"), expect="usage")
    assert str(tmp_path / "nope") in error_line(proc)


def test_an_author_who_cannot_read_the_host_config_runs_exec_without_its_env(author, tmp_path):
    # The host config is 0600 (it holds [env] secrets); a non-root author may still try a command.
    root = tmp_path / "root"
    root.mkdir()
    run_isconf("--root", str(root), "init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    agent = agent_for_nobody(tmp_path)
    os.chmod(author.repo, 0o777)
    for top, dirs, files in os.walk(author.repo):
        for name in dirs + files:
            os.chmod(os.path.join(top, name), 0o777)
    state = tmp_path / "nobody-state"
    state.mkdir(mode=0o700)
    os.chown(str(state), 65534, 65534)
    env = {"ISCONF_AUTHOR": "nobody@example", "XDG_STATE_HOME": str(state)}
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                           agent, "--root", "/", "--config", str(root / "etc/isconf/isconf.conf"), "--repo",
                           author.repo, "lock", "-m", "x"], env=dict(env, PATH=os.environ["PATH"]),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 2 and b"--branch" in proc.stderr  # the host's branch cannot be read: say so
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                           agent, "--root", "/", "--config", str(root / "etc/isconf/isconf.conf"), "--repo",
                           author.repo, "--branch", "web", "lock", "--new", "-m", "x"],
                          env=dict(env, PATH=os.environ["PATH"]),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                           agent, "--root", "/", "--config", str(root / "etc/isconf/isconf.conf"), "--repo",
                           author.repo, "--branch", "web", "exec", "--", "/bin/true"],
                          env=dict(env, PATH=os.environ["PATH"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr
    assert b"without the host's [env] variables" in proc.stderr
