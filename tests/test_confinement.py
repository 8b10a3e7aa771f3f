"""The host's own files stay inside the root, whatever the target holds.

Every file and directory the agent keeps under the root (the state directory, the config
and the trusted keys) is planted as an absolute link, a climbing relative link, a
dangling link and a FIFO: in the image before 'init', and by a signed transaction during a
run.  Each case ends in exit 7 with one error line (or a correct run that stayed inside the
root), never hangs, and leaves everything outside the root as it was.
"""

import hashlib
import json
import os
import subprocess
import threading
import time

import pytest

from conftest import Host, error_line

RUN_TIMEOUT = 30  # no run comes near this; a FIFO that blocks a run fails the test instead of the suite
MOTD, ISSUE = b"welcome\n", b"second\n"
STATE = "/var/lib/isconf/"


def canon(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha(data):
    return hashlib.sha256(data).hexdigest()


def entry(prev_line, kind, **fields):
    prev = json.loads(prev_line) if prev_line else {"seq": 0}
    fields.update(seq=prev["seq"] + 1, prev=sha(prev_line) if prev_line else "0" * 64, kind=kind,
                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), author="alice@example", message="")
    return canon(fields)


OWNER = {"uid": 0, "gid": 0, "user": "root", "group": "root"}


def snap_file(path, content):
    return dict(OWNER, path=path, type="file", mode=0o644, mtime_ns=1700000000000000000, size=len(content),
                object=sha(content))


def snap_link(path, target):
    return dict(OWNER, path=path, type="symlink", target=target, mtime_ns=1700000000000000000)


def sh(script):
    return {"argv": ["/bin/busybox", "sh", "-c", script], "cwd": "/"}


class Journal(object):
    """A branch 'web' in a directory mirror (a file URL: no server), signed by the real key."""

    def __init__(self, top, keys, bodies):
        self.top, self.lines = top, []
        for kind, fields in bodies:
            self.lines.append(entry(self.lines[-1] if self.lines else None, kind, **fields))
        branch = os.path.join(top, "branches", "web")
        os.makedirs(branch)
        os.makedirs(os.path.join(top, "objects"))
        for content in (MOTD, ISSUE):
            with open(os.path.join(top, "objects", sha(content)), "wb") as f:
                f.write(content)
        with open(os.path.join(branch, "journal"), "wb") as f:
            f.write(b"".join(l + b"\n" for l in self.lines))
        head = canon({"format": 1, "branch": "web", "seq": len(self.lines), "id": sha(self.lines[-1]),
                      "length": sum(len(l) + 1 for l in self.lines),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + b"\n"
        with open(os.path.join(branch, "head"), "wb") as f:
            f.write(head)
        subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", keys.private, "-n", "isconf",
                        os.path.join(branch, "head")], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)

    def log_name(self, seq):
        return "%06d-%s.log" % (seq, sha(self.lines[seq - 1])[:16])


# What the agent keeps, as paths inside the root.  {log} is the log of the journal's last
# transaction, {object} the staged object a later snap needs.
FILES = [STATE + name for name in ("journal", "head", "head.sig", "history", "lock", "baseline", "disabled", "last-run",
                                   "last-success", "state-format", "objects/{object}", "objects/{object}.part",
                                   "logs/{log}")] + ["/etc/isconf/isconf.conf", "/etc/isconf/allowed_signers"]
DIRS = [STATE + "objects", STATE + "logs"]
KINDS = ["absolute", "climbing", "dangling", "fifo"]

# Exit codes of init, up and status (up to the first refusal) with each planted in the image before init,
# whatever its kind: init refuses what it writes or checks itself, up what it reads or writes.
BY_INIT = {STATE + name for name in ("history", "lock", "state-format", "objects", "logs")} | {
    "/etc/isconf/isconf.conf", "/etc/isconf/allowed_signers"}
