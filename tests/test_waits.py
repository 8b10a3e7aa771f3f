"""A deadline on every wait: a file-share mirror reads regular files only, and a share that hangs in the
kernel (a dead network file system) ends at the deadline like a slow server; the next mirror is tried."""

import glob
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading

import pytest

from conftest import ISCONF, error_line, source_tree, undated

RUN_TIMEOUT = 120   # generous: no run comes near it; one that waits on a hung share for ever fails instead


def in_thread(call, seconds=60):
    """call() in a thread, joined for at most seconds: what it returned or raised, or 'still waiting'."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as e:   # noqa: B902 - what it raised is the point
            outcome.append(e)
    thread = threading.Thread(target=run)
    thread.daemon = True
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else "still waiting"


def plant(path, kind):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "character device":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))   # /dev/null's numbers
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        return sock
    elif kind == "link to a FIFO":
        os.mkfifo(path + ".fifo")
        os.symlink(os.path.basename(path) + ".fifo", path)
    return None


@pytest.mark.parametrize("kind", ["FIFO", "character device", "socket", "link to a FIFO", "directory"])
def test_a_share_file_that_is_not_a_regular_file_is_refused_at_once(isconf, tmp_path, kind):
    # A FIFO no one writes blocked the open for good; a device could act on being opened.
    head = str(tmp_path / "branches" / "web" / "head")
    sock = os.makedirs(head) if kind == "directory" else plant(head, kind)
    try:
        mirror = isconf.Mirror(str(tmp_path), timeout=30, deadline=60)
        error = in_thread(lambda: mirror.fetch("branches/web/head", 1000), seconds=30)
    finally:
        if sock is not None:
            sock.close()
    assert isinstance(error, isconf.Refused), error
    assert "not a regular file" in str(error) and kind.replace("link to a ", "") in str(error), error


def hang(hung_mount, share, stall, files):
    """The directory of files (their paths in share: size) on a file system that hangs at the open or, with
    the files there to be found and opened, at the first read."""
    where = os.path.join(share, os.path.dirname(next(iter(files))))
    return hung_mount(where, None if stall == "open" else {os.path.basename(p): n for p, n in files.items()})


@pytest.mark.parametrize("stall", ["open", "read"])
@pytest.mark.parametrize("timeout,deadline,fragment", [
    (1, 30, "nothing read for 1 seconds"),             # silent for the timeout
    (30, 2, "too slow, gave up after 2 seconds"),      # past the deadline
])
def test_a_share_on_a_hung_file_system_ends_at_its_deadline(isconf, tmp_path, hung_mount, timeout, deadline,
                                                             fragment, stall):
    # The open or the read blocks in the kernel, where no clock is looked at between two reads.
    share = str(tmp_path / "share")
    hung = hang(hung_mount, share, stall, {"branches/web/head": 200, "branches/web/journal": 900})
    before = set(threading.enumerate())
    mirror = isconf.Mirror(share, timeout=timeout, deadline=deadline)
    error = in_thread(lambda: mirror.fetch("branches/web/head", 1000))
    assert isinstance(error, isconf.Unreachable) and fragment in str(error), error
    # The share is not read again while that read has not come back: no second thread blocks on it.
    again = in_thread(lambda: mirror.fetch("branches/web/journal", 1000), seconds=30)
    assert isinstance(again, isconf.Unreachable) and "has not come back" in str(again), again
    left = [t for t in threading.enumerate() if t not in before and t.name == "isconf-share"]
    assert len(left) == 1
    hung.release()   # the blocked read fails now: its thread ends, and the share is usable again
    left[0].join(30)
    assert not left[0].is_alive()
    error = in_thread(lambda: mirror.fetch("branches/web/head", 1000), seconds=30)
    assert isinstance(error, isconf.NotFound), error


def published_share(tmp_path, author):
    """A copy of author's repository, as a file share would hold it."""
    share = str(tmp_path / "share")
    shutil.copytree(author.repo, share, symlinks=True)
    return share


