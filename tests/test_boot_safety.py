"""What makes a boot safe, checked without a guest (test_real_boot.py boots one): a journaled reboot ends
the run well even when init stops the agent, no transaction loops for ever, execs at boot cannot
deadlock on systemctl, and the units wait for the mounts of file-share mirrors."""

import json
import os
import subprocess

import pytest

from conftest import KILL_AGENT, source_tree


UNIT_DIR = "/etc/systemd/system"


def history(host):
    with open(host.state("history")) as f:
        return [json.loads(line) for line in f]


def test_init_stopping_the_agent_during_its_reboot_command_is_the_reboot_not_an_interruption(author, host):
    # systemd stops the boot unit (SIGTERM) as the reboot it was asked for begins: the run ends with 0.
    author.commit(["reboot"])
    host.init(author.repo, author.keys, "--reboot-command", "/bin/sh -c 'kill -TERM $PPID; sleep 1'")
    proc = host("up", "-r", expect="ok")
    assert "interrupted" not in proc.err and "error" not in proc.err, proc.err
    assert [e["event"] for e in history(host)] == ["started", "done"]


def test_a_failed_reboot_command_is_still_an_error(author, host):
    author.commit(["reboot"])
    host.init(author.repo, author.keys, "--reboot-command", "/bin/false")
    proc = host("up", "-r", expect="state")
    assert "reboot command '/bin/false' failed" in proc.err


@pytest.fixture
def killer(author, host, busybox_root):
    """A branch whose second transaction kills the agent (as a reboot would) and counts its attempts."""
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/first"],
                  ["exec", "--no-run", "--", "/bin/sh", "-c", "echo x >> /tmp/attempts; " + KILL_AGENT],
                  ["exec", "--no-run", "--", "/bin/touch", "/tmp/third"])
    return host


def attempts(host):
    with open(host.path("/tmp/attempts")) as f:
        return len(f.read().split())


def test_a_transaction_interrupted_three_times_is_halted_as_failed_for_good(author, killer):
    host = killer
    host.init(author.repo, author.keys)
    for n in (1, 2, 3):
        assert host("up").returncode == -9
        assert attempts(host) == n
        report = host.status()  # status says so at once
        assert report["state"] == "interrupted" and report["interrupted"]["attempts"] == n, report
    text = host("status").out
    assert "interrupted 3 of 3 times: the next 'up' halts it" in text, text
    for _ in (4, 5):  # halted, and it stays halted: not one more attempt
        proc = host("up", expect="failed")
        assert attempts(host) == 3
        assert "transaction 2 halted: started 3 times without ending (interrupted_max 3)" in proc.err
        assert "vanishing each time without a reboot" in proc.err and "isconf skip 2" in proc.err
    assert not os.path.exists(host.path("/tmp/third"))
    report = host.status()
    assert report["failed"]["seq"] == 2 and "started 3 times without ending" in report["failed"]["error"]
    halts = [e for e in history(host) if e["event"] == "failed"]
    assert [e["interrupted"] for e in halts] == [3, 3]
    # A human who skips it lets the rest run.
    host("skip", "2", "-m", "reboots; journal has a reboot entry now", expect="ok")
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/third"))


def test_interrupted_max_is_the_hosts_to_set(author, killer):
    host = killer
    host.init(author.repo, author.keys, "--interrupted-max", "1")
    assert host("up").returncode == -9
    proc = host("up", expect="failed")
    assert "started 1 time without ending (interrupted_max 1)" in proc.err and attempts(host) == 1