PLANTED_BEFORE_INIT = {path: [7] if path in BY_INIT else [0, 7] for path in FILES + DIRS}
# Exit codes of up, up and status with each planted by the journal's second transaction, whatever its kind.  The
# first up refuses what it writes after that transaction (its own log, the object of the next snap, the
# records of its end); the next up what it reads or writes at the start; status what it reads. A staging
# name is used only while a run fetches: every run stays correct.  1: status of a host halted at a failure.
PLANTED_DURING_A_RUN = dict(
    [(STATE + name, [0, 7, 0]) for name in ("head.sig", "objects", "logs")]
    + [(STATE + name, [0, 7, 7]) for name in ("journal", "head", "history", "lock", "disabled", "state-format")]
    + [(STATE + name, [7, 7, 7]) for name in ("last-run", "last-success", "logs/{log}")]
    + [(STATE + "baseline", [0, 0, 7]), (STATE + "objects/{object}", [7, 7, 1]),
       (STATE + "objects/{object}.part", [0, 0, 0]),
       ("/etc/isconf/isconf.conf", [0, 7, 7]), ("/etc/isconf/allowed_signers", [0, 7, 0])])
assert sorted(PLANTED_DURING_A_RUN) == sorted(FILES + DIRS)
# A link a snap would put where the host reads its config or trusted keys is refused with the journal (hosts read
# them only as regular files): nothing applied, runs refused, status unharmed.
SNAPPED_LINK_REFUSED = ("/etc/isconf/isconf.conf", "/etc/isconf/allowed_signers")


class Outside(object):
    """What lies outside the root, where a link points: a file, a directory, and a missing name."""

    def __init__(self, top):
        self.top = top
        os.makedirs(os.path.join(top, "victimdir"))
        for path in ("victim", "victimdir/keep"):
            with open(os.path.join(top, path), "wb") as f:
                f.write(b"precious\n")
        self.before = self.snapshot()

    def target(self, kind, is_dir):
        path = os.path.join(self.top, "missing" if kind == "dangling" else "victimdir" if is_dir else "victim")
        return "../" * 24 + path.lstrip("/") if kind == "climbing" else path

    def snapshot(self):
        seen = {}
        for top, dirs, files in os.walk(self.top):
            for name in dirs + files:
                p = os.path.join(top, name)
                st = os.lstat(p)
                with open(p, "rb") if os.path.isfile(p) else open(os.devnull, "rb") as f:
                    seen[os.path.relpath(p, self.top)] = (st.st_mode, st.st_mtime_ns, f.read())
        return seen

    def untouched(self):
        assert self.snapshot() == self.before


def plant(root, path, kind, target):
    """Put a link or a FIFO at path inside root, where the agent keeps a file or directory."""
    full = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    if kind == "fifo":
        os.mkfifo(full)
    else:
        os.symlink(target, full)


def settled(proc):
    """Its exit code; a refusal (7) is one error line naming what is wrong."""
    if proc.returncode == 7:
        line = error_line(proc)
        assert proc.err.strip().splitlines() == [line]
        assert "where isconf keeps a" in line, line  # says what is there, not a bare system error
    return proc.returncode


def expand(path, journal):
    return path.format(object=sha(ISSUE), log=journal.log_name(len(journal.lines)))


