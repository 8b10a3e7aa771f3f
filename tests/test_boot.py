"""At boot and from cron: up --boot waits for the repository, syslog, --splay, install and uninstall."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ISCONF, Keys, source_tree

UNIT_DIR = "/etc/systemd/system"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(directory, port, log):
    """`isconf serve` on a port the agent was already told about."""
    proc = subprocess.Popen([sys.executable, "-I", ISCONF, "serve", directory, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), stdin=subprocess.DEVNULL)
    return proc


def up_boot(host, *args):
    """`up --boot` started in the background, as init starts it."""
    return subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up", "--boot"] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8"})


def test_boot_waits_for_a_repository_that_comes_up_late(author, host, tmp_path):
    author.commit(["--root", source_tree(tmp_path, "/etc/motd", "booted\n"), "snap", "/etc/motd"])
    port = free_port()
    host.init("http://127.0.0.1:%d/" % port, author.keys)
    agent = up_boot(host, "--boot-wait", "60")
    time.sleep(1.5)  # the agent has found nothing there and is backing off
    server = start_server(author.repo, port, str(tmp_path / "access.log"))
    try:
        out, err = agent.communicate(timeout=90)
    finally:
        server.terminate()
        server.wait(10)
    assert agent.returncode == 0, err
    assert b"waiting up to 60 s for a mirror" in err
    with open(host.path("/etc/motd")) as f:
        assert f.read() == "booted\n"


def test_boot_gives_up_after_boot_wait_with_unreachable(author, host):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init("http://127.0.0.1:%d/" % free_port(), author.keys, "--boot-wait", "2")
    proc = host("up", "--boot", expect="unreachable", timeout=60)
    assert "no mirror could be reached" in proc.err
    assert "waiting up to 2 s" in proc.err  # it did wait, from the config's boot_wait


def test_boot_does_not_retry_a_refusal(author, host, server, tmp_path):
    # The host trusts another key: the head is refused, and asking again does not cure that.
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    stranger = Keys(str(tmp_path / "stranger"))
    host.init(server.url, stranger)
    host("up", "--boot", "--boot-wait", "30", expect="refused", timeout=60)
    heads = [line for line in server.requests() if "/head " in line]
    assert len(heads) == 1, heads


@pytest.fixture
def syslog_socket(host):
    """A datagram socket bound at ROOT/dev/log, standing in for the host's syslog."""
    os.makedirs(host.path("/dev"), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(host.path("/dev/log"))
    sock.settimeout(0)
    yield sock
    sock.close()


def received(sock):
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode())
        except BlockingIOError:
            return lines


def test_boot_logs_to_syslog_inside_the_root(author, host, server, syslog_socket):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, None)
    host("up", "--boot", "--boot-wait", "3", expect="failed")  # /bin/true is not in this empty root
    lines = received(syslog_socket)
    assert any(l.startswith("<27>") and " isconf[" in l and "[1/1] exec /bin/true ... failed" in l for l in lines), lines
    assert any(l.startswith("<27>") and "error: transaction 1 failed" in l and "(exit 1)" in l for l in lines), lines


def test_under_systemd_with_output_to_the_journal_nothing_is_sent_twice(author, host, server, syslog_socket,
                                                                          tmp_path):
    # systemd names the stream it connected to the journal in $JOURNAL_STREAM (device:inode).
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, None)
    with open(str(tmp_path / "journal-stream"), "w+") as out:
        st = os.fstat(out.fileno())
        proc = subprocess.run([sys.executable, "-I", ISCONF, "--root", host.root, "up", "--syslog"], stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={"PATH": os.environ["PATH"], "JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)})
        out.seek(0)
        assert proc.returncode == 1 and "[1/1] exec /bin/true ... failed" in out.read()
    assert received(syslog_socket) == []


def test_syslog_is_followed_through_links_inside_the_root(author, host, server, tmp_path):
    # Debian's /dev/log is a link to /run/systemd/journal/dev-log: followed inside the root, never out of it.
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, None)
    os.makedirs(host.path("/run/systemd/journal"))
    os.makedirs(host.path("/dev"))
    os.symlink("/run/systemd/journal/dev-log", host.path("/dev/log"))
    inside = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inside.bind(host.path("/run/systemd/journal/dev-log"))
    inside.settimeout(0)
    try:
        host("up", "--syslog", expect="failed")
        assert any("[1/1] exec /bin/true ... failed" in l for l in received(inside))
    finally:
        inside.close()


def test_no_syslog_is_no_error(author, host, server):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, None)
    os.makedirs(host.path("/dev"))
    with open(host.path("/dev/log"), "w") as f:
        f.write("not a socket\n")
    proc = host("up", "--boot", "--boot-wait", "3", expect="failed")
    assert "[1/1] exec /bin/true ... failed" in proc.out