def test_a_fifo_in_a_share_fails_that_mirror_and_the_next_one_is_used(tmp_path, author, server, host, keys,
                                                                       busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/ran"])
    share = published_share(tmp_path, author)
    os.unlink(os.path.join(share, "branches/web/journal"))
    os.mkfifo(os.path.join(share, "branches/web/journal"))
    host.init([share, server.url], keys, "--timeout", "30", "--deadline", "60")
    proc = host("up", expect="ok", timeout=RUN_TIMEOUT)
    assert os.path.exists(host.path("/tmp/ran"))
    assert "mirror %s: " % share in proc.err and "is a FIFO, not a regular file" in proc.err, proc.err


@pytest.mark.parametrize("stall", ["open", "read"])
def test_a_share_whose_objects_hang_fails_at_the_deadline_and_the_next_mirror_is_used(tmp_path, author, server,
                                                                                       host, keys, hung_mount, stall):
    # Head and journal read well; the objects directory is a file system that never answers, or never a read.
    content = b"from the share\n" * 100
    src = source_tree(tmp_path, "/etc/motd", content)
    author.commit(["--root", src, "snap", "/etc/motd"])
    share = published_share(tmp_path, author)
    hang(hung_mount, share, stall, {"objects/" + hashlib.sha256(content).hexdigest(): len(content)})
    host.init([share, server.url], keys, "--timeout", "1", "--deadline", "3")
    proc = host("up", expect="ok", timeout=RUN_TIMEOUT)   # it ends, with the blocked read left behind
    with open(host.path("/etc/motd"), "rb") as f:
        assert f.read() == content
    assert "mirror %s: " % share in proc.err and "objects/" in proc.err, proc.err


# --- the agent's own output never holds up a transaction ------------------------------------

def test_a_stdout_nobody_reads_never_holds_up_a_transaction_its_log_or_its_timeout(isconf, author, server, keys,
                                                                                   host, busybox_root):
    # A pipe to a logger that stopped reading: the echo of 16 MiB cannot be written, and must not be waited for.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "busybox yes 0123456789abcdef | busybox head -c 16777216; echo ALL-WRITTEN; sleep 60"])
    host.init(server.url, keys, "--exec-timeout", "3")
    agent = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"})
    try:
        code = agent.wait(RUN_TIMEOUT)   # neither pipe is read until the run ended by itself
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.communicate()
        pytest.fail("up waited on a stdout nobody reads")
    out, err = agent.communicate()
    err = undated(err.decode())
    assert code == 1, err
    assert "killed after running for exec_timeout 3 s" in err
    assert "isconf: warning: output to stdout blocked: " in err   # said once, where it can be read
    logs = glob.glob(host.state("logs", "*.log"))
    with open(logs[0], "rb") as f:
        log = f.read()
    assert len(log) <= isconf.ATTEMPT_MAX
    assert b"[isconf] output to stdout blocked: " in log and b"[isconf] killed: " in log


# --- the author's side: a repository on a file system that hangs ---------------------------------

@pytest.mark.parametrize("stall", ["open", "read"])
def test_an_author_verb_on_a_hung_repository_ends_with_exit_3(tmp_path, author, hung_mount, stall):
    # The repository on a network mount whose server died: the verb ends, saying so, instead of waiting for ever.
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    author("lock", "-m", "next change")
    if stall == "open":      # the object store: nothing under it answers, not even its own stat
        where, verb = os.path.join(author.repo, "objects"), lambda **kw: author("snap", "/etc/hostname", **kw)
        files = None
    else:                    # the branch's directory: its files are found and opened, never read
        author("exec", "--no-run", "--", "/bin/true")
        where, verb = author.path(), author.ci
        files = {name: os.path.getsize(author.path(name)) for name in os.listdir(author.path())}
    os.rename(where, where + ".real")
    os.makedirs(where)
    hung_mount(where, files)
    proc = verb(expect="unreachable", env={"ISCONF_REPO_TIMEOUT": "2"}, timeout=RUN_TIMEOUT)
    assert "the repository's file system has not answered for 2 s" in error_line(proc), proc.err


def test_the_command_of_an_author_exec_may_take_longer_than_the_repository_timeout(author):
    # The guard watches the repository's waits, not the command the author runs on purpose.
    author("lock", "-m", "a slow command")
    proc = author("exec", "--", "/bin/sleep", "3", env={"ISCONF_REPO_TIMEOUT": "1"}, timeout=RUN_TIMEOUT)
    assert "staged" in proc.out, proc.out


@pytest.mark.parametrize("value", ["soon", "-1", "1e999"])
def test_a_bad_repository_timeout_is_a_usage_error(author, value):
    proc = author("staged", expect="usage", env={"ISCONF_REPO_TIMEOUT": value})
    assert "ISCONF_REPO_TIMEOUT" in error_line(proc), proc.err
