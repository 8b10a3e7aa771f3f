"""Power cuts under a real filesystem (rules 5 and 17): the real-boot image booted under qemu, its agent
replaying a journal of every kind at boot, and the power cut at a random moment of its run.

The guest's disk is served to qemu by WriteBackDisk, an NBD server in this process that behaves as a disk
with a volatile write cache: what the guest writes stays in the cache until the guest flushes it (ext4's
barriers, the agent's fsync and sync); only a flush puts it on the image file.  Killing qemu alone would
lose nothing at the disk: its writes are already in this machine's page cache.  The cut comes as the guest
sends a write or a flush drawn at random, counted from the agent's start (the disk changes nowhere else, so
these moments leave every state a cut at any instant could; half the cuts count flushes only, so that a
transaction that writes little, the new agent's, has its share).  qemu is killed, and of the writes the
guest made since its last flush a random part reaches the image (none, all, or each 4 KiB piece by chance),
the rest is gone, as on a disk losing power.  What the guest had not even written (its own page cache) is
gone with qemu.

Each boot is a short one: the kernel starts, instead of systemd, a script that runs the agent as the boot
unit does ('up -r --boot'), and the reboot entry's command resets the machine at once (no sync).  Between
boots the image is mounted here, which replays ext4's journal as the next boot would, and read from
outside: every transaction recorded done has its effect, no file the agent writes is torn, no done is
lost, nothing recorded done has run again (each exec appends a line to a file: counted per transaction).
Then the same image boots again, and may be cut again; the last boot of each round ends the journal, and
its files must be those of a run that was never cut.  ISCONF_POWERCUTS (conftest.py) sets the number of
cuts and ISCONF_SEED the cut times and what the cache keeps.
"""

import collections
import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

import realboot
from conftest import AGENT, POWERCUTS, Author, Host, build, extents, replace_file

MIRROR = "/srv/isconf"
TREE = "srv/pc"                 # what the journal manages, besides the agent
RUNS = TREE + "/runs"           # each run of an exec appends a line: its seq and the boot's id
START = "powercut: up starts"   # the script's console markers
EXITED = "powercut: up exited "
REBOOT = "/bin/sh -c 'echo b > /proc/sysrq-trigger; sleep 60'"  # a reset, no sync: what a crash would do
BOOT_SCRIPT = """\
#!/bin/sh
# The power-cut test's boot, started by the kernel instead of systemd: the agent's boot run, then power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
echo "powercut: disk cache: $(cat /sys/block/vda/queue/write_cache)"
echo "%s"
python3 -I %s up -r --boot
echo "%s$?"
sync
mount -o remount,ro /
echo o > /proc/sysrq-trigger
sleep 60
""" % (START, AGENT, EXITED)

MIB = 1 << 20


def pattern(seed, size):
    block = hashlib.sha256(seed).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


OLD, V1, V2 = b"old\n", b"version one\n", b"version two\n"
BIG_OLD, BIG_V1, BIG_V2 = (pattern(s, 4 * MIB) for s in (b"old", b"v1", b"v2"))
HARD = b"one file, two names\n"
SPARSE_SIZE, SPARSE_AT, SPARSE_DATA = 16 * MIB, 3 * MIB, pattern(b"sparse", 64 * 1024)
SPARSE = b"\0" * SPARSE_AT + SPARSE_DATA + b"\0" * (SPARSE_SIZE - SPARSE_AT - len(SPARSE_DATA) - 4) + b"end\n"
OLD_AGENT, NEW_AGENT = build("1.0.0").encode(), build("1.1.0").encode()
AGENT_REL = AGENT.lstrip("/")


def exec_output(seq):
    """What exec seq writes (not atomically) at TREE/exec-SEQ: 256 KiB of its own lines."""
    return (b"transaction %d\n" % seq * 20000)[:256 * 1024]