@pytest.fixture
def outside(tmp_path):
    return Outside(str(tmp_path / "outside"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", FILES + DIRS)
def test_state_planted_before_init_is_refused_and_nothing_outside_changes(tmp_path, keys, busybox_root, outside,
                                                                          path, kind):
    journal = Journal(str(tmp_path / "mirror"), keys, [
        ("snap", {"files": [snap_file("/etc/motd", MOTD)]}), ("snap", {"files": [snap_file("/etc/issue", ISSUE)]}),
        ("exec", sh("touch /tmp/after"))])
    host = Host(str(tmp_path / "host"))
    busybox_root(host.root)
    planted = expand(path, journal)
    plant(host.root, planted, kind, outside.target(kind, path in DIRS))
    codes = []
    for args in (["init", journal.top, "--branch", "web", "--signers", keys.signers], ["up"], ["status"]):
        codes.append(settled(host(*args, timeout=RUN_TIMEOUT)))
        if codes[-1] == 7:
            break
    assert codes == PLANTED_BEFORE_INIT[path]
    outside.untouched()
    assert os.path.lexists(host.path(planted))  # refused, not replaced


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", FILES + DIRS)
def test_state_planted_by_a_signed_transaction_is_refused_and_nothing_outside_changes(
        tmp_path, keys, busybox_root, outside, path, kind):
    is_dir = path in DIRS
    target = outside.target(kind, is_dir)
    planted = path.format(object=sha(ISSUE), log="$(printf %06d-%s.log $ISCONF_SEQ $(echo $ISCONF_ID | busybox cut -c1-16))")
    if "/logs/$" in planted:  # its own log, then it fails: the agent appends the failure to the log
        script = "rm -f {p} && " + ("busybox mkfifo {p}" if kind == "fifo" else "busybox ln -s {t} {p}") + "; exit 1"
        planting = ("exec", sh(script.format(p=planted, t=target)))
    elif is_dir:  # a directory cannot be snapped over: moved away (kept whole) and replaced
        make = "busybox mkfifo {p}" if kind == "fifo" else "busybox ln -s {t} {p}"
        planting = ("exec", sh(("busybox mv {p} {p}.old && " + make).format(p=planted, t=target)))
    elif kind == "fifo":
        planting = ("exec", sh("rm -f %s && busybox mkfifo %s" % (planted, planted)))
    elif planted.startswith(STATE):  # no snap may write the state (test_privilege); an exec still can
        planting = ("exec", sh("rm -f %s && busybox ln -s %s %s" % (planted, target, planted)))
    else:
        planting = ("snap", {"files": [snap_link(planted, target)]})
    journal = Journal(str(tmp_path / "mirror"), keys, [
        ("snap", {"files": [snap_file("/etc/motd", MOTD)]}), planting,
        ("snap", {"files": [snap_file("/etc/issue", ISSUE)]}), ("exec", sh("touch /tmp/after"))])
    host = Host(str(tmp_path / "host"))
    busybox_root(host.root)
    host("init", journal.top, "--branch", "web", "--signers", keys.signers, expect="ok")
    codes = [settled(host(*args, timeout=RUN_TIMEOUT)) for args in (["up"], ["up"], ["status"])]
    outside.untouched()
    assert codes == ([4, 4, 0] if planting[0] == "snap" and path in SNAPPED_LINK_REFUSED else PLANTED_DURING_A_RUN[path])
    if path.endswith(".part"):  # a staging name is used only while a run fetches: this run stays correct
        assert os.path.exists(host.path("/tmp/after"))


def test_a_fifo_where_a_state_file_belongs_is_never_opened(tmp_path, keys):
    # Opening a FIFO at all would wake a writer waiting on it (and a device could act on being opened).
    host = Host(str(tmp_path / "host"))
    host("init", str(tmp_path), "--branch", "web", "--signers", keys.signers, expect="ok")
    os.mkfifo(host.state("history"))
    opened = []
    writer = threading.Thread(target=lambda: opened.append(os.open(host.state("history"), os.O_WRONLY)))
    writer.start()
    try:
        assert "history is a FIFO where isconf keeps a regular file" in error_line(
            host("status", expect="state", timeout=RUN_TIMEOUT))
        writer.join(0.5)
        assert not opened
    finally:
        os.close(os.open(host.state("history"), os.O_RDONLY | os.O_NONBLOCK))  # lets the writer's open return
        writer.join()
        os.close(opened[-1])


def test_a_state_file_hard_linked_from_outside_the_root_is_never_written(author, server, keys, tmp_path):
    # A hard link planted in the image (same filesystem) would make an append land in the miniroot's file.
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    outside = tmp_path / "miniroot-file"
    outside.write_bytes(b"")  # empty, so it reads as a history: only the write can go wrong
    host = Host(str(tmp_path / "host"))
    host.init(server.url, keys)
    os.link(str(outside), host.state("history"))
    proc = host("up")
    assert proc.returncode == 7 and "hard links" in error_line(proc)
    assert outside.read_bytes() == b""


@pytest.mark.parametrize("where", ["/etc/passwd", "/run/passwd"])
def test_a_fifo_where_the_targets_passwd_belongs_is_never_opened(tmp_path, keys, busybox_root, where):
    # The owner names of a snap come from the target's own passwd and group: only if they are regular files.
    journal = Journal(str(tmp_path / "mirror"), keys, [("snap", {"files": [snap_file("/etc/motd", MOTD)]})])
    host = Host(str(tmp_path / "host"))
    busybox_root(host.root)
    fifo = host.path(where)
    os.makedirs(os.path.dirname(fifo), exist_ok=True)
    os.unlink(host.path("/etc/passwd"))
    if where != "/etc/passwd":
        os.symlink(where, host.path("/etc/passwd"))  # followed inside the root, to what is not a regular file
    os.mkfifo(fifo)
    host("init", journal.top, "--branch", "web", "--signers", keys.signers, expect="ok")
    opened = []
    writer = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)))
    writer.start()
    try:
        host("up", expect="ok", timeout=RUN_TIMEOUT)  # the recorded uid and gid serve instead
        writer.join(0.5)
        assert not opened
        assert open(host.path("/etc/motd"), "rb").read() == MOTD
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer's open return
        writer.join()
        os.close(opened[-1])


