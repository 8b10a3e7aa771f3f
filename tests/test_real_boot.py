"""The boot, proven for real: a Debian bookworm image booted under qemu, whose systemd runs the unit
'install --systemd' wrote.  The test plays the miniroot (the image loop-mounted, the agent outside it
with --root), boots the guest (no network: the repository is a plain directory on the guest's disk),
and reads the guest's disk afterwards: what ran and in which boot, the agent's history and status, and
systemd's journal.  The image is built once and cached (see realboot.py); each boot has a hard limit.
"""

import json
import os
import subprocess

import pytest

import realboot
from conftest import Author, Host

ORDER = "/root/order"       # every exec (and the late service) appends a line: what, and the boot it ran in
MIRROR = "/srv/isconf"      # the repository, on the guest's own disk, as the booted guest sees it
LATE = realboot.LATE_UNIT


@pytest.fixture(scope="module")
def image():
    realboot.require_tools()
    return realboot.build_image()


@pytest.fixture
def guest(image, tmp_path):
    """A fresh copy of the image; removed afterwards (a gigabyte each)."""
    made = Guest(image, tmp_path)
    yield made
    os.unlink(made.disk)


class Guest(object):
    """One copy of the cached image: mounted to play the miniroot and to look at it, or booted."""

    def __init__(self, image, tmp_path):
        self.tmp = str(tmp_path)
        self.disk = realboot.copy_image(image[0], os.path.join(self.tmp, "disk.img"))
        self.kernel, self.initrd = image[1:]
        self.target = os.path.join(self.tmp, "target")
        self.consoles = []

    def mounted(self):
        return realboot.mounted(self.disk, self.target)

    def boot(self):
        console = realboot.boot(self.disk, self.kernel, self.initrd,
                                os.path.join(self.tmp, "console-%d" % (len(self.consoles) + 1)))
        self.consoles.append(console)
        return console

    def path(self, path):
        return os.path.join(self.target, path.lstrip("/"))

    def order(self):
        """The lines the execs wrote, as (what, which boot): 'miniroot', or 1, 2, ... in boot order."""
        with open("/proc/sys/kernel/random/boot_id") as f:
            here = f.read().strip()
        boots, lines = [], []
        with open(self.path(ORDER)) as f:
            for line in f.read().splitlines():
                what, boot_id = line.split()
                if boot_id == here:
                    lines.append((what, "miniroot"))
                    continue
                if boot_id not in boots:
                    boots.append(boot_id)
                lines.append((what, boots.index(boot_id) + 1))
        return lines

    def unit_messages(self, unit):
        """What the guest's journal holds about unit, as one list of messages per boot, in boot order."""
        text = realboot.journal(self.target, "-u", unit, "-o", "json", "--output-fields=MESSAGE,_BOOT_ID")
        boots, messages = [], {}
        for line in text.splitlines():
            record = json.loads(line)
            boot = record["_BOOT_ID"]
            if boot not in boots:
                boots.append(boot)
            message = record.get("MESSAGE")
            messages.setdefault(boot, []).append(message if isinstance(message, str) else repr(message))
        return [messages[boot] for boot in boots]


def mark(what):
    """An exec that appends what, and the id of the boot it runs in, to ORDER."""
    return ["exec", "--no-run", "-m", what, "--", "/bin/sh", "-c",
            'echo "%s $(cat /proc/sys/kernel/random/boot_id)" >> %s' % (what, ORDER)]


def author_in(guest, keys):
    return Author(guest.path(MIRROR), keys=keys)


def history(host):
    with open(host.state("history")) as f:
        return [json.loads(line) for line in f]


def ended_cleanly(messages):
    """systemd's word on a run of the unit that ended: success, not 'failed'."""
    text = "\n".join(messages)
    return "Failed with result" not in text and ("Deactivated successfully" in text or "Finished " in text)