# The journal, transaction by transaction: an exec, a reboot, or a snap's files (path relative to the root: content).
PLAN = {1: "exec",
        2: {TREE + "/a.conf": V1, TREE + "/big.bin": BIG_V1, TREE + "/sparse.img": SPARSE, TREE + "/h1": HARD,
            TREE + "/h2": HARD},
        3: "exec",
        4: {TREE + "/a.conf": V2, TREE + "/big.bin": BIG_V2},
        5: "exec",
        6: {AGENT_REL: NEW_AGENT},
        7: "exec",
        8: "reboot",
        9: "exec"}
BASE = {TREE + "/a.conf": OLD, TREE + "/big.bin": BIG_OLD, AGENT_REL: OLD_AGENT}  # in the image before the journal
REBOOT_SEQ = min(seq for seq, step in PLAN.items() if step == "reboot")
SNAPPED = sorted(set(path for step in PLAN.values() if isinstance(step, dict) for path in step))


# --- a disk with a volatile write cache, served to qemu over NBD ------------------------------------------------

NBDMAGIC, IHAVEOPT, OPTION_REPLY = 0x4e42444d41474943, 0x49484156454F5054, 0x3e889045565a9
REQUEST, SIMPLE_REPLY = 0x25609513, 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, 0x80000001
INFO_EXPORT = 0
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
FLAG_HAS_FLAGS, FLAG_SEND_FLUSH = 1, 4      # neither FUA, TRIM nor WRITE_ZEROES: qemu does without them
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
SECTOR, PIECE = 512, 4096
CHANGES, FLUSH = "write or flush", "flush"  # what the cuts count
EINVAL = 22