def test_a_transaction_that_fails_is_not_an_interrupted_one(author, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo x >> /tmp/attempts; exit 3"])
    host.init(author.repo, author.keys, "--interrupted-max", "1")
    for n in (1, 2, 3):
        proc = host("up", expect="failed")
        assert "exited with status 3" in proc.err and attempts(host) == n


FAKE_SYSTEMCTL = "#!/bin/sh\necho \"${0##*/} $*\" >> /tmp/systemctl.args\n"  # the name it was run by, its args


@pytest.fixture
def systemctl_root(author, host, busybox_root):
    """A root with a systemctl in /usr/bin and another in /bin (as before /usr was merged) that note how
    they were called, /sbin/runlevel a link to one, and a transaction restarting a service."""
    busybox_root(host.root)
    os.makedirs(host.path("/usr/bin"))
    os.makedirs(host.path("/sbin"))
    for path in ("/usr/bin/systemctl", "/bin/systemctl"):
        with open(host.path(path), "w") as f:
            f.write(FAKE_SYSTEMCTL)
        os.chmod(host.path(path), 0o755)
    os.symlink("/bin/systemctl", host.path("/sbin/runlevel"))
    author.commit(["exec", "--no-run", "--", "systemctl", "restart", "nginx"],
                  ["exec", "--no-run", "--", "/bin/sh", "-c", "echo \"$PATH\" > /tmp/path"])
    host.init(author.repo, author.keys)
    return host


def called(host):
    with open(host.path("/tmp/systemctl.args")) as f:
        return f.read().splitlines()


def mounted_inside(root):
    """The mount points inside root that this process sees (other tests may mount elsewhere meanwhile)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == root or p.startswith(root.rstrip("/") + "/")]


def test_execs_at_boot_queue_systemctl_jobs_without_waiting(systemctl_root):
    # A service ordered after isconf.service cannot start before the boot run ends: waiting for it deadlocks.
    host = systemctl_root
    host("up", "--boot", expect="ok")
    assert called(host) == ["systemctl --no-block restart nginx"]
    with open(host.path("/tmp/path")) as f:
        assert f.read().strip().startswith("/var/lib/isconf/boot-bin:/usr/local/sbin:")
    with open(host.state("boot-bin", "systemctl")) as f:
        assert f.read().endswith('exec "$real/systemctl" "$@"\n')


# However a transaction reaches systemctl at boot: (the command, what the root's real systemctl is called with).
REACHED = [(["/usr/bin/systemctl", "restart", "a"], "systemctl --no-block restart a"),
           (["/bin/systemctl", "restart", "b"], "systemctl --no-block restart b"),
           (["/bin/sh", "-c", "PATH=/usr/bin:/bin systemctl try-restart c"], "systemctl --no-block try-restart c"),
           (["/bin/sh", "-c", "env -i /bin/systemctl -q enable --now d"], "systemctl --no-block -q enable --now d"),
           (["/usr/bin/systemctl", "is-active", "e"], "systemctl is-active e"),   # starts no job: as it is
           (["/bin/systemctl", "--wait", "start", "f"], "systemctl --no-block start f"),  # queued: --wait dropped
           (["/sbin/runlevel"], "runlevel ")]                                     # its other names keep their meaning


def test_execs_at_boot_reach_the_queueing_systemctl_by_any_path_and_the_host_sees_no_mount(author, systemctl_root):
    host = systemctl_root
    author.commit(*[["exec", "--no-run", "--"] + argv for argv, _ in REACHED])
    assert mounted_inside(host.root) == []
    host("up", "--boot", expect="ok")
    assert called(host)[1:] == [seen for _, seen in REACHED]
    # Nothing was mounted where the agent runs, nor changed on the disk: the wrapper lived in each exec's namespace.
    assert mounted_inside(host.root) == []
    for path in ("/usr/bin/systemctl", "/bin/systemctl"):
        with open(host.path(path)) as f:
            assert f.read() == FAKE_SYSTEMCTL, path
    assert os.listdir(host.state("boot-bin", "real")) == []


def test_a_systemctl_replaced_mid_run_is_the_one_later_execs_at_boot_reach(author, systemctl_root, tmp_path):
    # The run's commands share one mount namespace, the wrapper bound over each systemctl: a transaction that
    # replaces the binary must not leave the later ones queueing jobs through the file it replaced.
    host = systemctl_root
    src = source_tree(tmp_path, "/usr/bin/systemctl", FAKE_SYSTEMCTL.replace("echo \"", "echo \"new "))
    os.chmod(os.path.join(src, "usr/bin/systemctl"), 0o755)
    author("lock", "-m", "systemd upgraded")
    author("--root", src, "snap", "/usr/bin/systemctl")
    author("exec", "--no-run", "--", "/usr/bin/systemctl", "restart", "b")
    author.ci()
    host("up", "--boot", expect="ok")
    assert called(host) == ["systemctl --no-block restart nginx", "new systemctl --no-block restart b"]
    assert mounted_inside(host.root) == []


def test_execs_from_cron_run_systemctl_as_it_is(author, systemctl_root):
    host = systemctl_root
    author.commit(*[["exec", "--no-run", "--"] + argv for argv, _ in REACHED])
    host("up", expect="ok")
    assert called(host) == ["systemctl restart nginx", "systemctl restart a", "systemctl restart b",
                            "systemctl try-restart c", "systemctl -q enable --now d", "systemctl is-active e",
                            "systemctl --wait start f", "runlevel "]
    assert not os.path.exists(host.state("boot-bin"))


def test_at_boot_a_user_other_than_root_is_told_that_it_cannot_reach_systemctl(author, systemctl_root):
    # The real one is bound inside the state directory, which only root may enter; the wrapper must not
    # fall back to the path it stands over (itself): that would exec itself for ever.
    host = systemctl_root
    os.symlink("busybox", host.path("/bin/su"))
    author.commit(["exec", "--no-run", "--", "/bin/su", "-s", "/bin/sh", "daemon", "-c", "/usr/bin/systemctl status x"])
    proc = host("up", "--boot", expect="failed", timeout=60)
    assert "systemctl: at boot, execs of isconf reach systemctl as root only" in proc.out
    assert called(host) == ["systemctl --no-block restart nginx"]


def test_without_mounts_execs_at_boot_find_the_queueing_systemctl_by_name_only(author, systemctl_root):
    host = systemctl_root
    author.commit(["exec", "--no-run", "--", "/usr/bin/systemctl", "restart", "a"])
    host("up", "--boot", "--no-mounts", expect="ok")
    assert called(host) == ["systemctl --no-block restart nginx", "systemctl restart a"]


def test_the_boot_systemctl_is_written_inside_the_root_never_through_a_link(systemctl_root, tmp_path):
    host = systemctl_root
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), host.state("boot-bin"))
    proc = host("up", "--boot", expect="state")
    assert "boot-bin" in proc.err and "link" in proc.err
    assert list(outside.iterdir()) == []


def test_units_wait_for_the_mounts_of_file_share_mirrors(systemd_root):
    host = systemd_root
    host.init(["/srv/isconf", "http://127.0.0.1:9/", "file:///mnt/a%20share/isconf"], None)
    host("install", expect="ok")
    for unit in ("isconf.service", "isconf-update.service"):
        with open(host.path(UNIT_DIR + "/" + unit)) as f:
            assert 'RequiresMountsFor=/srv/isconf "/mnt/a share/isconf"\n' in f.read(), unit
    verify(host)


def test_units_of_http_mirrors_wait_for_no_mount(systemd_root):
    host = systemd_root
    host.init("http://127.0.0.1:9/", None)
    host("install", expect="ok")
    with open(host.path(UNIT_DIR + "/isconf.service")) as f:
        assert "RequiresMountsFor" not in f.read()


def test_a_boot_run_that_gives_up_is_retried_by_the_timer_installed_by_default(systemd_root):
    # No network at boot: 'up --boot' gives up after boot_wait (exit 3, test_boot.py), the boot goes on,
    # and the timer install writes by default runs 'up' 15 minutes after boot.
    host = systemd_root
    host.init("http://127.0.0.1:9/", None, "--boot-wait", "60")
    host("install", expect="ok")
    units = host.path(UNIT_DIR)
    with open(os.path.join(units, "isconf.service")) as f:
        boot = f.read()
    assert "ExecStart=/usr/local/sbin/isconf up -r --boot\n" in boot and "TimeoutStartSec=3660\n" in boot
    assert os.readlink(os.path.join(units, "timers.target.wants/isconf-update.timer")) == \
        UNIT_DIR + "/isconf-update.timer"
    with open(os.path.join(units, "isconf-update.timer")) as f:
        assert "OnBootSec=15min\n" in f.read()
    with open(os.path.join(units, "isconf-update.service")) as f:
        assert "ExecStart=/usr/local/sbin/isconf up --periodic\n" in f.read()
    verify(host)


def verify(host):
    units = [UNIT_DIR + "/" + name for name in ("isconf.service", "isconf-update.service", "isconf-update.timer")]
    proc = subprocess.run(["systemd-analyze", "verify", "--root=" + host.root] + units,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout == b"", proc.stdout.decode()