def test_from_a_miniroot_to_the_first_boot_across_two_journaled_reboots(guest, keys):
    with guest.mounted():
        author = author_in(guest, keys)
        author.commit(mark("one"), mark("two"), ["reboot", "-m", "first"], mark("three"),
                      ["reboot", "-m", "second"], mark("four"))
        host = Host(guest.target)
        # The miniroot sees the repository inside the mounted target; its reboot command does nothing.
        host.init(guest.path(MIRROR), keys, "--reboot-command", "/bin/true")
        up = host("up", "-r", expect="ok")
        assert "rebooting: /bin/true" in up.out
        # The booted host sees it at /srv/isconf, and reboots for real (init --force keeps what it is not told).
        host.init(MIRROR, keys, "--force", "--reboot-command", "/sbin/reboot")
        host("install", "--systemd", expect="ok")
        with open(guest.path("/etc/systemd/system/isconf.service")) as f:
            assert "RequiresMountsFor=%s\n" % MIRROR in f.read()
    assert realboot.rebooted(guest.boot())        # the second reboot entry
    assert realboot.powered_off(guest.boot())     # done, and the rest of the boot went on
    with guest.mounted():
        assert guest.order() == [("one", "miniroot"), ("two", "miniroot"), ("three", 1), ("four", 2)]
        report = host.status()
        assert (report["applied_seq"], report["head_seq"], report["pending"], report["failed"]) == (6, 6, 0, None)
        events = history(host)
        for seq in range(1, 7):
            assert [e["event"] for e in events if e["seq"] == seq] == ["started", "done"], seq
        runs = guest.unit_messages("isconf.service")
        assert len(runs) == 2, runs
        # Boot 1 ended in the journaled reboot: systemd stopped the unit on the way down, and it ended well.
        assert any("rebooting: /sbin/reboot" in m for m in runs[0]), runs[0]
        assert ended_cleanly(runs[0]) and "isconf.service: Deactivated successfully." in runs[0], runs[0]
        assert ended_cleanly(runs[1]) and any("applied through seq 6" in m for m in runs[1]), runs[1]


LATE_SERVICE = """\
[Unit]
Description=test: a service ordered after isconf, restarted by a transaction at boot
After=isconf.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo "late $(cat /proc/sys/kernel/random/boot_id)" >> %s'

[Install]
WantedBy=multi-user.target
""" % ORDER


PACKAGE = "isconf-test-pkg"  # a package whose postinst starts its service, ordered after isconf
PACKAGE_SERVICE = """\
[Unit]
Description=test: a packaged service ordered after isconf, started by its postinst at boot
After=isconf.service
Before=isconf-test-poweroff.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo "package $(cat /proc/sys/kernel/random/boot_id)" >> %s'

[Install]
WantedBy=multi-user.target
""" % ORDER
# As debhelper writes it, through invoke-rc.d (which asks /sbin/runlevel, a link to systemctl), and by the
# absolute path: each would wait for the start it asks for.
PACKAGE_POSTINST = """\
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    deb-systemd-helper enable %(name)s.service
    systemctl daemon-reload
    deb-systemd-invoke start %(name)s.service
    invoke-rc.d %(name)s start
    /usr/bin/systemctl start %(name)s.service
fi
""" % {"name": PACKAGE}
PACKAGE_INIT_SCRIPT = """\
#!/bin/sh
### BEGIN INIT INFO
# Provides:          %s
# Required-Start:    $local_fs
# Required-Stop:     $local_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: test: what invoke-rc.d needs to see; systemd runs the unit of the same name
### END INIT INFO
exit 0
""" % PACKAGE
PACKAGE_FILE = "/root/%s_1_all.deb" % PACKAGE