def test_splay_is_a_stable_part_derived_from_the_machine_id(isconf):
    a = isconf.splay_delay(b"0123456789abcdef0123456789abcdef\n", 600)
    assert a == isconf.splay_delay(b"0123456789abcdef0123456789abcdef", 600)  # the newline is not the id
    assert 0 <= a < 600
    others = set(isconf.splay_delay(("%032x" % i).encode(), 600) for i in range(200))
    assert len(others) == 200 and min(others) < 60 and max(others) > 540  # spread over the whole range


def test_machine_id_is_read_inside_the_root(isconf, host, tmp_path):
    os.makedirs(host.path("/etc"))
    with open(host.path("/etc/machine-id"), "w") as f:
        f.write("feedfacefeedfacefeedfacefeedface\n")
    assert isconf.machine_id(isconf.Host(host.root)) == b"feedfacefeedfacefeedfacefeedface"
    # A link out of the root is taken inside it, as a chroot would.
    outside = tmp_path / "outside-id"
    outside.write_text("outside\n")
    os.unlink(host.path("/etc/machine-id"))
    os.symlink(str(outside), host.path("/etc/machine-id"))
    assert isconf.machine_id(isconf.Host(host.root)) != b"outside"


def test_up_splay_runs(author, host, server):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, None)
    host("up", "--dry-run", "--splay", "0.5", expect="pending")
    host("up", "--splay", "-1", expect="usage")


# install and uninstall

SYSTEMD_FILES = {"/usr/local/sbin/isconf": 0o755, UNIT_DIR + "/isconf.service": 0o644,
                 UNIT_DIR + "/isconf-update.service": 0o644, UNIT_DIR + "/isconf-update.timer": 0o644}
SYSTEMD_LINKS = {UNIT_DIR + "/multi-user.target.wants/isconf.service": UNIT_DIR + "/isconf.service",
                 UNIT_DIR + "/timers.target.wants/isconf-update.timer": UNIT_DIR + "/isconf-update.timer"}
SYSV_FILES = {"/usr/local/sbin/isconf": 0o755, "/etc/init.d/isconf": 0o755, "/etc/cron.d/isconf": 0o644}
SYSV_LINKS = dict(("/etc/rc%d.d/S20isconf" % n, "../init.d/isconf") for n in (2, 3, 4, 5))


def tree(root):
    """Every file and link under root (state directory aside) with content or target, mode and mtime."""
    seen = {}
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(top, d) != os.path.join(root, "var/lib/isconf")
                   and os.path.join(top, d) != os.path.join(root, "lib/systemd")]
        for name in files:
            p = os.path.join(top, name)
            st = os.lstat(p)
            if os.path.islink(p):
                seen["/" + os.path.relpath(p, root)] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as f:
                    seen["/" + os.path.relpath(p, root)] = (st.st_mode, f.read(), st.st_mtime_ns, st.st_ino)
    return seen


def test_install_writes_the_systemd_units_by_default_where_there_is_systemd(systemd_root):
    host = systemd_root
    host("install", expect="ok")
    with open(ISCONF, "rb") as f:
        agent = f.read()
    found = tree(host.root)
    assert set(found) == set(SYSTEMD_FILES) | set(SYSTEMD_LINKS)
    for path, mode in SYSTEMD_FILES.items():
        assert found[path][0] & 0o7777 == mode, path
    for path, target in SYSTEMD_LINKS.items():
        assert found[path] == ("link", target)
    assert found["/usr/local/sbin/isconf"][1] == agent
    unit = found[UNIT_DIR + "/isconf.service"][1].decode()
    assert "ExecStart=/usr/local/sbin/isconf up -r --boot\n" in unit
    assert "After=network-online.target\n" in unit and "Wants=network-online.target\n" in unit
    assert "TimeoutStartSec=%d\n" % (300 + 3600) in unit
    assert "StandardOutput=journal+console\n" in unit
    timer = found[UNIT_DIR + "/isconf-update.timer"][1].decode()
    for key in ("OnBootSec=", "OnUnitInactiveSec=", "RandomizedDelaySec=", "AccuracySec=", "Persistent=true"):
        assert key in timer