class WriteBackDisk(threading.Thread):
    """An NBD server (fixed newstyle handshake, simple replies) for one qemu, over a unix socket: the image
    file is what is on the platters, self.cache what the disk holds in its volatile cache."""

    def __init__(self, image, sock, cut_at=None):
        threading.Thread.__init__(self, daemon=True)
        # The power fails as the guest sends its cut_at = (n, kind)'th write or flush (kind CHANGES) or flush (FLUSH).
        self.cut_at, self.counts = cut_at, {CHANGES: 0, FLUSH: 0}
        self.counting = threading.Event()  # set once the agent starts: the cuts come after
        self.fd = os.open(image, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(sock)
        self.listener.listen(1)
        self.listener.settimeout(0.2)
        self.cache = {}        # sector number: its 512 bytes, written and not yet flushed
        self.writes = []       # (offset, bytes) of each write since the last flush, in order
        self.power = threading.Event()
        self.power.set()
        self.tripped = threading.Event()
        self.flushes, self.error = 0, None
        self.start()

    def run(self):
        try:
            conn = None
            while conn is None and self.power.is_set():
                try:
                    conn, _ = self.listener.accept()
                except socket.timeout:
                    pass
            if conn is not None:
                with conn:
                    if self.handshake(conn):
                        self.serve(conn)
        except Exception as e:  # a protocol error fails the test (see stop)
            if self.power.is_set():
                self.error = e
        finally:
            self.listener.close()

    def handshake(self, conn):
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        no_zeroes = struct.unpack(">I", receive(conn, 4))[0] & FLAG_NO_ZEROES
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH
        while True:
            magic, option, length = struct.unpack(">QII", receive(conn, 16))
            assert magic == IHAVEOPT, "bad option magic %x" % magic
            receive(conn, length)
            if option == OPT_EXPORT_NAME:
                conn.sendall(struct.pack(">QH", self.size, flags) + (b"" if no_zeroes else b"\0" * 124))
                return True
            if option in (OPT_GO, OPT_INFO):
                self.option_reply(conn, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.size, flags))
                self.option_reply(conn, option, REP_ACK)
                if option == OPT_GO:
                    return True
            elif option == OPT_ABORT:
                self.option_reply(conn, option, REP_ACK)
                return False
            else:  # structured replies, meta contexts, TLS...: not here
                self.option_reply(conn, option, REP_ERR_UNSUP)

    @staticmethod
    def option_reply(conn, option, kind, data=b""):
        conn.sendall(struct.pack(">QIII", OPTION_REPLY, option, kind, len(data)) + data)

    def serve(self, conn):
        while True:
            header = receive(conn, 28, eof_ok=True)
            if header is None or not self.power.is_set():
                return
            magic, _, command, handle, offset, length = struct.unpack(">IHHQQI", header)
            assert magic == REQUEST, "bad request magic %x" % magic
            data = receive(conn, length) if command == CMD_WRITE else None
            if command in (CMD_WRITE, CMD_FLUSH) and self.counting.is_set():
                self.counts[CHANGES] += 1
                self.counts[FLUSH] += command == CMD_FLUSH
                if self.cut_at and self.counts[self.cut_at[1]] == self.cut_at[0]:
                    self.tripped.set()  # it never runs: qemu is killed
                    return
            if command in (CMD_READ, CMD_WRITE) and offset + length > self.size:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY, EINVAL, handle))
            elif command == CMD_READ:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY, 0, handle) + self.read(offset, length))
            elif command == CMD_WRITE:
                self.write(offset, data)
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY, 0, handle))
            elif command == CMD_FLUSH:
                self.flush()
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY, 0, handle))
            elif command == CMD_DISC:
                return
            else:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY, EINVAL, handle))

    def sector(self, number):
        cached = self.cache.get(number)
        return cached if cached is not None else os.pread(self.fd, SECTOR, number * SECTOR)

    def read(self, offset, length):
        data = bytearray(os.pread(self.fd, length, offset))
        if self.cache:
            for number in range(offset // SECTOR, (offset + length - 1) // SECTOR + 1):
                cached = self.cache.get(number)
                if cached is not None:
                    start = number * SECTOR
                    lo, hi = max(start, offset), min(start + SECTOR, offset + length)
                    data[lo - offset:hi - offset] = cached[lo - start:hi - start]
        return bytes(data)

    def write(self, offset, data):
        self.writes.append((offset, data))
        for number in range(offset // SECTOR, (offset + len(data) - 1) // SECTOR + 1):
            start = number * SECTOR
            lo, hi = max(start, offset), min(start + SECTOR, offset + len(data))
            if hi - lo == SECTOR:
                self.cache[number] = data[lo - offset:hi - offset]
            else:
                whole = bytearray(self.sector(number))
                whole[lo - start:hi - start] = data[lo - offset:hi - offset]
                self.cache[number] = bytes(whole)

    def flush(self):
        """The cache onto the platters, in runs of contiguous sectors."""
        numbers = sorted(self.cache)
        i = 0
        while i < len(numbers):
            j = i
            while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
                j += 1
            os.pwrite(self.fd, b"".join(self.cache[n] for n in numbers[i:j + 1]), numbers[i] * SECTOR)
            i = j + 1
        self.cache, self.writes = {}, []
        self.flushes += 1

    def stop(self, cut=None):
        """The end of a boot: qemu is gone.  cut (a random.Random) is a power cut: of the writes since the last
        flush, none, all, or each 4 KiB piece by chance reaches the platters, in the order written (a later
        write of a sector that is kept wins); returns (pieces kept, pieces written).  Without cut, the
        machine stopped by itself and the disk kept its power: its cache reaches the platters."""
        self.power.clear()
        self.join()
        kept = total = 0
        try:
            if self.error is not None:
                raise AssertionError("the NBD server failed: %r" % self.error)
            if cut is None:
                self.flush()
                return None
            chance = cut.choice((0.0, 1.0, cut.random()))
            for offset, data in self.writes:
                for at in range(0, len(data), PIECE):
                    total += 1
                    if cut.random() < chance:
                        kept += 1
                        os.pwrite(self.fd, data[at:at + PIECE], offset + at)
            return kept, total
        finally:
            os.close(self.fd)


def receive(conn, n, eof_ok=False):
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if eof_ok and not buf:
                return None
            raise EOFError("the client went away")
        buf += chunk
    return bytes(buf)


# --- one boot ---------------------------------------------------------------------------------------------------

def boot(image, kernel, initrd, work, name, cut_at=None, rng=None):
    """Boot image through a WriteBackDisk until the guest powers off or resets, or cut the power as the guest
    sends its n'th write or flush, or its n'th flush (cut_at = (n, CHANGES or FLUSH)), counted from the start
    of the agent: the disk changes nowhere else, so a cut between two of them leaves what a cut as the second
    arrives leaves.  Returns
    (console text, (pieces kept, written) if cut else None, the disk's counts, seconds to the start of
    the agent, seconds from then to the end)."""
    sock = os.path.join(work, "nbd.sock")
    console = os.path.join(work, "console-" + name)
    disk = WriteBackDisk(image, sock, cut_at)
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "1", "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1 mitigations=off", "-nodefaults", "-M", "q35",
            "-drive", "file=nbd+unix:///pc?socket=%s,format=raw,if=virtio" % sock, "-nic", "none", "-no-reboot",
            "-display", "none", "-vga", "none", "-serial", "file:" + console, "-monitor", "none"]
    proc = subprocess.Popen([realboot.tool(argv[0])] + argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    started, began = None, time.monotonic()
    try:
        deadline = began + realboot.BOOT_LIMIT
        while proc.poll() is None and time.monotonic() < deadline and not disk.tripped.is_set():
            if started is None and START in realboot.read_text(console):
                started = time.monotonic()
                disk.counting.set()
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode("utf-8", "replace")
        ended = time.monotonic()
        cut = disk.tripped.is_set()
        kept = disk.stop(rng if cut else None)
        os.unlink(sock)
    text = realboot.read_text(console)
    if not cut:
        assert ended - began < realboot.BOOT_LIMIT, "the guest was still running after %d s; console:\n%s" % (
            realboot.BOOT_LIMIT, text[-4000:])
        assert proc.returncode == 0, "qemu failed (%s): %s\nconsole:\n%s" % (proc.returncode, out, text[-4000:])
        assert realboot.powered_off(text) or reset(text), "the guest ended otherwise:\n%s" % text[-4000:]
    started = started or ended
    return text, kept, disk.counts, started - began, ended - started


def reset(console):
    """The guest was reset: the reboot entry's command (no sync, no orderly shutdown)."""
    return "sysrq: Resetting" in console


# --- the disk, read from outside --------------------------------------------------------------------------------

def read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def history(root):
    """The history's records; a torn last line (an append the cut caught) is not one."""
    data = read_file(os.path.join(root, "var/lib/isconf/history")) or b""
    lines = data.split(b"\n")
    events = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            events.append(json.loads(line.decode()))
        except ValueError:
            assert i == len(lines) - 1, "history line %d of %d is damaged: %r" % (i + 1, len(lines), line[:200])
    return events


def runs(root):
    """How many times each exec ran, by the lines it appended; and how many appends the cuts tore.  ext4 journals
    a file's new size apart from the bytes written into its last block, so an append no flush reached may come
    back as NULs: a torn line, which only an exec the cut interrupted (or one whose done waited for its batch) can
    leave, since a done record is written only after its transaction's effects are on the disk."""
    count, torn = collections.Counter(), 0
    for line in (read_file(os.path.join(root, RUNS)) or b"").splitlines():
        if not line.strip(b"\0"):
            torn += 1
            continue
        count[int(line.strip(b"\0").split()[0])] += 1
    return count, torn


def tree(root):
    """The managed files but the run counter: kind, mode, owner, content, link target, holes, mtime of what
    the journal snapped; and which names are one file."""
    seen, inodes = {}, collections.defaultdict(set)
    paths = [AGENT_REL] + [os.path.join(TREE, n) for n in os.listdir(os.path.join(root, TREE))]
    for rel in sorted(paths):
        if rel == RUNS:
            continue
        full = os.path.join(root, rel)
        st = os.lstat(full)
        what = [st.st_mode, st.st_uid, st.st_gid]
        if os.path.isfile(full):
            what += [hashlib.sha256(read_file(full)).hexdigest(), extents(full)]
            if rel in SNAPPED:
                what.append(st.st_mtime_ns)
            if st.st_nlink > 1:
                inodes[st.st_ino].add(rel)
        seen[rel] = what
    return seen, {frozenset(names) for names in inodes.values()}


class State(object):
    """What one cut left on the disk, as the next boot finds it: read after ext4's journal is replayed."""

    def __init__(self, root):
        self.events = history(root)
        self.done = collections.Counter(e["seq"] for e in self.events if e["event"] == "done")
        self.runs, self.torn_runs = runs(root)
        self.files = dict((rel, read_file(os.path.join(root, rel))) for rel in SNAPPED)
        self.outputs = dict((seq, read_file(os.path.join(root, TREE, "exec-%d" % seq)))
                            for seq, step in PLAN.items() if step == "exec")
        h1, h2 = (os.path.join(root, TREE, name) for name in ("h1", "h2"))
        self.linked = os.path.exists(h1) and os.path.exists(h2) and os.path.samefile(h1, h2)
        sparse = os.path.join(root, TREE, "sparse.img")
        self.sparse_blocks = os.stat(sparse).st_blocks if os.path.exists(sparse) else None
        self.pending = min(set(PLAN) - set(self.done), default=None)


def expected(path, done):
    """The content of path once the transactions done have run (None: absent)."""
    content = BASE.get(path)
    for seq in sorted(done):
        if isinstance(PLAN[seq], dict) and path in PLAN[seq]:
            content = PLAN[seq][path]
    return content


def check(state, before, cut=None):
    """The rules at one cut: before is the state the boot started from (None: the image as made), cut where the
    power was cut (None: the boot ran to its end)."""
    done = set(state.done)
    twice = sorted(seq for seq, n in state.done.items() if n > 1)
    assert not twice, "transactions recorded done twice: %s" % twice
    assert done == set(range(1, len(done) + 1)), "done out of order: %s" % sorted(done)
    if cut is None:
        # (A later append joins a torn line's NULs, which then count as its run's line: torn lines only go.)
        assert state.torn_runs <= (before.torn_runs if before else 0), "an uncut boot tore an exec's append"
    if before is not None:
        lost = set(before.done) - done
        assert not lost, "done records lost: %s" % sorted(lost)
        again = sorted(seq for seq in before.done if state.runs[seq] != before.runs[seq])
        assert not again, "transactions recorded done ran again: %s (runs %s, then %s)" % (
            again, dict(before.runs), dict(state.runs))
    # Started and not recorded done: the transaction running at the cut, and those before it whose done records
    # waited for their batch's barrier (group commit).  A start is on disk before anything of its transaction runs.
    started = set(e["seq"] for e in state.events if e["event"] == "started") - done
    for seq, step in PLAN.items():
        if step != "exec":
            continue
        if seq in done:
            assert state.runs[seq] >= 1, "exec %d is recorded done but its line is not on the disk" % seq
            assert state.outputs[seq] == exec_output(seq), "exec %d is recorded done but its file is %s" % (
                seq, describe(state.outputs[seq]))
        elif seq not in started:
            assert state.runs[seq] == 0 and state.outputs[seq] is None, "exec %d ran before its turn" % seq
    for path in SNAPPED:
        whole = expected(path, done)
        # Each transaction started and not done may have left its files, in order, each whole.
        allowed = {whole} | set(expected(path, done | set(range(state.pending, last + 1))) for last in started)
        found = state.files[path]
        if found not in allowed:
            torn = found is not None and found not in NAMES
            raise AssertionError("%s is %s%s, where the transactions done (%s) leave %s" % (
                path, "torn: " if torn else "", describe(found), sorted(done), describe(whole)))
    if 2 in done:
        assert state.linked, "the snap of h1 and h2 is recorded done but they are not one file"
        assert state.sparse_blocks * 512 < SPARSE_SIZE // 4, "the sparse file lost its holes: %d blocks" % (
            state.sparse_blocks)
    for seq in done:
        events = [e["event"] for e in state.events if e["seq"] == seq]
        assert "started" not in events[events.index("done"):], (
            "transaction %d started again after it was recorded done: %s" % (seq, events))


NAMES = {OLD: "OLD", V1: "V1", V2: "V2", BIG_OLD: "BIG_OLD", BIG_V1: "BIG_V1", BIG_V2: "BIG_V2", HARD: "HARD",
         SPARSE: "SPARSE", OLD_AGENT: "the old agent", NEW_AGENT: "the new agent"}


def describe(content):
    if content is None:
        return "absent"
    return NAMES.get(content) or "%d bytes (%r...)" % (len(content), content[:40])


def e2fsck(image):
    """The filesystem is consistent (nothing to repair once its journal is replayed)."""
    proc = realboot.sh("e2fsck", "-fn", image, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    assert proc.returncode == 0, proc.stdout.decode("utf-8", "replace")[-3000:]


# --- the test ---------------------------------------------------------------------------------------------------

def snap(src, *paths):
    return ["--root", src, "snap"] + ["/" + p for p in paths]


def exec_step():
    script = ('yes "transaction $ISCONF_SEQ" | head -c %d > /%s/exec-$ISCONF_SEQ; '
              'echo "$ISCONF_SEQ $(cat /proc/sys/kernel/random/boot_id)" >> /%s' % (256 * 1024, TREE, RUNS))
    return ["exec", "--no-run", "--", "/bin/sh", "-c", script]


@pytest.fixture(scope="module")
def template(tmp_path_factory, keys):
    """A copy of the real-boot image that boots into BOOT_SCRIPT, its agent (version 1.0.0) following a journal of
    every kind in a repository on its own disk; removed afterwards, with what the test made of it."""
    realboot.require_tools()
    image, kernel, initrd = realboot.build_image()
    work = str(tmp_path_factory.mktemp("powercut"))
    disk = realboot.copy_image(image, os.path.join(work, "template.img"))
    src = os.path.join(work, "src")
    with realboot.mounted(disk, os.path.join(work, "mnt")) as mnt:
        os.unlink(os.path.join(mnt, "sbin/init"))
        replace_file(mnt, "sbin/init", BOOT_SCRIPT.encode(), 0o755)
        replace_file(mnt, AGENT_REL, OLD_AGENT, 0o755)
        for rel, content in BASE.items():
            if rel != AGENT_REL:
                replace_file(mnt, rel, content)
        for rel, content in PLAN[2].items():
            if rel != TREE + "/h2" and rel != TREE + "/sparse.img":
                replace_file(src, rel, content, 0o600 if rel.endswith("/h1") else 0o644)
        os.link(os.path.join(src, TREE, "h1"), os.path.join(src, TREE, "h2"))
        with open(os.path.join(src, TREE, "sparse.img"), "wb") as f:
            f.truncate(SPARSE_SIZE)
            f.seek(SPARSE_AT)
            f.write(SPARSE_DATA)
            f.seek(SPARSE_SIZE - 4)
            f.write(b"end\n")
        author = Author(os.path.join(mnt, MIRROR.lstrip("/")), keys=keys)
        author.commit(exec_step(), snap(src, *sorted(PLAN[2])), exec_step())
        for rel, content in PLAN[4].items():
            replace_file(src, rel, content)
        replace_file(src, AGENT_REL, NEW_AGENT, 0o755)
        author.commit(snap(src, *sorted(PLAN[4])), exec_step(), snap(src, AGENT_REL), exec_step(),
                      ["reboot", "-m", "the reboot entry"], exec_step())
        host = Host(mnt)
        host.init(MIRROR, keys, "--reboot-command", REBOOT, "--interrupted-max", "1000")
    yield disk, kernel, initrd, work
    for image in ("template.img", "reference.img", "round.img"):  # a gigabyte each
        if os.path.exists(os.path.join(work, image)):
            os.unlink(os.path.join(work, image))


def test_power_cut(template, seed):
    disk, kernel, initrd, work = template
    rng = random.Random(seed)
    target = os.path.join(work, "target")

    def read_disk(image):
        mount = realboot.mounted(image, target)
        try:
            mount.__enter__()  # replays ext4's journal, as the next boot would
        except subprocess.CalledProcessError:
            e2fsck(image)  # what is wrong with it
            raise
        try:
            return State(target), tree(target)
        finally:
            mount.__exit__()

    # An uncut run: how many writes and flushes each boot makes, and the files every cut run must end with.
    reference = realboot.copy_image(disk, os.path.join(work, "reference.img"))
    changes, times = [], []
    for name in ("reference-1", "reference-2"):
        text, _, changed, starting, took = boot(reference, kernel, initrd, work, name)
        assert "powercut: disk cache: write back" in text, text[-3000:]
        changes.append(changed)
        times.append(took)
    assert realboot.powered_off(text) and EXITED + "0" in text, text[-3000:]
    state, want = read_disk(reference)
    check(state, None)
    assert set(state.done) == set(PLAN) and all(state.runs[s] == 1 for s, p in PLAN.items() if p == "exec")
    e2fsck(reference)
    os.unlink(reference)

    cuts, rounds, boots, landed, pieces = 0, 0, 0, collections.Counter(), [0, 0]
    began, to_start = time.monotonic(), []
    while cuts < POWERCUTS:
        rounds += 1
        image = realboot.copy_image(disk, os.path.join(work, "round.img"))
        before, chain = None, []
        while True:
            boots += 1
            # A boot makes at most about as many changes as the reference's first, or its second once the reboot
            # entry is done.
            phase = 0 if before is None or REBOOT_SEQ not in before.done else 1
            # Half the cuts at any change, half at a flush: a transaction that writes little (the new agent,
            # a reboot) still has its share.
            kind = rng.choice((CHANGES, FLUSH))
            cut_at = (rng.randint(1, changes[phase][kind]), kind) if cuts < POWERCUTS else None
            text, kept, _, starting, _ = boot(image, kernel, initrd, work, "%d-%d" % (rounds, len(chain) + 1),
                                              cut_at, rng)
            to_start.append(starting)
            try:
                state, got = read_disk(image)
            except ValueError as e:
                raise AssertionError("round %d, boot %d: the disk cannot be read: %s\nthe boots of the round: %s\n"
                                     "its console:\n%s" % (rounds, len(chain) + 1, e, "; ".join(chain), text[-3000:]))
            if kept:
                cuts += 1
                pieces = [pieces[0] + kept[0], pieces[1] + kept[1]]
                last = state.events[-1] if state.events else {}
                running = last["seq"] if last.get("event") == "started" else 0  # by the history on the disk
                landed[running] += 1
                chain.append("cut at %s %d, %s, %d of %d pieces kept" % (
                    cut_at[1], cut_at[0], "in transaction %d" % running if running else "between transactions",
                    kept[0], kept[1]))
            elif reset(text):
                chain.append("ended by the reboot entry")
            else:
                chain.append("ended")
            try:
                check(state, before, cut_at if kept else None)
                if not kept and not reset(text):
                    assert EXITED + "0" in text, "the last 'up' failed"
                    assert set(state.done) == set(PLAN), "the last 'up' ended before the head: %s" % sorted(state.done)
                    assert got == want, "the files differ from an uncut run's: %s" % (sorted(
                        p for p in set(got[0]) | set(want[0]) if got[0].get(p) != want[0].get(p)) or (got[1], want[1]))
            except AssertionError as e:
                raise AssertionError("round %d, boot %d: %s\nthe boots of the round: %s\nits console:\n%s" % (
                    rounds, len(chain), e, "; ".join(chain), text[-3000:]))
            before = state
            if not kept and not reset(text):
                break
        e2fsck(image)
        os.unlink(image)
        print("round %d: %s" % (rounds, "; ".join(chain)))
    took = time.monotonic() - began
    print("%d power cuts in %d rounds of %d boots, %.0f s (%.1f s per cut; a boot takes %.1f s to start the agent; "
          "an uncut run makes %d writes and flushes (%d flushes) before the reboot entry, in %.1f s, and %d (%d) "
          "after, in %.1f s); the cuts landed in transactions %s (0: between two); of the writes not flushed "
          "at the cuts, %d of %d 4 KiB pieces reached the disk"
          % (cuts, rounds, boots, took, took / max(cuts, 1), sum(to_start) / len(to_start), changes[0][CHANGES],
             changes[0][FLUSH], times[0], changes[1][CHANGES], changes[1][FLUSH], times[1], sorted(landed.items()),
             pieces[0], pieces[1]))