def build_package(tmp):
    """The package, built with dpkg-deb in a tree of tmp that snap takes it from; returns the tree."""
    tree, src = os.path.join(tmp, "package"), os.path.join(tmp, "src")
    realboot.write(os.path.join(tree, "lib/systemd/system", PACKAGE + ".service"), PACKAGE_SERVICE)
    realboot.write(os.path.join(tree, "DEBIAN/control"),
                   "Package: %s\nVersion: 1\nArchitecture: all\nMaintainer: test <test@example.invalid>\n"
                   "Description: a service its postinst starts\n" % PACKAGE)
    realboot.write(os.path.join(tree, "etc/init.d", PACKAGE), PACKAGE_INIT_SCRIPT, 0o755)
    realboot.write(os.path.join(tree, "DEBIAN/postinst"), PACKAGE_POSTINST, 0o755)
    os.makedirs(os.path.dirname(os.path.join(src, PACKAGE_FILE.lstrip("/"))))
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", tree, os.path.join(src, PACKAGE_FILE.lstrip("/"))],
                   check=True, stdout=subprocess.DEVNULL)
    return src


def test_services_ordered_after_isconf_and_started_at_boot_by_any_path_do_not_deadlock(guest, keys):
    # Each exec waits for a job that waits for isconf.service: by name, by absolute path, through service,
    # and in a package's postinst (deb-systemd-invoke, invoke-rc.d, systemctl) run by a dpkg whose PATH
    # lacks isconf's boot-bin.
    src = build_package(guest.tmp)
    with guest.mounted():
        units = guest.path("/etc/systemd/system")
        with open(os.path.join(units, LATE), "w") as f:
            f.write(LATE_SERVICE)
        os.symlink("../" + LATE, os.path.join(units, "multi-user.target.wants", LATE))
        author = author_in(guest, keys)
        author.commit(mark("one"), ["exec", "--no-run", "--", "systemctl", "restart", LATE],
                      ["exec", "--no-run", "--", "/usr/bin/systemctl", "restart", LATE],
                      ["exec", "--no-run", "--", "/bin/systemctl", "restart", LATE],
                      ["exec", "--no-run", "--", "service", LATE[:-len(".service")], "restart"],
                      ["--root", src, "snap", PACKAGE_FILE],
                      ["exec", "--no-run", "--", "/usr/bin/env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                       "dpkg", "-i", PACKAGE_FILE],
                      mark("two"))
        host = Host(guest.target)
        host.init(MIRROR, keys)
        host("install", "--systemd", expect="ok")
    # Were a start or restart waited for, the boot would hang until the guest is killed.
    assert realboot.powered_off(guest.boot())
    with guest.mounted():
        # Each service started once, after the agent was done.
        order = guest.order()
        assert order[:2] == [("one", 1), ("two", 1)] and sorted(order[2:]) == [("late", 1), ("package", 1)], order
        assert host.status()["applied_seq"] == 8
        runs = guest.unit_messages("isconf.service")
        assert len(runs) == 1 and ended_cleanly(runs[0]), runs
        with open(guest.path("/var/lib/dpkg/status")) as f:
            assert "Package: %s\nStatus: install ok installed\n" % PACKAGE in f.read()


def test_an_exec_that_reboots_is_halted_after_three_interrupted_attempts(guest, keys):
    with guest.mounted():
        author = author_in(guest, keys)
        reboots = 'echo "attempt $(cat /proc/sys/kernel/random/boot_id)" >> %s; systemctl reboot; sleep 600' % ORDER
        author.commit(mark("one"), ["exec", "--no-run", "--", "/bin/sh", "-c", reboots], mark("three"))
        host = Host(guest.target)
        host.init(MIRROR, keys)
        host("install", "--systemd", expect="ok")
    for attempt in (1, 2, 3):
        assert realboot.rebooted(guest.boot()), attempt
    assert realboot.powered_off(guest.boot())  # halted: the fourth boot goes on
    with guest.mounted():
        assert guest.order() == [("one", 1), ("attempt", 1), ("attempt", 2), ("attempt", 3)]
        report = host.status()
        assert report["applied_seq"] == 1 and report["failed"]["seq"] == 2, report
        assert "started 3 times without ending" in report["failed"]["error"]
        assert "'reboot' entry" in report["failed"]["error"]
        halt = [e for e in history(host) if e["seq"] == 2 and e["event"] == "failed"]
        assert len(halt) == 1 and halt[0]["interrupted"] == 3
        assert len(guest.unit_messages("isconf.service")) == 4