def test_systemd_analyze_verify_accepts_the_units(systemd_root):
    host = systemd_root
    host("install", expect="ok")
    units = [UNIT_DIR + "/" + name for name in ("isconf.service", "isconf-update.service", "isconf-update.timer")]
    proc = subprocess.run(["systemd-analyze", "verify", "--root=" + host.root] + units,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout == b"", proc.stdout.decode()  # not even a warning


def test_boot_unit_timeout_follows_boot_wait(author, systemd_root):
    host = systemd_root
    host.init("http://127.0.0.1:9/", None, "--boot-wait", "120")
    host("install", "--systemd", expect="ok")
    with open(host.path(UNIT_DIR + "/isconf.service")) as f:
        assert "TimeoutStartSec=%d\n" % (120 + 3600) in f.read()


def test_install_writes_sysv_script_links_and_cron_without_systemd(host):
    host("install", expect="ok")
    found = tree(host.root)
    assert set(found) == set(SYSV_FILES) | set(SYSV_LINKS)
    for path, mode in SYSV_FILES.items():
        assert found[path][0] & 0o7777 == mode, path
    for path, target in SYSV_LINKS.items():
        assert found[path] == ("link", target)
    script = found["/etc/init.d/isconf"][1].decode()
    assert script.startswith("#!/bin/sh\n### BEGIN INIT INFO\n") and "### END INIT INFO\n" in script
    assert "start) /usr/local/sbin/isconf up -r --boot ;;" in script
    assert "--splay" in found["/etc/cron.d/isconf"][1].decode()
    proc = subprocess.run(["/bin/sh", "-n", host.path("/etc/init.d/isconf")])
    assert proc.returncode == 0


@pytest.mark.parametrize("options", [[], ["--systemd", "--timer", "--sysv", "--cron"]])
def test_second_install_changes_nothing(systemd_root, options):
    host = systemd_root
    host("install", *options, expect="ok")
    before = tree(host.root)
    with open(host.state("installed"), "rb") as f:
        manifest = f.read()
    mtime = os.stat(host.state("installed")).st_mtime_ns
    proc = host("install", *options, expect="ok")
    assert "nothing changed" in proc.out
    assert tree(host.root) == before  # same bytes, same mtimes, same inodes
    with open(host.state("installed"), "rb") as f:
        assert f.read() == manifest
    assert os.stat(host.state("installed")).st_mtime_ns == mtime


def test_install_repairs_a_changed_unit(systemd_root):
    host = systemd_root
    host("install", expect="ok")
    path = host.path(UNIT_DIR + "/isconf.service")
    with open(path) as f:
        good = f.read()
    with open(path, "w") as f:
        f.write("[Unit]\n")
    host("install", expect="ok")
    with open(path) as f:
        assert f.read() == good


def test_uninstall_removes_exactly_what_install_wrote(systemd_root):
    host = systemd_root
    os.makedirs(host.path("/etc/cron.d"))
    with open(host.path("/etc/cron.d/other"), "w") as f:
        f.write("# not isconf's\n")
    before = tree(host.root)
    host("install", "--systemd", "--timer", "--sysv", "--cron", expect="ok")
    host("uninstall", expect="ok")
    assert tree(host.root) == before
    assert not os.path.exists(host.state("installed"))
    host("uninstall", expect="ok")  # twice is nothing


def test_uninstall_keeps_a_changed_file_and_warns(systemd_root):
    host = systemd_root
    host("install", expect="ok")
    with open(host.path(UNIT_DIR + "/isconf.service"), "a") as f:
        f.write("# local change\n")
    proc = host("uninstall", expect="ok")
    assert "isconf.service changed since 'isconf install' wrote it; left in place" in proc.err
    found = tree(host.root)
    assert set(found) == {UNIT_DIR + "/isconf.service"}


def test_install_stays_inside_the_root(host, tmp_path):
    # A hostile image whose /usr/local/sbin leads out of it: the agent lands inside the root all the same.
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(host.path("/usr/local"))
    os.symlink(str(outside), host.path("/usr/local/sbin"))
    host("install", "--sysv", expect="ok")
    assert os.listdir(str(outside)) == []
    assert os.path.isfile(host.path(str(outside) + "/isconf"))


@pytest.mark.parametrize("args", [["--boot-wait", "5"], ["--boot", "--boot-wait", "0"],
                                  ["--boot", "--boot-wait", "nan"], ["--splay", "0"], ["--splay", "1e9"]])
def test_bad_boot_options_are_usage_errors(host, args):
    host.init("http://127.0.0.1:9/", None)
    host("up", *args, expect="usage")