@pytest.mark.parametrize("target, why", [("/", "is the root itself"), ("../../..", "is the root itself"),
                                         ("/etc", "holds"), ("/var", "is not empty and holds no isconf state"),
                                         ("/bin", "is not empty and holds no isconf state")])
def test_a_state_directory_leading_to_a_directory_of_the_target_is_refused_before_anything_changes(
        tmp_path, keys, busybox_root, target, why):
    # A var/lib/isconf link planted in the image: isconf would make that directory 0700 and fill it.
    host = Host(str(tmp_path / "host"))
    busybox_root(host.root)
    os.makedirs(host.path("/var/lib"))
    os.symlink(target, host.path(STATE.rstrip("/")))
    before = host.snapshot(), os.stat(host.root).st_mode
    line = error_line(host("init", str(tmp_path), "--branch", "web", "--signers", keys.signers, expect="state"))
    assert host.path(STATE.rstrip("/")) + " leads to " in line and why in line, line
    assert (host.snapshot(), os.stat(host.root).st_mode) == before  # no mode changed, nothing written at all


def test_a_state_directory_swapped_for_a_link_to_the_root_after_init_is_refused_by_up(tmp_path, keys, busybox_root):
    host = Host(str(tmp_path / "host"))
    busybox_root(host.root)
    host("init", str(tmp_path), "--branch", "web", "--signers", keys.signers, expect="ok")
    os.rename(host.state(), host.path("/var/lib/isconf.old"))
    os.symlink("/", host.state())
    before = host.snapshot(), os.stat(host.root).st_mode
    for verb in ("up", "status"):
        assert "is the root itself" in error_line(host(verb, expect="state"))
    assert (host.snapshot(), os.stat(host.root).st_mode) == before


def test_a_state_directory_that_is_a_link_to_an_empty_directory_is_taken(tmp_path, keys, busybox_root):
    host = Host(str(tmp_path / "host"))
    busybox_root(host.root)
    os.makedirs(host.path("/var/lib"))
    os.makedirs(host.path("/srv/isconf-state"))
    os.symlink("/srv/isconf-state", host.path(STATE.rstrip("/")))
    host("init", str(tmp_path), "--branch", "web", "--signers", keys.signers, expect="ok")
    assert sorted(os.listdir(host.path("/srv/isconf-state"))) == ["lock", "logs", "objects", "state-format"]
    assert os.stat(host.path("/srv/isconf-state")).st_mode & 0o777 == 0o700
