"""The host's own files, as a hostile image or an old install leaves them: bounded reads,
cleanup of what is not ours, values init cannot write, old modes, and the host lock."""

import fcntl
import os
import resource

import pytest

from conftest import error_line, source_tree

HUGE = 4 << 30    # a sparse file of 4 GiB costs nothing on disk ...
MEMORY = 1 << 30  # ... and more than the agent is given here: read whole, it would end in MemoryError


def run_limited(host, *args):
    """isconf with its address space limited, as on a small host: a file read whole cannot fit."""
    return host(*args, limits={resource.RLIMIT_AS: MEMORY})


def applied_host(author, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    host.init(author.repo, keys)
    host("up", expect="ok")


def grow(path, how):
    """Make a file huge and sparse: nothing but zeros, or its records followed by zeros."""
    if how == "zeros":
        os.truncate(path, 0)
    os.truncate(path, os.path.getsize(path) + HUGE)


@pytest.mark.parametrize("verb", ["up", "status", "log"])
@pytest.mark.parametrize("how", ["zeros", "records-then-zeros"])
def test_a_huge_history_is_refused_as_damaged_not_read_whole(author, keys, host, busybox_root, how, verb):
    applied_host(author, keys, host, busybox_root)
    grow(host.state("history"), how)
    proc = run_limited(host, verb)
    assert proc.returncode == 7, proc.err
    line = error_line(proc)
    assert host.state("history") in line and "longer than 1048576 bytes" in line, line


def test_a_long_history_is_read_from_its_end_only_as_far_as_a_batch_reaches(author, keys, host, busybox_root):
    # Megabytes of damage far back are not read by a run that finds its position near the end: a run reads
    # back only past the done records of the last batches (BATCH_MOST + 1 entries), never the whole history.
    applied_host(author, keys, host, busybox_root)
    author.commit(*[["exec", "--no-run", "--", "/bin/true"]] * 70)   # more than a batch, read back by the next run
    host("up", expect="ok")
    with open(host.state("history"), "rb") as f:
        good = f.read()
    with open(host.state("history"), "wb") as f:
        f.write(b"\0" * (8 << 20) + b"\n" + good)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/two"])
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/two"))


@pytest.mark.parametrize("verb", ["up", "status", "migrate"])
def test_a_huge_config_is_refused_not_read_whole(author, keys, host, busybox_root, verb):
    applied_host(author, keys, host, busybox_root)
    grow(host.path("/etc/isconf/isconf.conf"), "records-then-zeros")
    proc = run_limited(host, *([verb, "canary"] if verb == "migrate" else [verb]))
    assert proc.returncode == 7, proc.err
    line = error_line(proc)
    assert "isconf.conf is larger than 1048576 bytes" in line, line


@pytest.mark.parametrize("kind", ["directory", "FIFO", "symbolic link"])
def test_what_isconf_did_not_stage_in_objects_is_left_with_a_warning_and_the_run_succeeds(author, keys, host,
                                                                                          busybox_root, tmp_path,
                                                                                          kind):
    busybox_root(host.root)
    author.commit(["--root", source_tree(tmp_path, "/etc/motd", "welcome\n"), "snap", "/etc/motd"])
    host.init(author.repo, keys)
    planted = host.state("objects", "planted")
    if kind == "directory":
        os.makedirs(os.path.join(planted, "sub"))
    elif kind == "FIFO":
        os.mkfifo(planted)
    else:
        os.symlink(host.path("/etc/passwd"), planted)
    proc = host("up", expect="ok")
    assert "isconf: warning: %s is a %s, not an object isconf staged" % (planted, kind) in proc.err, proc.err
    assert os.path.exists(host.state("last-success")) and open(host.path("/etc/motd")).read() == "welcome\n"
    assert os.listdir(host.state("objects")) == ["planted"]  # the staged object is gone, the stranger kept
    assert os.path.lexists(planted) and os.path.exists(host.path("/etc/passwd"))


@pytest.mark.parametrize("extra, fragment", [
    (["--var", "A=x\ny"], "--var A=x\\x0ay holds a control character (\\x0a)"),
    (["--var", "A=x\ry"], "holds a control character (\\x0d)"),
    (["--var", "A=x\ty"], "holds a control character (\\x09)"),
    (["--var", "A=x\x1b[2Jy"], "holds a control character (\\x1b)"),
    (["--var", "B=  x  "], "--var B=  x   begins or ends with white space"),
    (["--var", "B=x "], "begins or ends with white space"),
    (["--reboot-command", "/sbin/reboot\n-f"], "--reboot-command /sbin/reboot\\x0a-f holds a control character"),
    (["--reboot-command", " /sbin/reboot"], "begins or ends with white space"),
    (["--url", "/srv/is conf"], "holds white space, which separates mirrors"),
    (["--url", "/srv/isconf\n/srv/other"], "holds a control character"),
])
def test_init_refuses_a_value_the_config_could_not_keep(author, keys, host, extra, fragment):
    urls = [extra[1]] if extra[0] == "--url" else [author.repo]
    options = [] if extra[0] == "--url" else extra
    proc = host("init", *(urls + ["--branch", "web", "--signers", keys.signers] + options), expect="usage")
    assert fragment in error_line(proc), proc.err
    assert not os.path.exists(host.path("/etc/isconf/isconf.conf"))


def test_a_value_init_accepts_reaches_every_exec_as_given(author, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", 'printf "%s|" "$MOTD" > /tmp/motd'])
    host.init(author.repo, keys, "--var", "MOTD=a  b # c %(d)s ; e")
    host("up", expect="ok")
    assert open(host.path("/tmp/motd")).read() == "a  b # c %(d)s ; e|"


def test_init_force_is_busy_while_an_up_holds_the_host_lock(author, keys, host):
    # An up holds the host lock for its whole run: its state and config are not changed under it.
    host.init(author.repo, keys, "--var", "A=1")
    conf = host.path("/etc/isconf/isconf.conf")
    before = open(conf).read()
    fd = os.open(host.state("lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        line = error_line(host("init", "--force", author.repo, "--branch", "web", "--signers", keys.signers,
                               "--var", "A=2", expect="busy"))
        assert "this host is busy" in line, line
        assert open(conf).read() == before
    finally:
        os.close(fd)
    host("init", "--force", author.repo, "--branch", "web", "--signers", keys.signers, "--var", "A=2", expect="ok")
    assert "A = 2" in open(conf).read()
