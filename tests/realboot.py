"""A real Debian to boot under qemu: the image, cached under ~/.cache/isconf-boot, and one boot of it.

The base system is debootstrap's minbase of bookworm with systemd, python3, a kernel and udev, fetched
from the Debian mirror this machine's apt configuration names (or $ISCONF_DEBIAN_MIRROR), built once (a
few minutes) and kept; from it a bootable ext4 disk image is made, with the units that slow a
boot masked, a persistent journal, and a unit that powers the guest off once isconf.service and the
test's own late service are done.  Each test boots a sparse copy of that image.  Everything is keyed
by a version string: changing what is built changes the key, and the next run builds it again.
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "isconf-boot")
SUITE = "bookworm"
MIRROR_ENV = "ISCONF_DEBIAN_MIRROR"            # overrides the mirror found in this machine's apt configuration
APT_ETC = "/etc/apt"
PACKAGES = "systemd-sysv,python3,linux-image-amd64,udev"
ROOTFS_KEY = "rootfs-%s-minbase-1" % SUITE     # what debootstrap made: change it to fetch again
IMAGE_KEY = "image-%s-6" % SUITE               # what is added to it: change it to rebuild the disk image
IMAGE_SIZE = "3G"
BOOT_LIMIT = 180                               # seconds a boot may take before the guest is killed (TCG)
# The tools, by the Debian package that has them: a missing one fails the tests, naming it.
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs",
         "journalctl": "systemd"}
LATE_UNIT = "isconf-test-late.service"  # a test's own service, ordered after isconf.service (if it writes one)
# Units that only slow a test boot down (getties on a console nobody reads, periodic jobs).
MASKED = ("getty@tty1.service", "serial-getty@ttyS0.service", "e2scrub_reap.service", "e2scrub_all.timer",
          "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "fstrim.timer",
          "systemd-tmpfiles-clean.timer", "systemd-pstore.service", "getty-static.service",
          "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
          # udev: its coldplug loads drivers for the emulated hardware, which nothing here uses.
          "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udevd-control.socket",
          "systemd-udevd-kernel.socket")
POWEROFF_UNIT = """\
[Unit]
Description=test: power the guest off once the boot's work is done
After=isconf.service %s multi-user.target
DefaultDependencies=no

[Service]
Type=oneshot
ExecStart=/bin/systemctl poweroff
""" % LATE_UNIT


def tool(name):
    """A program by name, also where root's tools are when PATH lacks them."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def require_tools():
    missing = sorted(set(package for name, package in TOOLS.items() if not tool(name)))
    if missing:
        pytest.fail("the real-boot tests need the packages %s: apt-get install -y %s (.ci/run does this)"
                    % (", ".join(missing), " ".join(missing)))


def debian_mirror(suite=SUITE, apt_etc=APT_ETC, environ=os.environ):
    """The Debian mirror to debootstrap suite from: $ISCONF_DEBIAN_MIRROR, else the first 'deb' source of
    suite with component main in this machine's apt configuration (sources.list, then sources.list.d/ in
    name order, one-line .list and deb822 .sources files alike, as apt reads them); None if there is none."""
    if environ.get(MIRROR_ENV, "").strip():
        return environ[MIRROR_ENV].strip().rstrip("/")
    paths = [os.path.join(apt_etc, "sources.list")]
    paths += sorted(glob.glob(os.path.join(apt_etc, "sources.list.d", "*.list"))
                    + glob.glob(os.path.join(apt_etc, "sources.list.d", "*.sources")))
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        parse = deb822_sources if path.endswith(".sources") else one_line_sources
        for types, uris, suites, components in parse(text):
            if "deb" in types and suite in suites and "main" in components:
                for uri in uris:
                    if uri.split(":", 1)[0] in ("http", "https", "ftp", "file"):
                        return uri.rstrip("/")
    return None


def one_line_sources(text):
    """(types, uris, suites, components) of each 'deb [options] URI SUITE COMPONENT...' line."""
    for line in text.splitlines():
        m = re.match(r"\s*(deb|deb-src)\s+(?:\[[^\]]*\]\s*)?(\S+)\s+(\S+)(.*)", line.split("#", 1)[0])
        if m:
            yield [m.group(1)], [m.group(2)], [m.group(3)], m.group(4).split()


