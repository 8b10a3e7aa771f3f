"""Execs inside a --root find /proc, /sys, /dev (with /dev/pts) and /run, and no mount outlives them."""

import os
import signal
import subprocess
import sys
import time

from conftest import ISCONF, mounts_under

# Directories alone prove nothing (the image has them): /dev/pts must hold its ptmx, and /run and
# /dev/pts must be mount points the exec sees in its own mountinfo.
SEES = ("test -r /proc/self/status && test -d /sys/kernel && test -c /dev/null && test -c /dev/pts/ptmx "
        "&& while read id parent dev root point rest; do case $point in /run|/dev/pts) echo $point;; esac; "
        "done < /proc/self/mountinfo > /tmp/mounted && echo seen > /tmp/seen")


def mounted_inside(target):
    with open(target.path("/tmp/mounted")) as f:
        return sorted(set(f.read().split()))


def test_an_exec_in_a_root_finds_the_pseudo_filesystems_and_leaves_no_mount(author, server, keys, target):
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", SEES])
    target.init(server.url, keys)
    target("up", expect="ok")
    assert open(target.path("/tmp/seen")).read() == "seen\n"
    assert mounted_inside(target) == ["/dev/pts", "/run"]
    assert mounts_under(target.root) == []
    assert os.listdir(target.path("/proc")) == [] and os.listdir(target.path("/dev")) == []


def test_no_mounts_turns_them_off(author, server, keys, target):
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", SEES])
    target.init(server.url, keys)
    target("up", "--no-mounts", expect="failed")
    assert not os.path.exists(target.path("/tmp/seen"))


def test_a_link_at_proc_is_followed_inside_the_root_as_the_chroot_sees_it(author, server, keys, target):
    # ROOT/proc -> /altproc: an absolute link means ROOT/altproc to the exec, never the miniroot's /altproc.
    os.rmdir(target.path("/proc"))
    os.makedirs(target.path("/altproc"))
    os.symlink("/altproc", target.path("/proc"))
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", SEES])
    target.init(server.url, keys)
    target("up", expect="ok")
    assert open(target.path("/tmp/seen")).read() == "seen\n"
    assert not os.path.exists("/altproc")


def test_mounts_the_admin_made_are_used_not_mounted_twice(author, server, keys, target):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "admin-run", target.path("/run")], check=True)
    try:
        with open(target.path("/run/marker"), "w") as f:
            f.write("admin's\n")
        author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "cat /run/marker > /tmp/marker"])
        target.init(server.url, keys)
        target("up", expect="ok")
        assert open(target.path("/tmp/marker")).read() == "admin's\n"
        assert mounts_under(target.root) == [target.path("/run")]
    finally:
        subprocess.run(["umount", target.path("/run")], check=True)


def test_a_killed_agent_leaves_no_mount_behind(author, server, keys, target):
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo $$ > /tmp/pid; sleep 2"])
    target.init(server.url, keys)
    agent = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", target.root, "up"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not os.path.exists(target.path("/tmp/pid")) and time.time() < deadline:
        time.sleep(0.05)
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    pid = int(open(target.path("/tmp/pid")).read())
    while os.path.exists("/proc/%d" % pid) and time.time() < deadline:
        time.sleep(0.05)
    assert mounts_under(target.root) == []
    assert os.listdir(target.path("/proc")) == []