def deb822_sources(text):
    """(types, uris, suites, components) of each enabled stanza of a deb822 .sources file."""
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield tuple(fields.get(name, "").split() for name in ("types", "uris", "suites", "components"))


def sh(*argv, **kw):
    kw.setdefault("check", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([tool(argv[0]) or argv[0]] + [str(a) for a in argv[1:]], **kw)


def build_rootfs():
    """debootstrap's tree, made in a temporary directory and renamed into place when whole."""
    final = os.path.join(CACHE, ROOTFS_KEY)
    if os.path.isdir(final):
        return final
    mirror = debian_mirror()
    if not mirror:
        pytest.fail("the real-boot tests build a Debian %s image with debootstrap, and found no Debian mirror for %s "
                    "('deb' with component main) in %s/sources.list or %s/sources.list.d/: set %s=URL to the mirror "
                    "to use" % (SUITE, SUITE, APT_ETC, APT_ETC, MIRROR_ENV))
    os.makedirs(CACHE, exist_ok=True)
    work = tempfile.mkdtemp(prefix=ROOTFS_KEY + ".tmp-", dir=CACHE)
    try:
        sh("debootstrap", "--variant=minbase", "--include=" + PACKAGES, SUITE, work, mirror,
           stdout=subprocess.DEVNULL, timeout=3600)
        settle(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def settle(work, final):
    """Rename a finished build into place; another run that finished first wins, and ours goes."""
    try:
        os.rename(work, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(work)


def build_image():
    """(image, kernel, initrd) of the cached bootable image, made first if missing."""
    final = os.path.join(CACHE, IMAGE_KEY)
    if not os.path.isdir(final):
        rootfs = build_rootfs()
        work = tempfile.mkdtemp(prefix=IMAGE_KEY + ".tmp-", dir=CACHE)
        try:
            kernel = sorted(glob.glob(os.path.join(rootfs, "boot", "vmlinuz-*")))[-1]
            shutil.copy(kernel, os.path.join(work, "vmlinuz"))
            make_initrd(os.path.join(rootfs, "lib/modules", os.path.basename(kernel)[len("vmlinuz-"):]),
                        os.path.join(work, "initrd.img"))
            image = os.path.join(work, "disk.img")
            sh("truncate", "-s", IMAGE_SIZE, image)
            sh("mkfs.ext4", "-q", "-F", "-d", rootfs, "-L", "root", image)
            with mounted(image, os.path.join(work, "mnt")) as mnt:
                prepare(mnt)
            settle(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        for old in glob.glob(os.path.join(CACHE, "image-*")):  # what older keys built: 1 GB each
            if os.path.basename(old) != IMAGE_KEY and ".tmp-" not in old:
                shutil.rmtree(old, ignore_errors=True)
    return tuple(os.path.join(final, name) for name in ("disk.img", "vmlinuz", "initrd.img"))


# The initrd: Debian's own (36 MB, every driver) takes a third of a TCG boot; this one loads the few
# modules a virtio disk holding ext4 needs, mounts it and hands over to its systemd, with static busybox.
INITRD_MODULES = ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
                  "kernel/drivers/virtio/virtio_pci_legacy_dev.ko", "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                  "kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/block/virtio_blk.ko", "kernel/lib/crc16.ko",
                  "kernel/fs/mbcache.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/crypto/crc32c_generic.ko",
                  "kernel/fs/ext4/ext4.ko")
INITRD_INIT = """\
#!/bin/busybox sh
export PATH=/bin
busybox mount -t devtmpfs devtmpfs /dev
for m in %s; do busybox insmod /modules/$m || echo "initrd: cannot load $m"; done
for i in $(busybox seq 200); do [ -b /dev/vda ] && break; busybox sleep 0.05; done
busybox mount -t ext4 -o rw /dev/vda /root || { echo "initrd: cannot mount /dev/vda"; busybox sh; }
busybox mount --move /dev /root/dev
exec busybox switch_root /root /sbin/init
"""


def make_initrd(modules, dest):
    """A newc cpio archive (as the kernel unpacks it) of busybox, the modules and /init."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    names = [os.path.basename(m) for m in INITRD_MODULES]
    files = [("dev", 0o40755, b""), ("root", 0o40755, b""), ("bin", 0o40755, b""), ("modules", 0o40755, b""),
             ("init", 0o100755, (INITRD_INIT % " ".join(names)).encode())]
    with open(busybox, "rb") as f:
        files.append(("bin/busybox", 0o100755, f.read()))
    for module in INITRD_MODULES:
        with open(os.path.join(modules, module), "rb") as f:
            files.append(("modules/" + os.path.basename(module), 0o100644, f.read()))
    out = bytearray()
    for ino, (name, mode, data) in enumerate(files + [("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(b"%08x" % v for v in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    with open(dest, "wb") as f:
        f.write(out)


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def prepare(mnt):
    """What the cached image adds to debootstrap's tree."""
    write(os.path.join(mnt, "etc/fstab"), "# / is mounted read-write by the initrd\n")
    write(os.path.join(mnt, "etc/hostname"), "guest\n")
    write(os.path.join(mnt, "etc/machine-id"), uuid.uuid4().hex + "\n")  # not a first boot
    os.makedirs(os.path.join(mnt, "var/log/journal"), exist_ok=True)   # the journal survives the boot
    units = os.path.join(mnt, "etc/systemd/system")
    for unit in MASKED:
        for wants in glob.glob(os.path.join(units, "*.wants", unit)):
            os.unlink(wants)
        os.symlink("/dev/null", os.path.join(units, unit))
    write(os.path.join(units, "isconf-test-poweroff.service"), POWEROFF_UNIT)
    os.symlink("../isconf-test-poweroff.service", os.path.join(units, "multi-user.target.wants",
                                                               "isconf-test-poweroff.service"))


class mounted(object):
    """A loop mount of an image, always undone."""

    def __init__(self, image, where):
        self.image, self.where = image, where

    def __enter__(self):
        os.makedirs(self.where, exist_ok=True)
        sh("mount", "-o", "loop", self.image, self.where)
        return self.where

    def __exit__(self, *exc):
        sh("umount", self.where)


def copy_image(image, dest):
    sh("cp", "--sparse=always", image, dest)
    return dest


def boot(disk, kernel, initrd, console, limit=BOOT_LIMIT):
    """Boot disk under qemu (TCG: KVM hangs on these machines) until the guest powers off or
    reboots (-no-reboot: either ends qemu).  Returns the console text; fails the test if the
    guest is still running after limit seconds, killing it."""
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "1", "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1 mitigations=off", "-nodefaults", "-M", "q35",
            "-drive", "file=%s,format=raw,if=virtio" % disk, "-nic", "none", "-no-reboot", "-display", "none",
            "-vga", "none", "-serial", "file:" + console, "-monitor", "none"]
    proc = subprocess.Popen([tool(argv[0])] + argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the guest was still running after %d s (a hung boot?); console:\n%s"
                    % (limit, read_text(console)[-4000:]))
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out.decode("utf-8", "replace")
    return read_text(console)


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def powered_off(console):
    return "reboot: Power down" in console


def rebooted(console):
    return "reboot: Restarting system" in console


def journal(mnt, *args):
    """The guest's journal, read from outside."""
    proc = sh("journalctl", "-D", os.path.join(mnt, "var/log/journal"), "--no-pager", *args,
              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    return proc.stdout.decode("utf-8", "replace")


if __name__ == "__main__":  # build the image and boot it once, for trying out
    require_tools()
    started = time.time()
    disk, kernel, initrd = build_image()
    print("image ready in %.0f s: %s" % (time.time() - started, disk))
    work = tempfile.mkdtemp()
    try:
        copy = copy_image(disk, os.path.join(work, "disk.img"))
        started = time.time()
        text = boot(copy, kernel, initrd, os.path.join(work, "console"))
        print(text[-3000:])
        print("booted and powered off (%s) in %.0f s" % (powered_off(text), time.time() - started))
        with mounted(copy, os.path.join(work, "mnt")) as mnt:
            print(journal(mnt, "-o", "short-monotonic")[-6000:])
    finally:
        shutil.rmtree(work)
