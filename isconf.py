#!/usr/bin/env python3
"""isconf.py: keep many machines identical by replaying one signed, ordered journal.

Every host fetches its branch's journal over HTTP (or from a directory), checks the
signed head, the hash chain and every object, and replays in order the transactions
it has not applied yet: commands run as root, file snapshots, reboots.  The same file
holds the author's verbs (lock, exec, snap, reboot, ci, fork) and a small static
server.  Standard library only, CPython 3.6 to 3.13; the agent starts no program for
its own work.  The repository format is specified in README.md.
"""

# The version guard must parse everywhere, so the file keeps to syntax an old
# interpreter can read: no f-strings, no keyword-only arguments.
import sys

if sys.version_info < (3, 6):
    sys.stderr.write("ERROR: isconf.py needs Python 3.6 or newer; this is %s\n"
                     % sys.version.split()[0])
    sys.exit(2)

__version__ = "0.2.0"

# ---------------------------------------------------------------------------
# Imports: everything is imported before the first transaction runs (rule 6), so a
# transaction that replaces the interpreter or its standard library cannot pull
# modules out from under us.  What every run needs is imported here, at start; what
# only applying, an author verb, serve or the dry run's diff needs (LATE_MODULES)
# is imported by import_late(): all of it before the first transaction of a run
# (Applier.apply_in_order), in a new agent's self-test, and before any verb but
# LIGHT_VERBS starts.  An up-to-date 'up' imports none of it.
# ---------------------------------------------------------------------------

import argparse
import base64
import binascii
import calendar
import collections
import configparser
import contextlib
import email.utils      # http.client imports it too
import errno
import fcntl
import gc
import hashlib
import http.client
import io
import json
import os
import posixpath
import re
import select
import shlex
import signal
import socket
import ssl              # http.client imports it too
import stat
import struct
import threading
import time
import urllib.parse
import warnings

# Modules the standard library would import on first use, in the middle of a run:
import encodings.idna   # noqa: F401  (by socket, for host names)

# Imported by import_late(), bound to these names then: None until.
LATE_MODULES = ("ctypes", "difflib", "fnmatch", "getpass", "hmac", "http.server", "socketserver", "subprocess",
                "tempfile", "traceback")
ctypes = difflib = fnmatch = getpass = hmac = socketserver = subprocess = tempfile = traceback = None
LIGHT_VERBS = ("up", "status")  # verbs that import late only what they use: an up-to-date 'up' needs none of it


def import_late(*names):
    """The one home of late imports: import the named LATE_MODULES (all of them when none is named)
    and bind each to its global name.  Called with none before the first transaction of a run, so
    that no transaction runs before everything is imported (rule 6); with names where a verb or an
    error path that never comes after a transaction needs one."""
    for name in names or LATE_MODULES:
        __import__(name)
        top = name.partition(".")[0]
        globals()[top] = sys.modules[top]


def imported_late():
    """Whether every module of LATE_MODULES is imported and bound: what a transaction needs first."""
    return all(name in sys.modules and globals()[name.partition(".")[0]] is sys.modules[name.partition(".")[0]]
               for name in LATE_MODULES)


# A descriptor that wakes us when a transaction's command exits: Linux 5.3 and Python 3.9 have one.
PIDFD_OPEN = getattr(os, "pidfd_open", None)
# A copy between two files inside the kernel (a reflink where the file system shares blocks): Python 3.8 has it.
COPY_FILE_RANGE = getattr(os, "copy_file_range", None)

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

FORMAT = 1                      # repository format this file reads and writes
ZERO_ID = "0" * 64              # the "previous id" of a journal's first entry
SIGNATURE_NAMESPACE = "isconf"  # ssh-keygen -Y namespace: a head signature means nothing elsewhere
REPO_MARKER = "isconf-repo"     # marks a directory as a repository and names its format
HEAD_MAX = 64 * 1024            # a head is ~200 bytes; anything bigger is an attack
SIGNATURE_MAX = 64 * 1024       # an RSA-8192 SSHSIG is under 2 KiB
CHUNK = 64 * 1024               # read and hash size for streams
DIRECTORIES_OPEN = 64           # directories a snap holds open to fsync once at its end (DirectorySyncs)
KERNEL_COPY = 16 * 1024 * 1024  # bytes one copy_file_range or sendfile moves: a signal waits for no more
MAX_REDIRECTS = 5               # a redirect loop must end
FETCH_THREADS = 8               # objects in flight at once: a distant mirror's round trips overlap
MAX_DEADLINE = 7 * 86400        # no one fetch may take longer, whatever its size
INT_MAX = 2 ** 63 - 1           # every integer in the format fits a signed 64-bit field
NUMBER_MAX = 32                 # characters of a JSON number: -INT_MAX-1 has 20, a float's repr at most 24
ID_MAX = 2 ** 32 - 2            # the largest uid or gid; 2**32-1 means "unchanged" to chown
MIN_RATE = 16 * 1024            # bytes/s a fetch may not fall below over its deadline
SYMLINK_HOPS = 40               # as the kernel's ELOOP limit
OWNERS_MAX = 16 * 1024 * 1024   # a target's passwd or group file; larger is not a passwd file
SIGNERS_MAX = 1024 * 1024       # an allowed_signers file of a few thousand keys
VERIFY_MAX = 64 * 1024 * 1024   # what verify-sig reads whole to check; a head is ~200 bytes
RECORD_MAX = 1024 * 1024        # one history record is under 1 KiB; a longer line is damage, not data
STAGED_MAX = 64 * 1024 * 1024   # one staged entry: a snap of some 250,000 paths (its MAC checked once parsed)
CONFIG_MAX = 1024 * 1024        # a host config of a few hundred variables; larger is not a config
CONFIG_BLANKS = 64              # blanks in a row a config line may hold before its '=': more is no KEY = VALUE
LOG_MAX = 1024 * 1024           # bytes a transaction's log keeps over all its attempts: retries cannot fill /var
LOG_ATTEMPTS = 3                # attempts a transaction's log keeps, the last ones: enough to compare a few failures
ATTEMPT_MAX = LOG_MAX // LOG_ATTEMPTS  # bytes one attempt's part of the log keeps, its first and its last output
LOG_NOTES = 1024                # of ATTEMPT_MAX kept for isconf's own lines: the attempt, a cut, the exit status
LOG_LINE_MAX = 240              # bytes of one such line: a snap of 10,000 files names them all
ERROR_MAX = 4096                # of a failure's message kept in the history: a record stays under RECORD_MAX
DIFF_MAX = 1024 * 1024         # bytes of a file 'up --dry-run --diff' shows as a diff; a larger one by size and hash
DEFAULT_TIMEOUT = 30            # seconds a connection may sit silent
OUTPUT_DEFERRED = 4 * 1024 * 1024  # bytes of our own output kept for a stdout that reads slowly; then dropped
OUTPUT_WAIT = 10                # seconds the end of a run waits, at most, for a stream to take what is deferred
DISABLED_KEPT = 16              # earlier reasons 'disable --force' keeps beside the latest
BRANCHES_SHOWN = 20            # branches a missing branch's error names, at most, per mirror
REPOSITORY_STALL = 120          # seconds an author verb may make no progress at all on its repository
DEFAULT_DEADLINE = 300          # seconds any one fetch may take, plus size / MIN_RATE
DEFAULT_RETRIES = 3             # rounds over all mirrors before "unreachable"
DEFAULT_REBOOT = "/sbin/reboot"
DEFAULT_INTERRUPTED_MAX = 3     # starts of one transaction that never ended before it is halted: no boot loop
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"  # the running kernel's: a start records it, to tell a reboot after it
INTERRUPTED_MOST = 1000         # the largest interrupted_max a config may set
# Group commit: the done records of a run's transactions wait for one barrier together (Applier, DoneBatch).
# What a crash or power cut can make run again is bounded by these: the transactions ended in the last
# second, at most 64 of them, and the one running.
BATCH_MOST = 64                 # transactions whose done records one barrier covers, at most
BATCH_SECONDS = 1.0             # seconds a done record may wait for its barrier, counted as transactions end
DEFAULT_BOOT_WAIT = 300         # seconds 'up --boot' waits for a repository before giving up the boot's run
BOOT_WAIT_MAX = 86400           # a boot is never held longer than a day, whatever the config says
BOOT_BACKOFF_MAX = 30           # seconds between two rounds over the mirrors at boot, at most
BOOT_MARGIN = 3600              # seconds the boot unit allows, beyond boot_wait, for fetching and applying
SPLAY_MAX = 86400               # --splay spreads a fleet over at most a day
SYSLOG_PATH = "/dev/log"        # inside --root: the local syslog socket
MACHINE_ID_PATH = "/etc/machine-id"  # inside --root: names this host for --splay
INSTALL_PATH = "/usr/local/sbin/isconf"  # inside --root: where 'install' puts the agent the units run
AGENT_UMASK = 0o022             # what the agent makes is 0755 or 0644 (or tighter), whatever its caller's umask
DEFAULT_EXEC_UMASK = 0o022      # what execs run with unless the config says otherwise (exec_umask)
DEFAULT_WAIT = 3600             # seconds 'up --wait' waits for the host lock: a run longer than an hour is stuck
LOCK_POLL = 0.5                 # seconds between tries for a busy lock: flock has no timeout of its own
REPAIR_NAMES_MAX = 64 * 1024    # bytes of path names one 'repaired' history record keeps, far under RECORD_MAX
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
ID_RE = re.compile(r"^[0-9]{1,10}\Z")
KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
TIME_RE = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z\Z")
# The line each attempt's part of a transaction's log starts with (Applier.apply_one writes it).
LOG_ATTEMPT_RE = re.compile(br"^\[isconf\] [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z transaction ", re.M)
# What a network read can raise: ValueError covers malformed URLs and, on 3.6,
# ssl.CertificateError; UnicodeError (a ValueError) covers bad host names.
NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)

# Self-upgrade (rule 12): how a new agent proves itself, and how the host lock crosses a re-exec.
AGENT_PATH = os.path.abspath(__file__)  # the file this agent runs from, as it was started (a link stays a link)
LOCK_FD_ENV = "ISCONF_LOCK_FD"          # a re-executed agent finds here the host lock it still holds
REEXEC_ENV = "ISCONF_REEXECS"           # ids of the transactions re-execs followed: never twice for one
RUN_ENV = "ISCONF_RUN"                  # a re-executed agent carries on its parent's run record: start, counts
SELF_TEST_TIMEOUT = 120                 # seconds a new agent's self-test may take: it reads a little state
FALLBACK_PYTHON = "/usr/bin/python3"    # a next agent's interpreter when the running one is gone and #! names none
SELF_TEST_RE = re.compile(r"^isconf (\S+) self-test ok$", re.M)  # the line every version prints: keep it
# A signed sample the self-test verifies: the new file's own signature code, on a fixed message and key.
SELF_TEST_SIGNER = ("isconf-self-test ssh-ed25519 "
                    "AAAAC3NzaC1lZDI1NTE5AAAAIN7C0+aFPBF8XGw5HTHT4sBQO0XOhiW7+356hoMLQbp6")
SELF_TEST_MESSAGE = b"isconf self-test: this agent verifies an SSH signature\n"
SELF_TEST_SIGNATURE = b"""-----BEGIN SSH SIGNATURE-----
U1NIU0lHAAAAAQAAADMAAAALc3NoLWVkMjU1MTkAAAAg3sLT5oU8EXxcbDkdMdPiwFA7Rc
6GJbv7fnqGgwtBunoAAAAGaXNjb25mAAAAAAAAAAZzaGE1MTIAAABTAAAAC3NzaC1lZDI1
NTE5AAAAQLBfusuPr6ud1w12fKquc6MoYdgDXoaClkIcY3R1E4Xnqv2N8TmlgDvtF/G+IB
EmEaPFMJWvo4bGKEQIWuM0BAU=
-----END SSH SIGNATURE-----
"""

CONFIG_PATH = "/etc/isconf/isconf.conf"      # inside --root
SIGNERS_PATH = "/etc/isconf/allowed_signers"  # inside --root
STATE_PATH = "/var/lib/isconf"                # inside --root
STATUS_SCHEMA = 1  # of 'status --json' and 'up --dry-run --json': a field's meaning never changes within one
STATE_FORMAT = 2  # host state layout this file reads and writes; 0.1.0's, without a number, is 1
STATE_NAMES = ("state-format", "history", "journal", "head", "head.sig", "lock", "objects", "logs", "last-success",
               "internal-error.log", "installed", "baseline",
               "disabled", "last-run",
               "boot-bin")  # what isconf keeps in it: one of them marks a state directory as ours
STATE_DIRS = ("objects", "logs")  # its directories every host has: staged objects, transactions' logs

# Exit codes: stable across versions.  EXIT_CODES is the one home of what each means: the --help of isconf and of
# each verb list theirs from it, and README.md's Exit codes table lists the same codes.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_REBOOT = 5
EXIT_BUSY = 6
EXIT_STATE = 7
EXIT_DRIFT = 8
EXIT_DISABLED = 9
EXIT_NEWER = 10
EXIT_PENDING = 11
EXIT_SOFTWARE = 70    # sysexits' EX_SOFTWARE
EXIT_SIGNAL = 128     # plus the signal, as a shell reports it
EXIT_CODES = (  # code, the result name last-run and the metrics give it, its meaning in one line
    (EXIT_OK, "ok", "success"),
    (EXIT_FAILED, "failed", "a transaction failed; the host halts there (status: halted there)"),
    (EXIT_USAGE, "usage", "bad command line or input"),
    (EXIT_UNREACHABLE, "unreachable", "no mirror reached, or none had the file; an author's repository not "
     "answering"),
    (EXIT_REFUSED, "refused", "verification failed, or no mirror has the branch; nothing applied or written"),
    (EXIT_REBOOT, "reboot", "the next transaction is a reboot: run 'isconf up -r'"),
    (EXIT_BUSY, "busy", "another run holds this host's lock, or another author the branch's"),
    (EXIT_STATE, "state", "local state or configuration problem (or a full disk)"),
    (EXIT_DRIFT, "drift", "'verify' found a journaled file changed on disk since it was applied"),
    (EXIT_DISABLED, "disabled", "'isconf disable' paused this host; nothing applied"),
    (EXIT_NEWER, "needs-newer", "the next transaction needs a newer isconf"),
    (EXIT_PENDING, "pending", "'up --dry-run': something would run (0: nothing)"),
    (EXIT_SOFTWARE, "internal-error", "a bug in isconf, never a failed transaction: please report it"),
    (EXIT_SIGNAL, "interrupted", "stopped by signal N (129 SIGHUP, 130 Ctrl-C, 143 SIGTERM): run again"),
)

# ---------------------------------------------------------------------------
# Errors: one root, each subclass carries its exit code.
# ---------------------------------------------------------------------------


class IsconfError(Exception):
    exit_code = EXIT_STATE


class TransactionFailed(IsconfError):
    exit_code = EXIT_FAILED
    status = None   # the exit status of the command that failed it, when one did


class UsageError(IsconfError):
    exit_code = EXIT_USAGE


class Unreachable(IsconfError):
    exit_code = EXIT_UNREACHABLE


class NotFound(Unreachable):
    """A mirror answered, but has no such file."""


class BranchMissing(NotFound):
    """A mirror answered, but has no head for the branch: it does not exist there (see Sync.sync)."""


class ShortFile(Unreachable):
    """A mirror answered a Range with 416: its file ends before the first byte asked for (a
    cache's stale journal; or an object whose start a host kept from another mirror)."""


class Refused(IsconfError):
    exit_code = EXIT_REFUSED


class NoSuchBranch(Refused):
    """Every mirror answered that the branch has no head: a wrong name, never the network's fault,
    so not tried again."""


class Unknown(Refused):
    """A kind, file type or field this version does not know: a newer isconf may (see Entry.interpret)."""


class NeedsNewer(Refused):
    """A verified, signed entry of a kind or with fields this version does not know: a
    newer isconf wrote it.  The host halts there; it is not the mirror's fault."""
    exit_code = EXIT_NEWER


class Busy(IsconfError):
    exit_code = EXIT_BUSY


class StateError(IsconfError):
    exit_code = EXIT_STATE


class Disabled(IsconfError):
    exit_code = EXIT_DISABLED


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (cron under timeout(1), a dropped ssh session, kill): stop as
    Ctrl-C does, the running command's process group included, and exit 128 + signal."""

    def __init__(self, signum):
        KeyboardInterrupt.__init__(self, signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signal(signum, frame):
    raise Interrupted(signum)


REBOOT_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # init's, or a human's, way to stop the agent


# ---------------------------------------------------------------------------
# Low-level helpers: canonical JSON, time, hashing, durable files, records, locks.
# ---------------------------------------------------------------------------


def canonical(obj):
    """The one byte form of a JSON value that the format hashes and signs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def _bounded_number(convert):
    def parse(text):
        if len(text) > NUMBER_MAX:
            raise ValueError("a number longer than %d characters" % NUMBER_MAX)
        return convert(text)
    return parse


def parse_json(data):
    """The one parse of JSON bytes, for every file and answer isconf reads.  A number's length is
    checked before it is converted (attack: one number of megabytes of digits, which int() on
    Python 3.6 to 3.10 converts in quadratic time), so a parse costs time linear in the bytes.
    ValueError (UnicodeDecodeError among them) if it is not JSON."""
    try:
        return json.loads(data.decode("utf-8"), parse_int=_bounded_number(int),
                          parse_float=_bounded_number(float))
    except RecursionError:  # arrays or objects nested thousands deep
        raise ValueError("arrays or objects nested too deep")


def parse_canonical(data, what):
    """Parse bytes that must already be canonical; anything else is refused."""
    try:
        obj = parse_json(data)
    except ValueError as e:  # a number longer than NUMBER_MAX, invalid UTF-8, nesting thousands deep
        raise Refused("%s is not valid JSON (%s); the file is damaged or not an isconf file"
                      % (what, str(e).split(":")[0][:80]))
    try:
        same = isinstance(obj, dict) and canonical(obj) == data
    except (ValueError, RecursionError):  # NaN, Infinity, a lone surrogate: valid to json, never canonical
        same = False
    if not same:
        raise Refused("%s is not in canonical form; it was altered after it was written" % what)
    return obj


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


class HashingWriter(object):
    """A file wrapper that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.length, self.sha256 = f, 0, hashlib.sha256()

    def write(self, data):
        self.f.write(data)
        self.sha256.update(data)
        self.length += len(data)

    def hexdigest(self):
        return self.sha256.hexdigest()


def plural(count, noun):
    """'1 time', '3 times': a count said as a person says it."""
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def format_time(seconds):
    return time.strftime(TIME_FORMAT, time.gmtime(seconds))


def parse_time(text, what="time"):
    """Parse a UTC time exactly as the format writes it (2026-11-25T06:30:00Z).

    Not time.strptime: it takes '2026-1-5T1:2:3Z', spaces and non-ASCII digits, so one
    signed time could have several spellings.  Years start at 1970, as format_time's do."""
    m = TIME_RE.match(text) if isinstance(text, str) else None
    if m:
        year, month, day, hour, minute, second = (int(g) for g in m.groups())
        if (year >= 1970 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
                and hour < 24 and minute < 60 and second < 60):
            return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    raise Refused("%s %s is not a UTC time like 2026-11-25T06:30:00Z" % (what, repr(text)[:40]))


def parse_duration(text):
    """'30d', '12h', '90m', '45s' -> seconds."""
    m = re.match(r"^([0-9]{1,9})([smhdw])$", text or "")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)] if m else 0
    if not 0 < seconds <= 100 * 366 * 86400:
        raise UsageError("duration %r is not a number followed by s, m, h, d or w, between 1s and 100 years "
                         "(e.g. 30d)" % text)
    return seconds


# --- durable files ---------------------------------------------------------------
# Every file isconf writes goes through one of two primitives: replace_at (a whole new version
# of a name: temp name in the same directory, written, fsynced, renamed over the name, the
# directory fsynced) and durable_append (records added to an append-only file, fsynced).  The
# system-call hazards live here once: a partial write (write_all), a full disk or a failed rename
# (ENOSPC, EISDIR, ENAMETOOLONG: the temp name is removed on every failure, so no hidden copy with
# its final mode stays behind), EXDEV (the temp name is always in the target's own directory; the
# one rename from another, of a staged object into place, copies it instead: RegularFile.write_copy).
# EINTR is retried by Python itself (PEP 475).


def write_all(fd, data):
    """os.write may write less than asked (signals, pipes, full disks)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def file_kind(mode):
    for test, kind in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return kind
    return "file of unknown type"


def misplaced(path, found, wanted):
    """The error for a host file that is not what isconf keeps there (attack: a link planted
    in the image or made by a transaction, to turn the agent's writes against the miniroot)."""
    return StateError("%s is a %s where isconf keeps a %s; isconf does not follow or replace it: find out what "
                      "put it there, move it away, and run again" % (path, found, wanted))


def check_private(st, path):
    """sshd's StrictModes for the host's own files: what the agent trusts (its config, trusted keys,
    state, the agent file the units run, and each directory on the way to them inside the root) must be
    owned by root (or by the user the agent runs as) and writable by no one else.  st is the fstat of the
    descriptor about to be used, so what was checked is what is read (attack: a user who can write
    etc/isconf renames his own allowed_signers into place, or edits a history he owns so that a
    pending security fix counts as done)."""
    mode, wrong, fixes = stat.S_IMODE(st.st_mode), [], []
    if st.st_uid not in (0, os.geteuid()):
        wrong.append("owned by uid %d, not root" % st.st_uid)
        fixes.append("chown root %s" % shlex.quote(path))
    writers = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit]
    if writers:
        wrong.append("writable by %s" % " and ".join(writers))
        fixes.append("chmod go-w %s" % shlex.quote(path))
    if wrong:
        raise StateError("%s is %s (owner %s, mode %04o): run '%s'" % (
            path, " and ".join(wrong), "root" if st.st_uid == 0 else "uid %d" % st.st_uid, mode,
            " && ".join(fixes)))


class CheckedDir(int):
    """A descriptor of one of the host's own directories, found private (check_private): every file
    open_regular opens in it is checked too, on the descriptor it opened.  An int, which every os
    function takes as the descriptor it is."""


def regular_stat(path, dir_fd):
    """lstat of path's last name in dir_fd: None if it does not exist, refused if it is not a regular file."""
    try:
        st = os.stat(os.path.basename(path), dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise misplaced(path, file_kind(st.st_mode), "regular file")
    return st


def open_regular(path, flags, mode=0o644, dir_fd=None):
    """Open one of the host's own files.  With dir_fd (a directory held open, see StateDir),
    path's last name is opened inside it, never through a link (O_NOFOLLOW), never
    waiting on a FIFO (O_NONBLOCK), and only if it is a regular file; path itself is only
    for messages.  Without dir_fd, a plain open (the author's side)."""
    if dir_fd is None:
        return os.open(path, flags, mode)
    regular_stat(path, dir_fd)  # a device is never opened, even for a moment
    try:
        fd = os.open(os.path.basename(path), flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode,
                     dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):  # swapped in since the lstat
            regular_stat(path, dir_fd)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise misplaced(path, file_kind(st.st_mode), "regular file")
    if flags & (os.O_WRONLY | os.O_RDWR) and st.st_nlink > 1:
        # A hard link planted in the image could name a file of the miniroot on the same filesystem.
        os.close(fd)
        raise misplaced(path, "file with %d hard links" % st.st_nlink, "file of its own")
    if isinstance(dir_fd, CheckedDir):
        try:
            check_private(st, path)
        except StateError:
            os.close(fd)
            raise
    return fd


def open_directory(path):
    """A descriptor of a directory named by the caller (the author's side, --config's directory)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _lexists(name, dir_fd):
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def temp_name(name, locked=False):
    """A temporary name beside name, short whatever name's length in bytes.  Under a lock (locked)
    it is the same in every run, so the next run removes what a killed one left there; else it
    holds the pid, so that two writers without a lock never share one."""
    digest = sha256_hex(name.encode("utf-8", "surrogateescape"))[:16]
    return ".isconf-" + digest if locked else ".isconf-%d-%s" % (os.getpid(), digest)


def rename_into_place(dfd, old, new, sync=True, temporary=True, old_dfd=None):
    """The one rename: old becomes new inside the directory dfd, durably (the directory is fsynced,
    unless sync is false: the caller fsyncs it once after several).  When old is a temporary name,
    a failed rename removes it, so that nothing of it stays hidden beside new; and a rename onto
    the same file through another of its names, which does nothing (POSIX), removes old too
    rather than leave it as a second link.  With old_dfd, old is in that directory (on dfd's file
    system, or EXDEV), and only dfd is fsynced."""
    source = dfd if old_dfd is None else old_dfd
    try:
        os.rename(old, new, src_dir_fd=source, dst_dir_fd=dfd)
        if temporary and _lexists(old, source):
            os.unlink(old, dir_fd=source)
    except BaseException:
        if temporary:
            with contextlib.suppress(OSError):
                os.unlink(old, dir_fd=source)
        raise
    if sync:
        os.fsync(dfd)


def replace_at(dfd, name, make, locked=False, sync=True):
    """The one durable replace: make(tmp) creates the new version of name under a temporary
    name in the same directory (a file written by write_new, or a link); it is then renamed
    over name, and the directory fsynced.  Readers see the old version or the new one, never
    a torn one; on every failure the temporary name is removed.  A make that returns a name
    (content named by its hash) puts the new file there instead."""
    tmp = temp_name(name, locked)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dfd)  # left by a run that died here
    try:
        final = make(tmp) or name
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    rename_into_place(dfd, tmp, final, sync)
    return final


def finish_new(fd, mode, owner=None, mtime_ns=None, sync=True):
    """Give a new file, its content whole, its owner, mode and mtime, and fsync it (unless sync is
    false): a set-id mode is given last, after chown (which clears it)."""
    if owner is not None:
        os.fchown(fd, *owner)
    os.fchmod(fd, mode)
    if mtime_ns is not None:
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    if sync:
        os.fsync(fd)


class DirectorySyncs(object):
    """Directories that took renames and must be made durable once after all of them (a snap of a
    hundred files in one directory: one fsync of it, not a hundred).  At most DIRECTORIES_OPEN are
    held open: when full, they are synced then, not at the end."""

    def __init__(self):
        self.open = collections.OrderedDict()  # (device, inode) -> a descriptor of the directory

    def add(self, dfd):
        st = os.fstat(dfd)
        if (st.st_dev, st.st_ino) not in self.open:
            if len(self.open) >= DIRECTORIES_OPEN:
                self.sync()
            self.open[(st.st_dev, st.st_ino)] = os.dup(dfd)

    def sync(self):
        try:
            for fd in self.open.values():
                os.fsync(fd)
        finally:
            self.close()

    def close(self):
        while self.open:
            os.close(self.open.popitem()[1])


def write_new(dfd, name, fill, mode, owner=None, mtime_ns=None, sync=True):
    """Create the new file name in dfd (never through a link, never over an existing one), let
    fill(fd) write its content, then finish it (finish_new).  It is 0600 until its content is whole."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        fill(fd)
        finish_new(fd, mode, owner, mtime_ns, sync)
    finally:
        os.close(fd)


def atomic_write(path, data, mode=0o644, dir_fd=None, keep_owner=False, durable=True):
    """Replace path with data (replace_at).  With dir_fd, path's last name is replaced inside that
    directory, only over a regular file (see open_regular); with keep_owner, an existing file's
    mode and owner carry over to the new one.  Without durable, neither the file nor the directory
    is fsynced: for a record whose loss at a power cut is harmless (the caller says why)."""
    if dir_fd is None:
        dfd = open_directory(os.path.dirname(os.path.abspath(path)))
        try:
            return atomic_write(path, data, mode, dfd, keep_owner, durable)
        finally:
            os.close(dfd)
    old = regular_stat(path, dir_fd)
    owner = None
    if keep_owner and old is not None:
        owner, mode = (old.st_uid, old.st_gid), stat.S_IMODE(old.st_mode)
    replace_at(dir_fd, os.path.basename(path),
               lambda tmp: write_new(dir_fd, tmp, lambda fd: write_all(fd, data), mode, owner, sync=durable),
               sync=durable)


def durable_append(fd, data):
    """The one durable append: data is on disk when this returns."""
    write_all(fd, data)
    os.fsync(fd)


def append_at(path, keep, data, dir_fd=None):
    """Cut an append-only file back to its first keep bytes (what a crashed writer added
    past them is not part of it), then append data durably."""
    fd = open_regular(path, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd)
    try:
        os.ftruncate(fd, keep)
        os.lseek(fd, keep, os.SEEK_SET)
        durable_append(fd, data)
    finally:
        os.close(fd)


# --- sparse files: a snap stores only the data extents of a file with holes ---------------------


def data_extents(fd, size):
    """The data extents of an open file, from SEEK_DATA/SEEK_HOLE: [[offset, length], ...]."""
    extents, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append([start, end - start])
        offset = end
    return extents


def copy_extents(source, fd, extents, digest, into_holes, short):
    """Copy a sparse file's data extents between a file object and a descriptor, hashing them on the way:
    into_holes, from a stored object (extents back to back) into their places in fd; else from their
    places in source to fd back to back.  StateError(short) if source ends before they do."""
    for offset, length in extents:
        if into_holes:
            os.lseek(fd, offset, os.SEEK_SET)
        else:
            source.seek(offset)
        while length:
            chunk = source.read(min(CHUNK, length))
            if not chunk:
                raise StateError(short)
            digest.update(chunk)
            write_all(fd, chunk)
            length -= len(chunk)


def _copy_file_range(source, fd, count, at, offset):
    return COPY_FILE_RANGE(source, fd, count, at, offset)


def _sendfile(source, fd, count, at, offset):
    os.lseek(fd, offset, os.SEEK_SET)  # sendfile writes at fd's position (a regular file: Linux 2.6.33)
    return os.sendfile(fd, source, at, count)


def _read_write(source, fd, count, at, offset):
    chunk = os.pread(source, min(count, CHUNK), at)
    os.lseek(fd, offset, os.SEEK_SET)
    write_all(fd, chunk)
    return len(chunk)


# How copy_in_kernel copies, best first; a way the kernel refuses for these two files gives way to the next.
KERNEL_COPIES = tuple(way for way in (COPY_FILE_RANGE and _copy_file_range, _sendfile, _read_write) if way)
KERNEL_REFUSALS = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def copy_in_kernel(source, fd, extents, short):
    """Copy a stored object (its extents back to back in the descriptor source) into their places in
    fd, its bytes kept out of the agent where the kernel can: copy_file_range (a reflink, or a copy
    inside the kernel), else sendfile, else pread and write, CHUNK bytes at a time.  A way the kernel
    refuses for these two files (EXDEV: across file systems, as most kernels refuse it; EINVAL,
    ENOSYS, EOPNOTSUPP: a file system or kernel without it), or that ends early, gives way to the
    next.  Nothing is hashed: the object was verified in this run (StagedObjects).  Memory stays flat.
    StateError(short) if source ends first."""
    ways, at = list(KERNEL_COPIES), 0
    for offset, length in extents:
        done = 0
        while done < length:
            try:
                n = ways[0](source, fd, min(length - done, KERNEL_COPY), at + done, offset + done)
            except OSError as e:
                if len(ways) == 1 or e.errno not in KERNEL_REFUSALS:
                    raise
                n = None
            if not n:
                if len(ways) == 1:
                    raise StateError(short)
                ways.pop(0)
                continue
            done += n
        at += length


def zeros_outside(fd, extents, size):
    """Whether the file holds nothing but zeros outside extents; holes are skipped, not read."""
    gaps, end = [], 0
    for offset, length in extents + [[size, 0]]:
        if offset > end:
            gaps.append((end, offset))
        end = offset + length
    for offset, stop in gaps:
        while offset < stop:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only holes up to the end
                    return True
                raise
            if offset >= stop:
                break
            data_end = min(os.lseek(fd, offset, os.SEEK_HOLE), stop)
            while offset < data_end:
                chunk = os.pread(fd, min(CHUNK, data_end - offset), offset)
                if not chunk:
                    return True
                if chunk.count(0) != len(chunk):
                    return False
                offset += len(chunk)
    return True


def disk_digest(fd, recorded_size, extents=None):
    """(SHA-256, size) of an open file read as a snap stored it: the bytes at the recorded
    extents when it holds only zeros elsewhere (a sparse file's holes), else the whole file.
    A file of another size is not read at all (its SHA-256 is None): the size says it differs."""
    size = os.fstat(fd).st_size
    if size != recorded_size:
        return None, size
    if extents is None or not zeros_outside(fd, extents, size):
        extents = [[0, size]]
    digest = hashlib.sha256()
    for offset, length in extents:
        end = offset + length
        while offset < end:
            chunk = os.pread(fd, min(CHUNK, end - offset), offset)
            if not chunk:  # cut short while read
                break
            digest.update(chunk)
            offset += len(chunk)
    return digest.hexdigest(), size


def write_record(fd, fields):
    """Append one canonical JSON line to a file open_records opened: on disk when this returns."""
    durable_append(fd, canonical(fields) + b"\n")


def open_records(path, dir_fd=None):
    """Open a file of records for appending.  A power cut during an earlier append leaves
    at most a torn last line: it is cut off first, so the next record starts on a line
    of its own and the file stays readable."""
    fd = open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644, dir_fd)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            tail = os.pread(fd, min(end, 1 << 20), end - min(end, 1 << 20))
            cut = tail.rfind(b"\n")
            if cut < 0 and len(tail) < end:
                raise StateError("%s ends in a damaged record over 1 MiB long; the disk may be failing" % path)
            os.ftruncate(fd, end - len(tail) + cut + 1)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append_record(path, fields, dir_fd=None):
    """Append one canonical JSON line and fsync it (open_records, write_record)."""
    fd = open_records(path, dir_fd)
    try:
        write_record(fd, fields)
    finally:
        os.close(fd)


def _too_long(path, what, offset, limit=RECORD_MAX):
    return StateError("%s %s is damaged at byte %d: a line longer than %d bytes, which isconf never writes; the "
                      "file was overwritten or the disk is failing: move it away and find out what happened"
                      % (what, path, offset, limit))


def _lines_forward(f, path, what, limit=RECORD_MAX):
    """(offset, line) of each complete line, first to last; what follows the last newline is a torn append."""
    offset = 0
    while True:
        line = f.readline(limit + 1)
        if not line.endswith(b"\n"):
            if len(line) > limit:
                raise _too_long(path, what, offset, limit)
            return
        yield offset, line[:-1]
        offset += len(line)


def _lines_backward(fd, size, path, what):
    """(offset, line) of each complete line, last to first, read a CHUNK at a time from the end."""
    pos, rest, torn = size, b"", True  # rest: the start of a line whose beginning is not read yet
    while pos > 0:
        n = min(CHUNK, pos)
        pos -= n
        parts = (os.pread(fd, n, pos) + rest).split(b"\n")
        rest = parts[0]
        end = pos + len(parts[0])  # where the newline after rest is
        found = []
        for line in parts[1:]:
            found.append((end + 1, line))
            end += 1 + len(line)
        for offset, line in reversed(found):
            if torn:  # what follows the last newline
                torn = False
                if len(line) > RECORD_MAX:
                    raise _too_long(path, what, offset)
                continue
            yield offset, line
        if len(rest) > RECORD_MAX:
            raise _too_long(path, what, pos)
    if not torn:
        yield 0, rest


def _record(line, path, what, offset):
    try:
        record = parse_json(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise StateError("%s %s is damaged at byte %d; it was edited or the disk is failing" % (what, path, offset))
    return record


def read_records(path, what, until=None, dir_fd=None, limit=RECORD_MAX):
    """The JSON objects of a file written by append_record; a torn last line is ignored.

    Read a chunk at a time and a line at most RECORD_MAX long (attack: a sparse history of
    gigabytes planted in the image), so memory is what the records take, never the file's
    size.  With until (a test on a record), read from the end backwards and stop at the last
    record it holds for: that record and those after it (all of them if none holds)."""
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY, 0, dir_fd), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if until is None:
                return [_record(line, path, what, offset) for offset, line in _lines_forward(f, path, what, limit)]
            records = []
            for offset, line in _lines_backward(f.fileno(), size, path, what):
                records.append(_record(line, path, what, offset))
                if until(records[-1]):
                    break
            return records[::-1]
    except FileNotFoundError:
        return []


def read_file(path, limit=None, dir_fd=None):
    with os.fdopen(open_regular(path, os.O_RDONLY, 0, dir_fd), "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise StateError("%s is larger than %d bytes, more than such a file ever holds; find out what made it so "
                         "and replace it" % (path, limit))
    return data


def denied_advice(error):
    """What to do about an OSError a user other than root gets on root's files (an admin who forgot
    sudo): '; run isconf as root ...', else ''."""
    if error.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
        return "; run isconf as root: a host's config and state are root's"
    return ""


def makedirs(path, mode=0o755):
    try:
        os.makedirs(path, mode)
    except OSError as e:
        if e.errno != errno.EEXIST or not os.path.isdir(path):
            raise


class FileLock(object):
    """An exclusive flock, held for the life of a run; the kernel drops it if we die.

    With holder, the lock file names who holds it (pid and start time) while it is held,
    for the busy message of whoever comes next.  With wait, a busy lock is tried again
    for up to wait seconds (flock has no timeout; a blocking flock would outlive it),
    and on_wait(holder) is called once when the waiting starts.  With inherit, a lock
    handed over by a re-executing agent (see Applier.reexec) is taken over instead: there
    is no moment between the two processes when it is free."""

    def __init__(self, path, what, dir_fd=None, holder=False, wait=None, on_wait=None, inherit=False):
        self.path, self.what, self.fd, self.dir_fd = path, what, None, dir_fd
        self.holder, self.wait, self.on_wait, self.inherit = holder, wait, on_wait, inherit

    def __enter__(self):
        self.fd = self.inherited() if self.inherit else None
        if self.fd is not None:
            return self
        self.fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o600 if self.dir_fd is not None else 0o644,
                               self.dir_fd)
        try:
            self._take()
            if self.holder:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, canonical({"pid": os.getpid(), "since": format_time(time.time())}) + b"\n", 0)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def _take(self):
        deadline = None if self.wait is None else time.time() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is None or time.time() >= deadline:
                waited = " after waiting %s s" % ("%g" % self.wait) if self.wait else ""
                raise Busy("%s is busy (%s is locked by %s)%s; try again when it ends"
                           % (self.what, self.path, self.held_by(), waited))
            if self.on_wait is not None:
                self.on_wait(self.held_by())
                self.on_wait = None
            time.sleep(max(0, min(LOCK_POLL, deadline - time.time())))

    def held_by(self):
        """Who holds the lock, as its holder wrote it: 'pid N since TIME', or 'another process'."""
        if not self.holder:
            return "another process"
        try:
            fields = parse_json(os.pread(self.fd, 256, 0))
        except (OSError, ValueError):  # empty: taken a moment ago, not yet named
            return "another process"
        if not (isinstance(fields, dict) and isinstance(fields.get("pid"), int)
                and TIME_RE.match(str(fields.get("since")))):
            return "another process"
        return "pid %d since %s" % (fields["pid"], fields["since"])

    def __exit__(self, *exc):
        try:
            if self.holder:
                os.ftruncate(self.fd, 0)  # no stale name for a holder that has gone
        finally:
            os.close(self.fd)

    def inherited(self):
        """The descriptor named by $ISCONF_LOCK_FD, only if it is this very lock file and holds
        its flock (flock again on the same open file is a no-op; on another, busy); else None,
        and the lock is taken as usual.  A stray variable grants nothing."""
        number = os.environ.pop(LOCK_FD_ENV, None)
        if number is None or not ID_RE.match(number):
            return None
        fd = int(number)
        try:
            held = os.fstat(fd)
            st = os.stat(os.path.basename(self.path), dir_fd=self.dir_fd, follow_symlinks=False)
            if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(st.st_mode):
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.set_inheritable(fd, False)  # no exec transaction gets it
        except OSError:
            return None
        return fd


# ---------------------------------------------------------------------------
# Output: the reporter, the one owner of what isconf prints.
# ---------------------------------------------------------------------------


# C0 and C1 controls, DEL, and the bidirectional overrides that make text display
# other than it reads (attack: a journal message that rewrites the admin's screen).
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text):
    """Text from the network or the journal, made safe to print: every control character
    escaped, so it is always one line and never a terminal escape sequence."""
    return CONTROL_RE.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 0x100
                          else "\\u%04x" % ord(m.group()), text)


def log_line(text):
    """One line of isconf's own for a transaction's log, cut to LOG_LINE_MAX bytes."""
    line = text.encode("utf-8", "replace")
    return (line if len(line) <= LOG_LINE_MAX else line[:LOG_LINE_MAX - 3] + b"...") + b"\n"


def silence(stream):
    """Point a stream that can no longer be written at /dev/null, what it holds dropped."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class Syslog(object):
    """Lines for the local syslog at ROOT/dev/log, when there is one: RFC 3164 datagrams,
    facility daemon, tag isconf, as glibc's syslog() sends them (no program started).
    A syslog that is missing, full or gone never stops or slows a run: the console has it all."""

    FACILITY = 3  # daemon
    MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    INFO, WARNING, ERR = 6, 4, 3

    def __init__(self):
        self.sock = None

    def open(self, rootpath):
        if self.journal_has_output():
            return  # systemd's journal has every line already: a second copy would only double them
        try:
            # Through the root's links (Debian's /dev/log leads to /run/systemd/journal/dev-log), never out of it.
            inside = "/" + os.path.relpath(rootpath.resolve(SYSLOG_PATH), rootpath.root)
            dfd, name = rootpath.parent(inside)
        except OSError:
            return
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode):
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            # By the directory already opened inside the root, so a link swapped in cannot lead out of it.
            via_fd = "/proc/self/fd/%d/%s" % (dfd, name)
            try:
                sock.connect(via_fd if os.path.isdir("/proc/self/fd") else os.path.join(rootpath.root, inside[1:]))
            except OSError:
                sock.close()
                return
            self.sock = sock
        except OSError:
            return
        finally:
            os.close(dfd)

    @staticmethod
    def journal_has_output():
        """Whether systemd connected stdout or stderr to its journal ($JOURNAL_STREAM names the
        device and inode of that stream, as systemd.exec(5) says to check)."""
        stream = os.environ.get("JOURNAL_STREAM", "")
        for fd in (1, 2):
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if stream == "%d:%d" % (st.st_dev, st.st_ino):
                return True
        return False

    def send(self, text, severity=INFO):
        if self.sock is None:
            return
        t = time.localtime()
        line = "<%d>%s %2d %02d:%02d:%02d isconf[%d]: %s" % (
            self.FACILITY * 8 + severity, self.MONTHS[t.tm_mon - 1], t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec,
            os.getpid(), printable(text))
        try:
            self.sock.send(line.encode("utf-8", "replace")[:2048])
        except OSError:  # full (EAGAIN), restarted (ECONNREFUSED): the console still has the line
            pass

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Reporter(object):
    """The one owner of output (rule: nothing else prints).  It knows the verbosity, whether a
    stream is a terminal, the syslog, and escapes what came from outside.

    - Reports (status, log, JSON) go to stdout as asked, never dated, never silenced.
    - Messages ('isconf: ...') go to stdout; warnings and errors to stderr.  -q drops the
      messages, transaction lines and command output, never a warning or an error.  Off a
      terminal (a cron log, a journal) every message line starts with its UTC time.
    - One line per transaction: '[17/120] exec apt-get install -y nginx ... ok (2.3 s)'.  On a
      terminal the line starts when the transaction does and ends when it ends.
    - Download progress appears on a terminal only, on one line that is rewritten.
    - With syslog open ('up --boot', '--syslog'), messages, warnings and errors go there too.
    A closed pipe ('isconf up | head') must not stop a transaction half-way: what cannot be
    written is dropped, and the logs keep it all.
    """

    def __init__(self):
        self.quiet = False
        self.syslog = Syslog()
        self.open_line = None   # (stream, text) of a transaction line begun on a terminal, not yet ended
        self.progress_shown = False
        self.deferred = {}      # per descriptor: what a stream could not take yet (bytearray)
        self.dropped, self.dropped_total = {}, 0   # bytes dropped while a stream was blocked: per descriptor, in all
        self.ends_line = {}     # per descriptor: whether what was written last ended a line

    @staticmethod
    def terminal(stream):
        try:
            return stream is not None and stream.isatty()
        except (OSError, ValueError):
            return False

    def write(self, data, stream=None, wait=True):
        """Write text or bytes as they are (the one place that writes to a stream).

        Without wait, nothing waits on the stream: what it cannot take now (a pipe to a logger
        that reads slowly, or stopped reading; a stuck journal socket) is deferred, up to
        OUTPUT_DEFERRED bytes, and written as it takes them (pump(), and run_command wakes for
        it); what is beyond that is dropped, counted, and said once where the stream goes on.  So
        a transaction's timeout and its log's bound never wait on the agent's own output.  Pipes
        and sockets are written PIPE_BUF bytes at a time, each after poll() said there is room,
        so no one write blocks; a regular file always has room.  Reports wait: 'isconf log | less'
        must show it all."""
        stream = stream or sys.stdout
        if stream is None:  # started with the descriptor closed
            return
        self._interrupt(stream, wait)
        if not isinstance(data, bytes):
            encoding = getattr(stream, "encoding", None) or "utf-8"
            try:
                data = data.encode(encoding, getattr(stream, "errors", None) or "strict")
            except (UnicodeError, LookupError):
                data = data.encode(encoding, "replace")
        try:
            stream.flush()   # nothing is buffered there (all output comes here), unless a library printed
            fd = stream.fileno()
        except (OSError, ValueError):
            fd = None        # not a descriptor: as it is (an in-process caller's buffer)
        try:
            if fd is None:
                if getattr(stream, "buffer", None) is None:   # a text buffer (io.StringIO)
                    stream.write(data.decode(getattr(stream, "encoding", None) or "utf-8", "replace"))
                else:
                    stream.buffer.write(data)
                stream.flush()
                return
            pending = self.deferred.setdefault(fd, bytearray())
            if self.dropped.get(fd) and len(pending) + len(data) + 200 <= OUTPUT_DEFERRED or wait:
                self._say_dropped(fd, stream)
            if len(pending) + len(data) > OUTPUT_DEFERRED and not wait:
                self.dropped[fd] = self.dropped.get(fd, 0) + len(data)
                self.dropped_total += len(data)
                return
            pending += data
            self.ends_line[fd] = pending[-1:] == b"\n" if pending else self.ends_line.get(fd, True)
            self._drain(fd, wait)
        except (OSError, ValueError):  # a closed pipe, a full disk under a cron log, a closed stream
            self.deferred.pop(fd, None)
            silence(stream)

    def _say_dropped(self, fd, stream):
        """The one line that says what was dropped, in the stream where it was dropped (and to syslog)."""
        if not self.dropped.get(fd):
            return
        notice = "output to %s blocked: %d bytes dropped" % ("stderr" if stream is sys.stderr else "stdout",
                                                              self.dropped.pop(fd))
        self.syslog.send("warning: " + notice, Syslog.WARNING)
        stamp = "" if self.terminal(stream) else format_time(time.time()) + " "
        pending = self.deferred.setdefault(fd, bytearray())
        pending += ("%s%sisconf: warning: %s\n" % ("" if self.ends_line.get(fd, True) else "\n", stamp, notice)).encode()
        self.ends_line[fd] = True

    def _drain(self, fd, wait, seconds=None):
        """Write what is deferred for fd: what fits now, or (with wait) all of it; with seconds too,
        waiting at most that long in all.  Whether all was written."""
        pending, poller = self.deferred.get(fd), select.poll()
        poller.register(fd, select.POLLOUT)
        end = None if seconds is None else time.monotonic() + seconds
        while pending:
            if not wait and not poller.poll(0):
                return False
            if end is not None and not poller.poll(max(0, end - time.monotonic()) * 1000):
                return False
            del pending[:os.write(fd, pending[:select.PIPE_BUF])]
        return True

    def waiting(self):
        """Descriptors with output deferred, for a wait to wake when they take some (see pump)."""
        return [fd for fd, pending in self.deferred.items() if pending]

    def pump(self):
        """Write what the streams can take now of what was deferred."""
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None and self.deferred.get(stream.fileno()):
                    self._drain(stream.fileno(), False)
            except (OSError, ValueError):
                silence(stream)

    def _interrupt(self, stream, wait=True):
        """Before other output: end a transaction line begun on this stream, clear a progress line."""
        if self.progress_shown and sys.stderr is not None:
            self.progress_shown = False
            self.write("\r\x1b[K", sys.stderr, wait)
        if self.open_line is not None and self.open_line[0] is stream:
            self.open_line = None
            self.write("\n", stream, wait)

    def line(self, text, stream=None):
        """One line of a report: escaped, always shown."""
        self.write(printable(text) + "\n", stream)

    def _stamped(self, text, stream):
        stamp = "" if self.terminal(stream) else format_time(time.time()) + " "
        self.write(stamp + printable(text) + "\n", stream, wait=False)

    def say(self, message):
        """A message of the run ('isconf: ...'): dropped with -q."""
        self.syslog.send(message, Syslog.INFO)
        if not self.quiet:
            self._stamped("isconf: " + message, sys.stdout)

    def notice(self, message):
        """A message for a person watching ('isconf: ...'), on stderr when it is a terminal; nowhere
        else (a cron log, a journal, syslog) and not with -q."""
        if not self.quiet and self.terminal(sys.stderr):
            self._stamped("isconf: " + message, sys.stderr)

    def warn(self, message):
        """Something the admin should know ('isconf: warning: ...'); always shown, on stderr."""
        self.syslog.send("warning: " + message, Syslog.WARNING)
        self._stamped("isconf: warning: " + message, sys.stderr)

    def error(self, message, code=None, label="error"):
        """The one line of what went wrong ('isconf: error: ...', or another label: 'internal error',
        none for an interruption); syslog is told the exit code too."""
        text = "%s: %s" % (label, message) if label else message
        self.syslog.send(text if code is None else "%s (exit %d)" % (text, code), Syslog.ERR)
        if label is None and self.terminal(sys.stderr):
            self.write("\n", sys.stderr, wait=False)  # after the ^C the terminal echoed
        self._stamped("isconf: " + text, sys.stderr)

    def trace(self, text):
        """A traceback, whole, on stderr (--debug)."""
        self.write(text, sys.stderr, wait=False)

    def log(self, text):
        """One line of a server's log ('serve': its start and each request), on stderr, escaped."""
        self.write(printable(text) + "\n", sys.stderr, wait=False)

    def flush(self):
        """Before the process ends or execs another: what is buffered or deferred would be lost.  A
        stream gets OUTPUT_WAIT seconds to take it, no more (a logger that stopped reading must not
        keep the run from ending); what it missed is said on stderr and to syslog.  A stream
        that cannot be written (a closed pipe, a full cron log) is silenced, as every write does.
        OUTPUT_WAIT holds for both streams together (they are often one pipe); a stop signal during
        the wait ends it at once: the run is over, only output it could not take is lost."""
        end = time.monotonic() + OUTPUT_WAIT
        try:
            self._flush_streams(end)
        except KeyboardInterrupt:
            self.deferred.clear()

    def _flush_streams(self, end):
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is None:
                    continue
                stream.flush()
                fd = stream.fileno()
                if self.deferred.get(fd) and not self._drain(fd, True, max(0, end - time.monotonic())):
                    self.dropped[fd] = self.dropped.get(fd, 0) + len(self.deferred.pop(fd))
                if self.dropped.get(fd):
                    count = self.dropped[fd]
                    self._say_dropped(fd, stream)   # at its place, if the stream takes it
                    if not self._drain(fd, False):
                        self.deferred.pop(fd, None)
                        if stream is sys.stdout:   # then where it can be read
                            self._stamped("isconf: warning: output to stdout blocked: %d bytes dropped" % count,
                                          sys.stderr)
            except (OSError, ValueError):
                silence(stream)

    def closed_pipe(self):
        """stdout's reader went away ('isconf log | head'): what is left for it is dropped."""
        silence(sys.stdout)

    def output(self, data):
        """What a transaction's command wrote (it is in the log whatever this shows)."""
        if not self.quiet:
            self.write(data, sys.stdout, wait=False)

    def begin(self, position, summary):
        """A transaction starts: on a terminal its line starts now."""
        text = "%s %s ... " % (position, printable(summary))
        if self.quiet or not self.terminal(sys.stdout):
            return
        self.write(text, sys.stdout, wait=False)
        self.open_line = (sys.stdout, text)

    def end(self, position, summary, outcome, seconds):
        """A transaction ended: its one line, whole (or finished, if nothing came between)."""
        result = "%s (%.1f s)" % (outcome, seconds)
        self.syslog.send("%s %s ... %s" % (position, summary, result),
                         Syslog.INFO if outcome == "ok" else Syslog.ERR)
        if self.open_line is not None and self.open_line[0] is sys.stdout:
            self.open_line = None
            self.write(result + "\n", sys.stdout, wait=False)
        elif not self.quiet or outcome != "ok":
            self._stamped("%s %s ... %s" % (position, summary, result), sys.stdout)

    def progress(self, text):
        """A progress line, on a terminal only, rewritten in place."""
        if self.quiet or not self.terminal(sys.stderr) or self.open_line is not None:
            return
        self.write("\r" + printable(text)[:120] + "\x1b[K", sys.stderr, wait=False)
        self.progress_shown = True


REPORTER = Reporter()  # -q sets its verbosity; 'up --boot' and 'up --syslog' open its syslog


def emit(data):
    """A whole report as it is (JSON), on stdout."""
    REPORTER.write(data)


def show(text):
    """One line of a report on stdout, escaped."""
    REPORTER.line(text)


def say(message):
    REPORTER.say(message)


def warn(message):
    REPORTER.warn(message)


# ---------------------------------------------------------------------------
# Paths inside a root: resolve like a chroot would, never escaping it.
# ---------------------------------------------------------------------------


def utf8(text):
    """Whether text from the command line or the environment is UTF-8: bytes that are not arrive as lone
    surrogates, which no journal line, lock or record can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_path(path, what="path"):
    """A journaled path: absolute, normalised, no '..', no NUL (attack: traversal)."""
    if (not isinstance(path, str) or not path.startswith("/") or "\0" in path
            or posixpath.normpath(path) != path or path.startswith("//")
            or ".." in path.split("/")):
        raise Refused("%s %r is not an absolute, normalised path without '..'" % (what, path))
    if not utf8(path):
        raise Refused("%s %r is not valid UTF-8; the journal holds UTF-8 paths only" % (what, path))
    return path


def in_state(path):
    """Whether a journaled path names the agent's state directory or something in it: the journal never
    writes the agent's own state (its history, lock, logs, objects, last-run...)."""
    return path == STATE_PATH or path.startswith(STATE_PATH + "/")


def guards_trust(path):
    """Whether a journaled path is one the agent holds to root alone (check_private) when it runs: the
    config directory and what is in it, the agent file the units run, or a directory on the way to them
    or to the state.  A snap may write them, but only as root's alone: one that left them writable by
    others would lock the host out of every later run, this snap's repair included."""
    config = posixpath.dirname(CONFIG_PATH)
    if path == config or path.startswith(config + "/") or path == INSTALL_PATH:
        return True
    return any(path == "/" or target.startswith(path + "/") for target in (config, INSTALL_PATH, STATE_PATH))


class RootPath(object):
    """Resolve paths inside a root directory the way the kernel would after chroot.

    Symbolic links are followed, but absolute targets and '..' are taken relative to
    the root, so no link in the target tree, however hostile, leads out of it
    (attack: a symlink planted in the target tree).  Every step opens a directory
    with O_NOFOLLOW relative to the one before, so a link swapped in mid-walk makes
    the open fail rather than escape.
    """

    def __init__(self, root):
        self.root = os.path.abspath(root)

    @staticmethod
    def _identity(fd):
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    @staticmethod
    def _step(fd, name):
        """The directory name inside fd, opened without following a link; fd is closed once it is open
        (on failure fd stays open, for the caller to close)."""
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        os.close(fd)
        return child

    def _walk(self, path, create=False, private=False, way=None):
        """Walk path's components as directories inside the root.

        Returns (descriptor of the last directory reached, the real names leading to
        it from the root, the components left over where one does not exist).  With
        create, missing directories are made (and made durable) instead.  With private,
        the root and every directory opened on the way must pass check_private.

        Two descriptors at most are open, whatever the depth (a path 1,100 directories
        deep must not need 1,100 under a limit of 1,024): a parent is closed once its
        child is open.  '..' opens the parent again, and only if it is the very directory
        (device and inode) the walk came down through: one moved meanwhile is not followed.
        A list given as way is left holding the (device, inode) of each directory from the root
        down to the one returned.
        """
        fd, names = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), []
        way = [] if way is None else way
        way[:] = [self._identity(fd)]  # (device, inode) of each directory from the root down to fd
        todo = [p for p in path.split("/") if p]
        hops, made = 0, False
        try:
            if private:
                check_private(os.fstat(fd), self.root)
            while todo:
                name = todo.pop(0)
                if name == ".":
                    continue
                if name == "..":
                    if made:  # as the kernel: '..' below a directory that did not exist does not exist
                        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
                    if names:
                        fd = self._step(fd, "..")
                        if self._identity(fd) != way[-2]:
                            raise OSError(errno.ESTALE, "a directory on the way was moved while it was walked",
                                          path)
                        way.pop()
                        names.pop()
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        found, fd = fd, None
                        return found, names, [name] + todo
                    os.mkdir(name, 0o755, dir_fd=fd)
                    made = True
                    os.fsync(fd)  # a done transaction must not lose its directory to a power cut
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > SYMLINK_HOPS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    target = os.readlink(name, dir_fd=fd)
                    if target.startswith("/"):
                        top = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                        os.close(fd)
                        fd = top
                        if self._identity(fd) != way[0]:  # the root checked at the start, not another
                            raise OSError(errno.ESTALE, "the root was moved while a path was walked", path)
                        names = []
                        del way[1:]
                    todo = [p for p in target.split("/") if p] + todo
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                fd = self._step(fd, name)
                way.append(self._identity(fd))
                names.append(name)
                if private:
                    check_private(os.fstat(fd), os.path.join(self.root, *names))
            found, fd = fd, None
            return found, names, []
        finally:
            if fd is not None:
                os.close(fd)

    def open_dir(self, path, create=False, private=False):
        """An O_DIRECTORY descriptor for path inside the root (the caller closes it); with private,
        a CheckedDir, every directory on the way to it checked (see _walk)."""
        fd, _, missing = self._walk(path, create, private)
        if missing:
            os.close(fd)
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return CheckedDir(fd) if private else fd

    def way(self, path):
        """(device, inode) of each directory from the root down to the last of path that exists, as a
        walk reaches them: a bind mount is the very directory it mounts."""
        way = []
        os.close(self._walk(path, way=way)[0])
        return way

    def parent(self, path, create=False):
        """(directory fd, final name) for path; the final name itself is not followed."""
        head, name = posixpath.split(path)
        if not name:
            raise OSError(errno.EINVAL, "the root itself has no parent", path)
        return self.open_dir(head, create), name

    def resolve(self, path, hops=0):
        """Where path lives as seen from outside the root, every link followed inside it;
        parts that do not exist yet are kept as written.  For the host's own state and
        config, so that a target whose /var is a link keeps its state inside the target."""
        head, name = posixpath.split(path)
        if name in ("", ".", ".."):
            head, name = path, ""
        fd, names, missing = self._walk(head)
        if ".." in missing:  # as the kernel: '..' below a directory that does not exist does not exist
            os.close(fd)
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        try:
            if name and not missing:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if st is not None and stat.S_ISLNK(st.st_mode):
                    if hops >= SYMLINK_HOPS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    target = os.readlink(name, dir_fd=fd)
                    return self.resolve(posixpath.join("/" + "/".join(names), target), hops + 1)
        finally:
            os.close(fd)
        return os.path.join(self.root, *(names + missing + ([name] if name else [])))

    def read_file(self, path, limit):
        """The bytes of a small regular file inside the root: never a device, a FIFO or
        anything outside the root (attack: /etc/passwd linked to /dev/zero)."""
        inside = "/" + os.path.relpath(self.resolve(path), self.root)  # its links followed, inside the root
        with os.fdopen(self._open_regular(inside, path), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, "larger than %d bytes" % limit, path)
        return data

    def open_file(self, path):
        """A file object for reading a regular file inside the root; the final name is not followed."""
        return os.fdopen(self._open_regular(path, path), "rb")

    def _open_regular(self, path, shown):
        """A descriptor of the regular file at path, opened only after an lstat shows it is one:
        opening a FIFO wakes a writer blocked on it, and a device may act on being opened."""
        dfd, name = self.parent(path)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "a %s, not a regular file" % file_kind(st.st_mode), shown)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped in since the lstat
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", shown)
        return fd

    def lstat(self, path):
        if path == "/":
            return os.lstat(self.root)
        dfd, name = self.parent(path)
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)

    def readlink(self, path):
        dfd, name = self.parent(path)
        try:
            return os.readlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)


class Owners(object):
    """User and group names and ids, from a root's own /etc/passwd and /etc/group (never
    the running system's: the target disk may know other users)."""

    def __init__(self, rootpath):
        self.users = self._table(rootpath, "/etc/passwd")
        self.groups = self._table(rootpath, "/etc/group")
        self.user_names, self.group_names = {}, {}
        for names, table in ((self.user_names, self.users), (self.group_names, self.groups)):
            for name, number in table.items():
                names.setdefault(number, name)  # the first line wins, as with getpwuid

    @staticmethod
    def _table(rootpath, path):
        try:
            lines = rootpath.read_file(path, OWNERS_MAX).decode("utf-8", "replace").splitlines()
        except OSError:
            return {}
        table = {}
        for number, line in enumerate(lines, 1):
            fields = line.split(":")
            if not line.strip() or line[:1] in "+-#":
                continue  # blank, a comment, or an NIS include: no entry here
            # ASCII digits only: str.isdigit() takes a superscript two (U+00B2), which int() then refuses.
            if len(fields) < 3 or not ID_RE.match(fields[2]) or int(fields[2]) > ID_MAX:
                warn("%s%s line %d is not NAME:PASSWORD:NUMBER:...; skipped"
                     % (rootpath.root.rstrip("/"), path, number))
                continue
            table.setdefault(fields[0], int(fields[2]))
        return table

    def ids(self, record):
        """Names win where the target knows them; otherwise the recorded numbers."""
        return self.users.get(record["user"], record["uid"]), self.groups.get(record["group"], record["gid"])

    def record(self, st):
        """The owner fields of a snap record for a stat result."""
        return {"uid": st.st_uid, "gid": st.st_gid, "user": self.user_names.get(st.st_uid, str(st.st_uid)),
                "group": self.group_names.get(st.st_gid, str(st.st_gid))}


# ---------------------------------------------------------------------------
# Fetching: one HTTP client with limits, redirects, timeouts and a deadline.
# ---------------------------------------------------------------------------


class Response(object):
    """A fetch's answer: its body (None when it streamed into a sink), and whether it is the range asked for."""

    def __init__(self, body=b"", partial=False):
        self.body, self.partial = body, partial


class Deadline(object):
    """Bound a whole fetch in time, headers included (attack: a server that trickles a
    byte at a time, each within the socket timeout, for ever).  A monotonic clock checked
    before every read and write, and no wait longer than the time left: it holds in any
    thread, where SIGALRM would hold only in the main one."""

    def __init__(self, seconds, what):
        self.seconds, self.what = min(seconds, MAX_DEADLINE), what
        self.end = time.monotonic() + self.seconds

    def check(self):
        if time.monotonic() >= self.end:
            raise Unreachable("%s: too slow, gave up after %d seconds; try another mirror or raise deadline"
                              % (self.what, self.seconds))

    def wait(self, timeout):
        """How long the next blocking call may wait: the silence timeout, cut at the deadline."""
        self.check()
        return max(0.001, min(timeout, self.end - time.monotonic()))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock):
        self._sock = sock

    def readable(self):
        return True

    def readinto(self, buffer):
        return self._sock.recv_into(buffer)

    def close(self):
        if not self.closed:
            self._sock._reader_closed()
        super(_DeadlineReader, self).close()


class _DeadlineSocket(object):
    """A connected socket (plain or TLS) whose every read and write waits at most the
    silence timeout, and never past the deadline of the fetch its connection is doing."""

    def __init__(self, sock, conn):
        self._sock, self._conn = sock, conn
        self._readers, self._closed = 0, False

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def close(self):
        # As socket.socket does for its makefile(): http.client closes the connection
        # before the body of a "Connection: close" answer is read through the file.
        self._closed = True
        if not self._readers:
            self._sock.close()

    def _reader_closed(self):
        self._readers -= 1
        if self._closed:
            self.close()

    def _arm(self):
        self._sock.settimeout(self._conn.deadline.wait(self._conn.silence))

    def sendall(self, data):
        self._arm()
        return self._sock.sendall(data)

    def recv_into(self, buffer, nbytes=0):
        self._arm()
        try:
            return self._sock.recv_into(buffer, nbytes)
        except socket.timeout:
            self._conn.deadline.check()   # say "too slow" when it was the deadline that ran out
            raise

    def makefile(self, mode="rb", *args, **kw):
        # http.client reads status line, headers and body through this file only.
        self._readers += 1
        return io.BufferedReader(_DeadlineReader(self))


# The user:password@ of a URL, wherever it sits (attack: a password in a mirror URL copied into every error
# line, the last-run record and status).
USERINFO_RE = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?(?://)?)[^/]*@")  # "#" and "?" too: "u:p#ss@h"


def redact_url(url):
    """A URL as messages show it: any user name or password replaced by '***' (the one place that does it)."""
    return USERINFO_RE.sub(r"\1***@", url)


def check_no_credentials(url):
    """A mirror URL holds no user:password: isconf sends none, and the secret would be in the config,
    the logs and every error line.  UsageError, naming the URL without its secret."""
    if USERINFO_RE.match(url):
        raise UsageError("mirror %s holds a user name or password, which isconf never sends and would print: "
                         "remove it (what a mirror serves is signed; restrict who reaches it by the network)"
                         % redact_url(url))


ASCII_NUMBER_RE = re.compile(r"^[0-9]{1,18}\Z")
STATUS_LINE_RE = re.compile(r"^(HTTP/1\.[01]) ([0-9]{3})(?: ([^\r\n]*))?\r?\n\Z")
CHUNK_SIZE_RE = re.compile(br"^([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n\Z")
INTERIM_MAX = 10                # 1xx answers skipped before the real one, at most
INTERIM_LINES = 100             # header lines of all of them, at most (http.client's own limit per answer)


def ascii_number(text):
    """A whole number written in ASCII digits only, or None: int() also takes other scripts' digits
    (Arabic-Indic or fullwidth ones), '_', a sign and white space, so one number could have many spellings."""
    return int(text) if isinstance(text, str) and ASCII_NUMBER_RE.match(text) else None


class _Response(http.client.HTTPResponse):
    """http.client's answer, read stricter: the status code in three ASCII digits; every interim 1xx
    answer skipped with its headers (http.client skips only 100 Continue: a '103 Early Hints' before
    the 200 was taken for the answer, and the mirror was unusable), a bounded number of them;
    101 Switching Protocols is no interim answer, and fails the fetch; a chunk size in hex digits
    only (int() takes '1_a', a sign and white space)."""

    def _read_status(self):
        lines = 0
        for _ in range(INTERIM_MAX + 1):
            raw = self.fp.readline(65537)
            if not raw:
                raise http.client.RemoteDisconnected("the server closed the connection without an answer")
            m = STATUS_LINE_RE.match(raw.decode("iso-8859-1"))
            if len(raw) > 65536 or not m:
                raise http.client.BadStatusLine(repr(raw[:80]))
            status = int(m.group(2))
            if not 100 <= status < 200 or status == 101:
                return m.group(1), status, m.group(3) or ""
            while True:   # the interim answer's headers, never kept
                line = self.fp.readline(65537)
                lines += 1
                if len(line) > 65536 or lines > INTERIM_LINES:
                    raise http.client.HTTPException("interim (1xx) answers with too many or too long headers")
                if line in (b"\r\n", b"\n", b""):
                    break
        raise http.client.HTTPException("more than %d interim (1xx) answers" % INTERIM_MAX)

    def _read_next_chunk_size(self):
        line = self.fp.readline(65537)
        m = CHUNK_SIZE_RE.match(line)
        if not m:
            raise ValueError("chunk size %r" % line[:20])   # http.client's callers make it IncompleteRead
        return int(m.group(1), 16)


class _BoundedConnection(object):
    """Mixed into http.client's connections: connect within the time left, then read and
    write through a _DeadlineSocket.  Mirror._request sets deadline and silence per fetch."""
    deadline, silence, mirror = None, DEFAULT_TIMEOUT, None
    response_class = _Response

    def connect(self):
        self.timeout = self.deadline.wait(self.silence)
        super(_BoundedConnection, self).connect()
        self.sock = _DeadlineSocket(self.sock, self)
        if self.mirror is not None:
            self.mirror.connected(self)


class _HTTPConnection(_BoundedConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_BoundedConnection, http.client.HTTPSConnection):
    pass


CONTENT_RANGE_RE = re.compile(r"^bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)\Z")


def parse_content_range(header, start, what):
    """The first byte of a 206 answer, which must be the one asked for.  ASCII digits
    only (str.isdigit and re's \\d take superscripts and other scripts' digits), and a
    range that is one: first <= last < total."""
    m = CONTENT_RANGE_RE.match(header or "")
    if (not m or int(m.group(1)) != start or int(m.group(2)) < start
            or (m.group(3) != "*" and int(m.group(2)) >= int(m.group(3)))):
        raise Refused("%s: the server answered a range request with the wrong range %s"
                      % (what, repr(header)[:80]))
    return start


def parse_content_length(header):
    """Content-Length as a number, or None when absent or not a plain ASCII number
    (http.client then reads to the close, and our own limit still holds)."""
    return ascii_number(header)


class _ShareRead(object):
    """One file of a file-share mirror, opened and read by a daemon thread of its own while the
    fetch waits for each chunk no longer than the silence timeout and the deadline.

    A read(2) or open(2) on a hung network file system blocks in the kernel, where no clock is
    looked at: the fetch gives up at its deadline all the same and leaves the thread behind,
    blocked and holding only its descriptor; it ends when the kernel lets it go, and until then
    the share is not read again in this run (stuck, below).  The open never waits on a FIFO
    (O_NONBLOCK) and only a regular file is read: a FIFO, a device or a socket planted in the
    share is refused before it is opened, or at once after (attack: a FIFO no one writes hung
    'up' for good, holding the host lock)."""

    AHEAD = 4                  # chunks the thread reads ahead of the fetch, at most
    lock = threading.Lock()    # guards stuck: the shares with a read that has not come back
    stuck = {}

    def __init__(self, directory, path, start, what):
        self.directory, self.path, self.start, self.what = directory, path, start, what
        self.ready = threading.Condition()
        self.chunks, self.error, self.abandoned, self.ended = collections.deque(), None, False, False
        self.gave_up = False   # the fetch stopped waiting for it
        thread = threading.Thread(target=self._run, name="isconf-share")
        thread.daemon = True   # blocked in the kernel, it must not keep the agent from exiting
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # Ctrl-C is for the waiting thread
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _refuse(self, mode):
        return Refused("%s is a %s, not a regular file; the share is broken or hostile"
                       % (self.what, file_kind(mode)))

    def _run(self):
        fd = None
        try:
            st = os.stat(self.path)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse(st.st_mode)   # a device is never opened, even for a moment
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):    # swapped in since the stat
                raise self._refuse(st.st_mode)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            offset = self.start
            while True:
                with self.ready:
                    while len(self.chunks) >= self.AHEAD and not self.abandoned:
                        self.ready.wait()
                    if self.abandoned:
                        return
                chunk = os.pread(fd, CHUNK, offset)
                offset += len(chunk)
                with self.ready:
                    self.chunks.append(chunk)
                    self.ready.notify_all()
                if not chunk:
                    return
        except Exception as e:   # handed to the fetch, raised there
            with self.ready:
                self.error = e
                self.ready.notify_all()
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):   # a share gone away fails the close too (ENOTCONN)
                    os.close(fd)
            with self.lock:
                self.ended = True
                self.stuck.get(self.directory, set()).discard(self)

    def read(self, n, deadline, silence):
        """At most n bytes, b"" at the end; Unreachable once silent for silence seconds or at the deadline."""
        with self.ready:
            until = time.monotonic() + silence
            while not self.chunks and self.error is None:
                if self.abandoned:
                    raise Unreachable("%s: stopped" % self.what)
                if time.monotonic() >= deadline.end:
                    self.gave_up = True
                    deadline.check()
                left = min(until, deadline.end) - time.monotonic()
                if left <= 0:
                    self.gave_up = True
                    raise Unreachable("%s: nothing read for %d seconds (a hung network file system?); try another "
                                      "mirror or raise timeout" % (self.what, silence))
                self.ready.wait(left)
            if not self.chunks:
                raise self.error
            chunk = self.chunks.popleft()
            if len(chunk) > n:
                self.chunks.appendleft(chunk[n:])
                chunk = chunk[:n]
            self.ready.notify_all()
            return chunk

    def abandon(self):
        """The fetch is over (or given up): the thread stops at its next chunk; one still blocked
        in the kernel marks the share stuck until it comes back."""
        with self.ready:
            self.abandoned = True
            self.ready.notify_all()
        with self.lock:
            if self.gave_up and not self.ended:
                self.stuck.setdefault(self.directory, set()).add(self)

    @classmethod
    def is_stuck(cls, directory):
        with cls.lock:
            return bool(cls.stuck.get(directory))


class Mirror(object):
    """One place a repository is published: http(s)://, file:// or a plain directory."""

    def __init__(self, url, timeout=DEFAULT_TIMEOUT, deadline=DEFAULT_DEADLINE):
        self.url = url
        self.timeout, self.deadline = timeout, deadline
        check_no_credentials(url)
        try:
            parsed = urllib.parse.urlsplit(url)
            parsed.port  # a malformed port is an error here, not at the first fetch
        except ValueError as e:
            raise UsageError("mirror %r is not a valid URL: %s" % (redact_url(url), e))
        if parsed.scheme in ("http", "https") and parsed.hostname:
            self.directory = None
            self.base = url if url.endswith("/") else url + "/"
        elif parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            # file://srv/isconf names host 'srv' and the directory /isconf: never read as either
            raise UsageError("mirror %r names a host (%s): a file:// URL is a local directory, three slashes "
                             "before its path (file:///srv/isconf)" % (redact_url(url), parsed.netloc))
        elif parsed.scheme == "file" and parsed.path.startswith("/"):
            self.directory = urllib.parse.unquote(parsed.path)
        elif parsed.scheme == "" and url.startswith("/"):
            self.directory = url
        else:
            raise UsageError("mirror %r is not an http://, https:// or file:// URL or an absolute directory"
                             % redact_url(url))
        self._connections = {}
        self._aborting, self.aborted = threading.Lock(), False
        self._share = None   # the _ShareRead of the fetch going on, for abort()

    def __str__(self):
        return self.url

    def close(self):
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def abort(self):
        """From another thread: end the fetch this mirror is doing now, and any it would start.
        Shutting its sockets down wakes a read waiting on them (it sees the end of the stream,
        so the fetch fails); close() from another thread would leave that read waiting out its
        timeout.  A connection made after this is shut down as it is made (see connected)."""
        with self._aborting:
            self.aborted = True
            for conn in list(self._connections.values()):
                self._shut(conn)
            share = self._share
        if share is not None:
            share.abandon()

    def connected(self, conn):
        with self._aborting:
            if self.aborted:
                self._shut(conn)

    @staticmethod
    def _shut(conn):
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass   # closed already: nothing waits on it

    def branches(self):
        """The branches a directory mirror holds (those with a head), sorted; None where the mirror cannot
        say: an HTTP one (the format has no listing), or a share that is no repository, or does not
        answer within the timeout (a hung share: the thread is left behind, blocked, as _ShareRead's)."""
        if self.directory is None or _ShareRead.is_stuck(self.directory):
            return None
        found = []

        def listing():   # branch names only, and a few: a hostile share must not make the error line a book
            top, names = os.path.join(self.directory, "branches"), []
            try:
                for name in sorted(name for name in os.listdir(top) if BRANCH_RE.match(name)):
                    if os.path.isfile(os.path.join(top, name, "head")):
                        names.append(name)
                        if len(names) > BRANCHES_SHOWN:
                            names[BRANCHES_SHOWN:] = ["..."]
                            break
                found.append(names)
            except OSError:  # no branches there: no repository, or not one this host may read
                pass
        thread = threading.Thread(target=listing, name="isconf-share")
        thread.daemon = True
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # Ctrl-C is for the waiting thread
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        thread.join(self.timeout)
        return found[0] if found else None

    def fetch(self, relpath, limit, start=0, stop=None, sink=None):
        """GET relpath, a file of at most `limit` bytes, or its bytes [start, stop).

        Returns a Response whose .partial says whether the range was honoured; if it was
        not, the body is the file from its start, cut at `stop`.  With a sink, the body is
        streamed into it instead of being kept in memory; with a start too, the sink has a
        restart() that is called when the server ignores the range and sends the file from its
        first byte.  Requests are never conditional: a validator (ETag, Last-Modified) can
        collide, so a 304 is never an answer.  A Mirror is for one thread at a time.
        """
        what = "%s from %s" % (relpath, self.url)
        deadline = Deadline(self.deadline + limit / float(MIN_RATE), what)
        if self.directory is not None:
            return self._read_local(relpath, limit, start, stop, what, sink, deadline)
        try:
            return self._fetch_http(relpath, limit, start, stop, sink, what, deadline)
        except Unreachable:
            self.close()   # the deadline ran out mid-answer: the connection is unusable
            raise
        except NETWORK_ERRORS as e:
            self.close()
            raise Unreachable("%s: %s; try again later" % (what, e or type(e).__name__))

    def _fetch_http(self, relpath, limit, start, stop, sink, what, deadline):
        url = urllib.parse.urljoin(self.base, relpath)
        headers = {"User-Agent": "isconf/" + __version__, "Accept-Encoding": "identity"}
        if start or stop is not None:
            headers["Range"] = "bytes=%d-%s" % (start, "" if stop is None else stop - 1)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request(url, headers, deadline)
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise Unreachable("%s: redirect without a Location" % what)
                response.read(HEAD_MAX)  # drain so the connection can be reused
                url = urllib.parse.urljoin(url, location)
                continue
            return self._response(response, limit, start, stop, what, sink)
        raise Unreachable("%s: more than %d redirects (a redirect loop?); fix the mirror URL"
                          % (what, MAX_REDIRECTS))

    def _request(self, url, headers, deadline):
        """Send a GET on a kept-alive connection to the URL's server, or a new one."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise Unreachable("redirect to %r: only http and https URLs without a user or password are followed"
                              % redact_url(url))
        key = (parts.scheme, parts.netloc)
        target = parts.path + ("?" + parts.query if parts.query else "")
        # A kept-alive connection may have been closed by the server: retry once, fresh.
        for attempt in (0, 1):
            conn = self._connections.get(key)
            reused = conn is not None
            if conn is None:
                if parts.scheme == "https":
                    conn = _HTTPSConnection(parts.netloc, timeout=self.timeout,
                                            context=ssl.create_default_context())
                else:
                    conn = _HTTPConnection(parts.netloc, timeout=self.timeout)
                self._connections[key] = conn
            conn.deadline, conn.silence, conn.mirror = deadline, self.timeout, self
            try:
                conn.request("GET", target, headers=headers)
                return conn.getresponse()
            except NETWORK_ERRORS:
                conn.close()
                del self._connections[key]
                if not reused or attempt:
                    raise
        raise AssertionError("not reached")

    def _response(self, response, limit, start, stop, what, sink):
        status = response.status
        if status not in (200, 206):
            response.read(HEAD_MAX)
        if status == 304:
            raise Refused("%s: the server answered 304 Not Modified to a request that was not "
                          "conditional; the mirror is broken" % what)
        if status == 404:
            raise NotFound("%s: not found (404); check the URL and the branch name" % what)
        if status == 416:
            raise ShortFile("%s: the server has no byte %d (416): its copy is shorter; try again later"
                            % (what, start))
        if status not in (200, 206):
            raise Unreachable("%s: server answered %d %r" % (what, status, response.reason[:80]))
        partial = status == 206
        if partial:
            parse_content_range(response.getheader("Content-Range"), start, what)
            limit = limit - start if stop is None else stop - start
        elif stop is not None:
            limit = stop  # the server ignored Range: read the file up to stop, no further
        if start and not partial and sink is not None:
            sink.restart()  # the server ignored Range: its body, and so the sink, start at byte 0
        length = parse_content_length(response.getheader("Content-Length"))
        if length is not None and length > limit and (partial or stop is None):
            raise Refused("%s is %d bytes, more than the %d expected; the mirror is broken or hostile"
                          % (what, length, limit))
        body = io.BytesIO() if sink is None else sink
        # read1 returns what has arrived; read(n) would wait for all n bytes.
        cut = not partial and stop is not None
        got = self._stream(response.read1, limit, what, body, cut)
        more = cut and got == limit  # a whole file cut at the signed length: the rest is not read
        if length is not None and got < length and not more:
            # http.client returns a short body quietly when the connection closes early.
            raise Unreachable("%s: the connection closed after %d of %d bytes; try again later"
                              % (what, got, length))
        if more and length != got:
            self.close()  # never read what was not asked for: the connection cannot be reused
        else:
            response.read()  # the body is over: this returns nothing and frees the connection
        return Response(body.getvalue() if sink is None else None, partial)

    @staticmethod
    def _stream(read, limit, what, sink, cut=False):
        """Copy a body into sink: never more than limit bytes (attack: endless data).
        With cut, stop quietly at limit instead of refusing what lies beyond."""
        total = 0
        while True:
            chunk = read(min(CHUNK, limit + 1 - total) if not cut else min(CHUNK, limit - total))
            if not chunk:
                return total
            total += len(chunk)
            if total > limit:
                raise Refused("%s is longer than the %d bytes expected; the mirror is broken or hostile"
                              % (what, limit))
            try:
                sink.write(chunk)
            except OSError as e:  # a full or failing local disk is not the mirror's fault
                raise StateError("cannot store %s: %s; free some space and run again" % (what, e.strerror))
            if cut and total == limit:
                return total

    def _read_local(self, relpath, limit, start, stop, what, sink, deadline):
        if _ShareRead.is_stuck(self.directory):
            raise Unreachable("%s: an earlier read from this share has not come back (a hung network file "
                              "system?); try another mirror or try again later" % what)
        body = io.BytesIO() if sink is None else sink
        share = _ShareRead(self.directory, os.path.join(self.directory, *relpath.split("/")), start, what)
        with self._aborting:
            self._share = share
            if self.aborted:   # abort() came first: this fetch ends at once too
                share.abandon()
        try:
            def read(n):
                return share.read(n, deadline, self.timeout)
            if stop is None:
                self._stream(read, limit - start, what, body)
            else:
                self._stream(read, stop - start, what, body, cut=True)
        except FileNotFoundError:
            raise NotFound("%s: not found; check the path and the branch name" % what)
        except OSError as e:
            raise Unreachable("%s: %s" % (what, e.strerror or e))
        finally:
            self._share = None
            share.abandon()
        return Response(body.getvalue() if sink is None else None, partial=bool(start or stop is not None))


# ---------------------------------------------------------------------------
# Signatures: OpenSSH SSHSIG over the head, Ed25519 and RSA, allowed_signers.
# ---------------------------------------------------------------------------


AllowedSigner = collections.namedtuple("AllowedSigner", [
    "principals", "key_type", "key_blob", "namespaces",
    "valid_after", "valid_before", "source"])
SUPPORTED_KEY_TYPES = ("ssh-ed25519", "ssh-rsa")
_KEY_LABELS = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA"}
_HASHES = ("sha256", "sha512")
_RSA_DIGEST_INFO = {   # DER prefixes of DigestInfo, RFC 8017 section 9.2 note 1
    "rsa-sha2-256": ("sha256", bytes.fromhex("3031300d060960864801650304020105000420")),
    "rsa-sha2-512": ("sha512", bytes.fromhex("3051300d060960864801650304020305000440")),
}
_RSA_MIN_BITS, _RSA_MAX_BITS = 2048, 16384   # OpenSSH itself refuses over 16384
_SSHSIG_MAGIC = b"SSHSIG"


def key_fingerprint(key_blob):
    """The SHA256:... form that `ssh-keygen -l` prints, so users can grep for it."""
    digest = base64.b64encode(hashlib.sha256(key_blob).digest()).decode()
    return "SHA256:" + digest.rstrip("=")


class _Wire:
    """Reader for the SSH wire encoding (RFC 4251 section 5)."""

    def __init__(self, data, what, advice="fetch it again"):
        self.data, self.pos, self.what, self.advice = data, 0, what, advice

    def _take(self, n):
        if self.pos + n > len(self.data):
            raise Refused("%s is malformed (a field runs past its end): it was "
                          "truncated or altered; %s" % (self.what, self.advice))
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint32(self):
        return struct.unpack(">I", self._take(4))[0]

    def string(self):
        return self._take(self.uint32())

    def text(self):
        return self.string().decode("ascii", "replace")

    def mpint(self):
        raw = self.string()
        # Negative or padded encodings would let one key have several blobs,
        # and trust decisions compare blobs byte for byte.
        if raw and (raw[0] & 0x80 or (raw[0] == 0 and (len(raw) == 1 or not raw[1] & 0x80))):
            raise Refused("%s has a badly encoded number: it was altered; %s"
                          % (self.what, self.advice))
        return int.from_bytes(raw, "big")

    def end(self):
        if self.pos != len(self.data):
            raise Refused("%s has %d unexpected trailing bytes: it was altered; %s"
                          % (self.what, len(self.data) - self.pos, self.advice))


def _key_name(key_blob):
    try:
        key_type = _Wire(key_blob, "key").text()
    except Refused:   # only naming the key here; the caller is already refusing
        key_type = "unreadable key"
    return "%s (%s)" % (key_fingerprint(key_blob), _KEY_LABELS.get(key_type, key_type))


def _ssh_string(data):
    return struct.pack(">I", len(data)) + data


# --- Ed25519 (RFC 8032 section 5.1) ------------------------------------------
#
# Points are extended twisted Edwards coordinates (X, Y, Z, T) with x = X/Z,
# y = Y/Z, x*y = T/Z, so additions need no inversion; the one inversion comes
# when the result is encoded.

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_D2 = 2 * _D % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1, 1, 0)


def _add(p, q):   # add-2008-hwcd-3, complete for a = -1
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = t1 * _D2 * t2 % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _double(p):   # dbl-2008-hwcd with a = -1
    x1, y1, z1, _ = p
    a, b = x1 * x1 % _P, y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    e = ((x1 + y1) * (x1 + y1) - a - b) % _P
    g = b - a
    f, h = g - c, -a - b
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _decode_point(s):
    """RFC 8032 section 5.1.3, refusing non-canonical y and x = 0 with sign 1."""
    y = int.from_bytes(s, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P == (-u) % _P:
        x = x * _SQRT_M1 % _P
    if v * x * x % _P != u or (x == 0 and sign):
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y, 1, x * y % _P


def _small_order(p):
    """Whether [8]p is the identity: the eight points any signature can be forged for."""
    x, y, z, _ = _double(_double(_double(p)))
    return x % _P == 0 and (y - z) % _P == 0


def _encode_point(p):
    x, y, z, _ = p
    zi = pow(z, _P - 2, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _window_table(p):
    """0P .. 15P, for 4-bit fixed-window scalar multiplication."""
    table = [_IDENTITY, p]
    for _ in range(14):
        table.append(_add(table[-1], p))
    return table


_BASE = _decode_point(bytes.fromhex(
    "5866666666666666666666666666666666666666666666666666666666666666"))
_BASE_TABLE = _window_table(_BASE)   # built once: B never changes


def _ed25519_verify(public, message, signature):
    """RFC 8032 section 5.1.7 with the cofactorless equation [S]B = R + [k]A.

    OpenSSH (SUPERCOP ref code) checks exactly that: it computes
    [S]B - [k]A and compares its encoding with R byte for byte, so we do the
    same, which also refuses non-canonical encodings of R.  Unlike OpenSSH we
    refuse S >= L (RFC 8032), which only a forger of a malleated copy produces.
    """
    if len(signature) != 64:
        return False
    a = _decode_point(public)
    s = int.from_bytes(signature[32:], "little")
    if a is None or s >= _L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    minus_a = (_P - a[0], a[1], 1, _P - a[3])
    a_table = _window_table(minus_a)
    acc = _IDENTITY
    # Straus: one shared chain of doublings for both scalars, 4 bits at a time.
    for shift in range(252, -1, -4):
        acc = _double(_double(_double(_double(acc))))
        ks, ss = (k >> shift) & 15, (s >> shift) & 15
        if ks:
            acc = _add(acc, a_table[ks])
        if ss:
            acc = _add(acc, _BASE_TABLE[ss])
    return _encode_point(acc) == signature[:32]


# --- RSA (RFC 8017 RSASSA-PKCS1-v1_5) ----------------------------------------

def _rsa_verify(e, n, algorithm, message, signature):
    hash_name, digest_info = _RSA_DIGEST_INFO[algorithm]
    size = (n.bit_length() + 7) // 8
    s = int.from_bytes(signature, "big")
    if len(signature) != size or s >= n:
        return False
    digest = digest_info + hashlib.new(hash_name, message).digest()
    expected = b"\x00\x01" + b"\xff" * (size - 3 - len(digest)) + b"\x00" + digest
    return pow(s, e, n).to_bytes(size, "big") == expected


# --- public keys ---------------------------------------------------------------

def _read_public_key(key_blob, where):
    """(key type, parameters), refusing key types and sizes we will not verify."""
    wire = _Wire(key_blob, "%s: the key" % where, "copy it again from the .pub file")
    key_type = wire.text()
    if key_type not in SUPPORTED_KEY_TYPES:
        raise Refused("%s: key type %s is not supported (only %s); list an Ed25519 "
                      "or RSA key" % (where, key_type, " and ".join(SUPPORTED_KEY_TYPES)))
    if key_type == "ssh-ed25519":
        params = (wire.string(),)
        if len(params[0]) != 32:
            raise Refused("%s: Ed25519 key is not 32 bytes: copy it again from the "
                          ".pub file" % where)
        point = _decode_point(params[0])
        if point is None:
            raise Refused("%s: Ed25519 key is not a point on the curve: copy it again from the "
                          ".pub file" % where)
        if _small_order(point):
            # Stricter than ssh-keygen: such a key "verifies" signatures anyone can make.
            raise Refused("%s: Ed25519 key is a point of small order, which anyone can sign for; "
                          "it is not a real key: remove it" % where)
    else:
        e = wire.mpint()
        n = wire.mpint()
        if not _RSA_MIN_BITS <= n.bit_length() <= _RSA_MAX_BITS:
            raise Refused("%s: RSA key has %d bits, outside %d..%d; use an Ed25519 "
                          "or a larger RSA key" % (where, n.bit_length(), _RSA_MIN_BITS, _RSA_MAX_BITS))
        if e < 3 or e % 2 == 0:
            raise Refused("%s: RSA key has an invalid public exponent: copy it again "
                          "from the .pub file" % where)
        params = (e, n)
    wire.end()
    return key_type, params


# --- allowed_signers -----------------------------------------------------------

_COMMENT_OR_BLANK = re.compile(r"[ \t]*(#|$)")
_PRINCIPALS = re.compile(r'[ \t]*(?:"([^"]*)"|([^\s"]+))[ \t]+')


# Any OpenSSH key type name; anything else in that position is an option list.
_KEY_TYPE_NAME = re.compile(r"(?:ssh|ecdsa|sk)-[\w@.-]+(?:[ \t]|$)")
_OPTION = re.compile(r'(cert-authority)|(namespaces|valid-after|valid-before)="((?:\\"|[^"])*)"', re.I)
# ASCII digits only, as ssh-keygen reads them (re's \\d takes other scripts' digits too).
_TIMESTAMP = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})(?:([0-9]{2})([0-9]{2})([0-9]{2})?)?(z|utc)?\Z", re.I)


def _parse_timestamp(value, where):
    """YYYYMMDD[HHMM[SS]][Z], read as ssh-keygen's parse_absolute_time does.

    Without Z (or UTC) the time is local and fed to mktime() with tm_isdst = 0,
    exactly like OpenSSH, so both tools agree to the second even across DST.
    """
    m = _TIMESTAMP.match(value)
    bad = Refused("%s: timestamp %r is not a YYYYMMDD[HHMM[SS]][Z] time after 1970; "
                  "fix the allowed_signers line" % (where, value))
    if not m:
        raise bad
    year, month, day, hour, minute, second = (int(g or 0) for g in m.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour < 24 and minute < 60 and second < 60):
        raise bad
    fields = (year, month, day, hour, minute, second, 0, 0, 0)
    try:
        epoch = calendar.timegm(fields) if m.group(7) else int(time.mktime(fields))
    except (OverflowError, ValueError):
        raise bad
    if epoch <= 0:   # OpenSSH treats 0 as "unset" and refuses earlier times
        raise bad
    return epoch


def _parse_options(text, where):
    """The option list, following OpenSSH's sshsigopt_parse(); returns the rest."""
    options, pos = {}, 0
    while True:
        m = _OPTION.match(text, pos)
        if not m:
            raise Refused("%s: unknown or malformed option at %r; allowed are "
                          "cert-authority, namespaces=\"...\", valid-after=\"...\", "
                          "valid-before=\"...\"" % (where, text[pos:pos + 30]))
        name = (m.group(1) or m.group(2)).lower()
        if name in options:
            raise Refused("%s: option %s is given twice; keep one" % (where, name))
        options[name] = m.group(3).replace('\\"', '"') if m.group(2) else True
        pos = m.end()
        if text[pos:pos + 1] in ("", " ", "\t"):
            return options, text[pos:]
        if text[pos] != "," or text[pos + 1:pos + 2] in ("", " ", "\t"):
            raise Refused("%s: options must be separated by single commas with no "
                          "spaces; fix the allowed_signers line" % where)
        pos += 1


def _parse_line(line, where):
    if _KEY_TYPE_NAME.match(line.lstrip()):
        # The commonest slip: the signer's .pub file given as allowed_signers.
        fields = line.split()
        principal = fields[2] if len(fields) > 2 and "@" in fields[2] else "admin@example"
        raise Refused("%s: this is a public key (.pub) line, not an allowed_signers line; put the signer's "
                      "principal first: '%s %s'" % (where, principal, " ".join(fields[:2])[:120]))
    m = _PRINCIPALS.match(line)
    if not m or m.group(1) == "":
        raise Refused("%s: expected principals, then optional options, then a key; "
                      "fix the allowed_signers line" % where)
    principals, rest = (m.group(1) or m.group(2)).split(","), line[m.end():]
    options = {}
    if not _KEY_TYPE_NAME.match(rest):
        options, rest = _parse_options(rest, where)
    # cert-authority is refused while parsing: SSHSIG signatures made with a
    # certificate are not supported, so such a line could never vouch for
    # anything and would only hide a misconfiguration until a signature fails.
    if "cert-authority" in options:
        raise Refused("%s: certificate authorities (cert-authority) are not supported; "
                      "list the signing key itself" % where)
    fields = rest.split(None, 2)
    if len(fields) < 2:
        raise Refused("%s: missing key type or base64 key; paste the whole line of "
                      "the signer's .pub file" % where)
    key_type, key_text = fields[0], fields[1]
    if key_type not in SUPPORTED_KEY_TYPES:
        raise Refused("%s: key type %s is not supported (only %s); list an Ed25519 "
                      "or RSA key" % (where, key_type, " and ".join(SUPPORTED_KEY_TYPES)))
    try:
        key_blob = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("%s: the key is not valid base64; copy it again from the .pub "
                      "file" % where)
    inner_type = _read_public_key(key_blob, where)[0]
    if inner_type != key_type:
        raise Refused("%s: line says %s but the key is %s; copy the line again from "
                      "the .pub file" % (where, key_type, inner_type))
    valid_after = valid_before = None
    if "valid-after" in options:
        valid_after = _parse_timestamp(options["valid-after"], where)
    if "valid-before" in options:
        valid_before = _parse_timestamp(options["valid-before"], where)
    if valid_after and valid_before and valid_before <= valid_after:
        raise Refused("%s: valid-before is not after valid-after; fix the dates" % where)
    namespaces = options.get("namespaces")
    return AllowedSigner(principals, key_type, key_blob,
                         None if namespaces is None else namespaces.split(","),
                         valid_after, valid_before, where)


def parse_allowed_signers(text, source="allowed_signers"):
    """Every line must parse: a line we skipped could be a key the admin revoked."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("%s is not UTF-8 text; fix its encoding" % source)
    signers = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not _COMMENT_OR_BLANK.match(line):
            signers.append(_parse_line(line, "%s:%d" % (source, number)))
    return signers


def _pattern_list_matches(name, patterns):
    """OpenSSH match_pattern_list(): * and ? wildcards; a matching !pattern vetoes."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                       for c in pattern[negated:])
        if re.match(glob + r"\Z", name, re.S):
            if negated:
                return False
            matched = True
    return matched


# --- SSHSIG ----------------------------------------------------------------------

_ARMOUR = re.compile(br"-----BEGIN SSH SIGNATURE-----\r?\n([A-Za-z0-9+/=\r\n]+?)\r?\n"
                     br"-----END SSH SIGNATURE-----(?:\r?\n)?\Z")


def _dearmour(armored):
    if isinstance(armored, str):
        armored = armored.encode("ascii", "replace")
    m = _ARMOUR.match(armored)
    if not m:
        raise Refused("signature is not a complete -----BEGIN/END SSH SIGNATURE----- "
                      "block with nothing around it: it was truncated or altered; fetch it again")
    body = re.sub(br"\r?\n", b"", m.group(1))
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("signature armour holds invalid base64: it was altered; fetch it again")
    # Unused low bits in the last base64 digit decode the same: refuse them, so that
    # every flipped byte of a signature file is noticed.
    if base64.b64encode(blob) != body:
        raise Refused("signature armour's base64 is not in canonical form: it was altered; fetch it again")
    return blob


def _unusable(signer, namespace, now):
    """Why this allowed_signers line may not vouch for the signature, or None."""
    key = "key %s at %s" % (_key_name(signer.key_blob), signer.source)
    utc = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    # Same bounds as ssh-keygen: both ends of the window are inclusive.
    if signer.valid_after is not None and now < signer.valid_after:
        return ("%s is not valid before %s (it is now %s); wait, or fix valid-after"
                % (key, utc(signer.valid_after), utc(now)))
    if signer.valid_before is not None and now > signer.valid_before:
        return ("%s expired at %s (it is now %s); sign with a current key or renew "
                "its valid-before" % (key, utc(signer.valid_before), utc(now)))
    if signer.namespaces is not None and not _pattern_list_matches(namespace, signer.namespaces):
        return ("%s may sign only namespaces %s, not %r; sign with another key or add "
                "the namespace" % (key, ",".join(signer.namespaces), namespace))
    return None


def verify_signature(message, armored, signers, namespace=SIGNATURE_NAMESPACE, now=None):
    """Check an `ssh-keygen -Y sign` signature; return the AllowedSigner vouching for it."""
    blob = _dearmour(armored)
    if not blob.startswith(_SSHSIG_MAGIC):
        raise Refused("signature does not start with SSHSIG: it is not an ssh-keygen "
                      "-Y sign signature or was altered; fetch it again")
    wire = _Wire(blob[len(_SSHSIG_MAGIC):], "signature")
    version = wire.uint32()
    if version != 1:
        raise Refused("signature format version %d is not supported (only 1); sign "
                      "again with a current ssh-keygen" % version)
    key_blob = wire.string()
    signed_namespace = wire.string()
    reserved = wire.string()
    hash_name = wire.text()
    inner = wire.string()
    wire.end()
    if reserved:
        raise Refused("signature has a non-empty reserved field: it was altered or "
                      "made by an unknown tool; sign again with ssh-keygen -Y sign")
    if signed_namespace != namespace.encode("utf-8"):
        raise Refused("signature is for namespace %r, not %r: it was made for another "
                      "purpose; sign again with -n %s"
                      % (signed_namespace.decode("utf-8", "replace"), namespace, namespace))
    if hash_name not in _HASHES:
        raise Refused("signature uses hash %r (only sha256 and sha512 are supported); "
                      "sign again with -O hashalg=sha512" % hash_name)

    # cert-authority lines are refused when allowed_signers is read: every signer here is a plain key.
    candidates = [s for s in signers if s.key_blob == key_blob]
    if not candidates:
        raise Refused("signature was made with key %s, which is not in allowed_signers: "
                      "add it there if it is trusted (after a key rotation, a host that missed "
                      "the change adding the new key needs it added by hand)" % _key_name(key_blob))
    now = time.time() if now is None else now
    reasons = [_unusable(s, namespace, now) for s in candidates]
    if None not in reasons:
        raise Refused(reasons[0])
    signer = candidates[reasons.index(None)]

    signed = (_SSHSIG_MAGIC + _ssh_string(namespace.encode("utf-8")) + _ssh_string(b"")
              + _ssh_string(hash_name.encode()) + _ssh_string(hashlib.new(hash_name, message).digest()))
    wire = _Wire(inner, "signature value")
    algorithm, raw = wire.text(), wire.string()
    wire.end()
    key_type, params = _read_public_key(key_blob, signer.source)
    if key_type == "ssh-ed25519":
        if algorithm != "ssh-ed25519":
            raise Refused("signature algorithm %s does not match Ed25519 key %s: it was "
                          "altered; fetch it again" % (algorithm, _key_name(key_blob)))
        good = _ed25519_verify(params[0], signed, raw)
    else:
        if algorithm == "ssh-rsa":
            raise Refused("signature uses RSA with SHA-1 (ssh-rsa), which is refused; "
                          "sign again with a current ssh-keygen (rsa-sha2-512)")
        if algorithm not in _RSA_DIGEST_INFO:
            raise Refused("signature algorithm %s does not match RSA key %s: it was "
                          "altered; fetch it again" % (algorithm, _key_name(key_blob)))
        good = _rsa_verify(params[0], params[1], algorithm, signed, raw)
    if not good:
        raise Refused("signature does not verify with key %s: the signed data or its "
                      "signature was altered; fetch both again or check the mirror"
                      % _key_name(key_blob))
    return signer


# ---------------------------------------------------------------------------
# The journal: entries, what each kind and file type means, the hash chain, the signed head.
# ---------------------------------------------------------------------------


ENTRY_FIELDS = {"seq": int, "prev": str, "time": str, "author": str, "message": str, "kind": str}
HEAD_FIELDS = {"format": int, "branch": str, "seq": int, "id": str, "length": int, "time": str}


def check_fields(obj, fields, what, optional=()):
    """Exact field set and types: unknown fields are refused, not ignored."""
    if not isinstance(obj, dict):
        raise Refused("%s is not a JSON object" % what)
    missing = [k for k in fields if k not in obj]
    extra = [k for k in obj if k not in fields and k not in optional]
    if missing or extra:
        raise (Unknown if extra and not missing else Refused)("%s has %s%s%s" % (
            what, "missing fields %s" % ", ".join(sorted(missing)) if missing else "",
            "; " if missing and extra else "", "unknown fields %s" % ", ".join(sorted(extra)) if extra else ""))
    for key, kind in fields.items():
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or not 0 <= value <= INT_MAX)):
            raise Refused("%s: field %r has the wrong type or is out of range" % (what, key))


def names_list(names):
    """'a, b or c': the names of a table's rows, for a message."""
    names = list(names)
    return names[0] if len(names) == 1 else "%s or %s" % (", ".join(names[:-1]), names[-1])


# Applying an entry leaves the run one of these to do next.
DONE = "done"            # carry on with the next transaction
REBOOT = "reboot"        # reboot the machine: the run ends once the reboot command ran
HANDOVER = "handover"    # a new agent is installed: re-execute it, it carries on


def private_mode(mode):
    """Whether a file of this mode is a secret the dry run never shows: one others may not read (0600, and
    0640 too: /etc/shadow and TLS keys are group-readable by a group made to read them, not by all)."""
    return not mode & 0o004


def text_diff(path, old, new, new_file=False):
    """A unified diff of two files' bytes, for the dry run; None unless both are text (UTF-8, no NUL)."""
    try:
        if b"\0" in old or b"\0" in new:
            return None
        old, new = old.decode("utf-8"), new.decode("utf-8")
    except UnicodeDecodeError:
        return None
    import_late("difflib")
    return "\n".join(difflib.unified_diff(old.splitlines(), new.splitlines(), "/dev/null" if new_file else path,
                                         path, lineterm=""))


# --- file types inside a snap --------------------------------------------------------
# One class per type of path a snap records, and only here: its record's fields and checks,
# how the author's side captures it from a disk, how a host installs it, how 'verify' finds
# it drifted, and what it is called.  A new type is one class marked @file_type; the snap
# kind iterates over them.  'site' is what installing and verifying need of the host: its
# root (RootPath), its Owners and, to install, the staged objects (a StateDir).

OWNER_FIELDS = {"uid": int, "gid": int, "user": str, "group": str}
FILE_TYPES = collections.OrderedDict()   # type name -> FileType, in the order they are declared
Site = collections.namedtuple("Site", "rootpath owners staged")
Look = collections.namedtuple("Look", "rootpath owners last quick")  # last: path -> (record, its snap's by path)


def file_type(cls):
    """Class decorator: snap records whose type is cls.name mean what cls says."""
    FILE_TYPES[cls.name] = cls()
    return cls


class FileType(object):
    """A type of path inside a snap; the base holds what every type shares."""
    name = None
    label = None       # what lstat calls it on disk ('regular file'), for messages
    ifmt = None        # stat.S_IFMT of it on disk
    fields = {}        # the record's fields beside path and type
    optional = ()
    may_be_root = False

    @staticmethod
    def of(record, what):
        """The FileType of a record; Unknown for a type name a newer isconf may know."""
        name = record.get("type") if isinstance(record, dict) else None
        if isinstance(name, str) and name in FILE_TYPES:
            return FILE_TYPES[name]
        wanted = "file type %s is not %s" % (repr(name)[:40], names_list(FILE_TYPES))
        if isinstance(name, str) and KIND_RE.match(name):
            raise Unknown("%s: %s" % (what, wanted))
        raise Refused("%s: %s" % (what, wanted))   # a list or an object is unhashable: not a name at all

    @staticmethod
    def check_record(record, seen, what):
        """Refused, saying what is wrong, unless record is a well-formed record of a known type;
        seen maps the paths of the snap's records so far to their records."""
        ftype = FileType.of(record, what)
        check_fields(record, dict(ftype.fields, path=str, type=str), what, optional=ftype.optional)
        path = validate_path(record["path"], what + ": path")
        if record.get("uid", 0) > ID_MAX or record.get("gid", 0) > ID_MAX:
            raise Refused("%s: %s has a uid or gid above %d" % (what, path, ID_MAX))
        if "mode" in ftype.fields and record["mode"] > 0o7777:
            raise Refused("%s: mode %o is not a permission mode" % (what, record["mode"]))
        if path == "/" and not ftype.may_be_root:
            raise Refused("%s: only a directory may be snapped at /" % what)
        if in_state(path):
            raise Refused("%s: %s is in %s, the agent's own state, which no journal entry may write"
                          % (what, path, STATE_PATH))
        if path in (CONFIG_PATH, SIGNERS_PATH) and ftype.ifmt != stat.S_IFREG:
            raise Refused("%s: %s would be a %s, but hosts read it only as a regular file, and would refuse to run; "
                          "snap the file itself" % (what, path, ftype.label))
        if "mode" in ftype.fields:
            FileType.check_trusted(record, path, what)
        ftype.check(record, seen, what)
        if path in seen:
            raise Refused("%s: %s appears twice" % (what, path))
        seen[path] = record

    @staticmethod
    def check_trusted(held, path, what):
        """Refused if path guards the agent's trust (guards_trust) and would have held's owner and mode (its
        own record's, or for a hard link its file's) other than root's alone."""
        if not guards_trust(path):
            return
        # as a host resolves it (Owners): the name root, or uid 0 under no name (a source without passwd)
        by_root = held["user"] == "root" or (held["uid"] == 0 and held["user"] == "0")
        if held["mode"] & 0o022 or not by_root:
            raise Refused("%s: %s would be %s, but the agent refuses to run while it is not root's alone; "
                          "snap it again owned by root and writable by no one else"
                          % (what, path, "owned by %s, not root" % held.get("user", held.get("uid"))
                             if not by_root else "writable by group or others (mode %04o)" % held["mode"]))

    def check(self, record, seen, what):
        """What this type adds to the checks every record gets."""

    def objects(self, record):
        """(sha256, stored size) of the objects this record needs."""
        return []

    def content_object(self, record, by_path):
        """The object holding the bytes a host reads at record's path, or None (by_path: its snap's records)."""
        return None

    # The author's side.

    @staticmethod
    def capture_path(rootpath, path, links, owners, store):
        """The record of path under the root, as it is now.  links maps (device, inode) to the first
        path of a file with several links seen in this snap; store(record, f) stores a file's content."""
        st = rootpath.lstat(path)
        for ftype in FILE_TYPES.values():
            if ftype.captures(st, links):
                return ftype.capture(rootpath, path, st, links, owners, store)
        labels = [t.label for t in FILE_TYPES.values()]
        raise UsageError("%s is a %s, not a %s; isconf snaps only those" % (
            path, file_kind(st.st_mode), names_list(sorted(set(labels), key=labels.index))))

    def captures(self, st, links):
        return stat.S_IFMT(st.st_mode) == self.ifmt

    def capture(self, rootpath, path, st, links, owners, store):
        raise NotImplementedError

    # A host: install.

    @staticmethod
    def install_record(site, record, directories=None):
        """Put one record on the disk under the root, atomically, and make its directory durable: now,
        or once for several records, by directories (DirectorySyncs)."""
        path = record["path"]
        if path == "/":
            dfd, name = site.rootpath.open_dir("/"), "."
        else:
            dfd, name = site.rootpath.parent(path, create=True)
        try:
            FILE_TYPES[record["type"]].install(site, dfd, name, record)
            if directories is None:
                os.fsync(dfd)
            else:
                directories.add(dfd)
        finally:
            os.close(dfd)

    def install(self, site, dfd, name, record):
        raise NotImplementedError

    def leads_to(self, record):
        """Where a link record leads, its target as written; None for any other type."""
        return None

    # A host: verify.

    @staticmethod
    def last_records(snaps):
        """path -> (its record, the records of that snap by path), from the last of snaps (file record
        lists, in journal order) that names each path: what 'verify' holds the disk to."""
        last = {}
        for records in snaps:
            by_path = {record["path"]: record for record in records}
            for record in records:
                last[record["path"]] = (record, by_path)
        return last

    @staticmethod
    def drift_of(look, record):
        """[(what, expected, found)]: how the disk at record's path differs from it."""
        ftype = FILE_TYPES[record["type"]]
        shape = FILE_TYPES[ftype.held_to(look, record)["type"]]
        try:
            st = look.rootpath.lstat(record["path"])
            if stat.S_IFMT(st.st_mode) != shape.ifmt:
                return [("type", shape.label, file_kind(st.st_mode))]
            return ftype.drift(look, record, st)
        except (FileNotFoundError, NotADirectoryError):  # gone, or a directory on the way is not one any more
            return [("missing", shape.label, None)]
        except PermissionError as e:  # not a drift: this user may not read what root installed
            raise StateError("cannot read %s: %s; run 'isconf verify' as root" % (record["path"], e.strerror))
        except OSError as e:
            return [("unreadable", None, e.strerror or str(e))]

    def held_to(self, look, record):
        """The record whose shape, content and metadata the disk must show at this record's path."""
        return record

    # A host: repair ('verify --repair').

    @staticmethod
    def repair_record(files, path):
        """The record 'verify --repair' installs at path (files: journaled_files)."""
        record = files[path][0]
        return FILE_TYPES[record["type"]].repaired_as(files, record)

    @staticmethod
    def shared_with(files, path):
        """The journaled path whose inode path shares on a host (a hard link's file), or None."""
        record = files[path][0]
        return FILE_TYPES[record["type"]].shares_with(files, record)

    def repaired_as(self, files, record):
        return record

    def shares_with(self, files, record):
        return None

    def drift(self, look, record, st):
        """This type's drifts at a path that is of its type: its metadata, unless the type adds more."""
        drifts = []
        if "mode" in self.fields and stat.S_IMODE(st.st_mode) != record["mode"]:
            drifts.append(("mode", "%04o" % record["mode"], "%04o" % stat.S_IMODE(st.st_mode)))
        if "uid" in self.fields:
            owners = look.owners
            uid, gid = owners.ids(record)
            if st.st_uid != uid:
                drifts.append(("owner", owners.user_names.get(uid, str(uid)),
                               owners.user_names.get(st.st_uid, str(st.st_uid))))
            if st.st_gid != gid:
                drifts.append(("group", owners.group_names.get(gid, str(gid)),
                               owners.group_names.get(st.st_gid, str(st.st_gid))))
        return drifts

    # A host: what a pending snap would change ('up --dry-run --diff').  Installing a record changes
    # exactly what 'verify' would find drifted at its path (drift_of), before: the disk, after: the record.

    @staticmethod
    def changes_of(look, record, fetch):
        """[{"path", "what", "before", "after", "diff", "note"}]: what installing record would change on the
        disk, one per drift, in drift_of's order.  A file's content has its "diff" (unified), or a "note" why
        there is none: binary, large, or a secret, whose content, size and hash are never shown.
        fetch(sha, stored size) gives an object's verified bytes."""
        ftype = FILE_TYPES[record["type"]]
        return [dict({"diff": None, "note": None}, path=record["path"],
                     **ftype.change(look, record, what, expected, found, fetch))
                for what, expected, found in FileType.drift_of(look, record)]

    def change(self, look, record, what, expected, found, fetch):
        """One drift as the dry run shows it; a path missing or of another type is the record's path, new."""
        if what in ("missing", "type"):
            return {"what": "new" if what == "missing" else "type", "before": found,
                    "after": self.describe(record)}
        return {"what": what, "before": found, "after": expected}

    def describe(self, record):
        """The record as a new path: its type, and its mode and owner."""
        shown = {"type": self.label}
        if "mode" in self.fields:
            shown["mode"] = "%04o" % record["mode"]
        if "uid" in self.fields:
            shown.update(owner=record["user"], group=record["group"])
        return shown


@file_type
class RegularFile(FileType):
    """A regular file: its content is an object (only its data extents, for a sparse file)."""
    name, label, ifmt = "file", "regular file", stat.S_IFREG
    fields = dict(OWNER_FIELDS, mode=int, mtime_ns=int, size=int, object=str)
    optional = ("extents",)

    def check(self, record, seen, what):
        if not HEX64_RE.match(record["object"]):
            raise Refused("%s: object %r is not a SHA-256 in hex" % (what, record["object"]))
        if "extents" in record:
            if not isinstance(record["extents"], list):
                raise Refused("%s: extents of %s are not a list" % (what, record["path"]))
            end = 0
            for extent in record["extents"]:
                if (not isinstance(extent, list) or len(extent) != 2
                        or not all(isinstance(n, int) and not isinstance(n, bool) for n in extent)
                        or extent[0] < end or extent[1] <= 0 or extent[0] + extent[1] > record["size"]):
                    raise Refused("%s: extents of %s are not ordered, disjoint and inside the file"
                                  % (what, record["path"]))
                end = extent[0] + extent[1]

    def objects(self, record):
        stored = sum(length for _, length in record["extents"]) if "extents" in record else record["size"]
        return [(record["object"], stored)]

    def content_object(self, record, by_path):
        return record["object"]

    def captures(self, st, links):
        return stat.S_ISREG(st.st_mode) and not (st.st_nlink > 1 and (st.st_dev, st.st_ino) in links)

    def capture(self, rootpath, path, st, links, owners, store):
        if st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] = path
        record = dict(owners.record(st), path=path, type=self.name, mode=stat.S_IMODE(st.st_mode),
                      mtime_ns=st.st_mtime_ns, size=st.st_size)
        with rootpath.open_file(path) as f:
            size = record["size"]
            extents = data_extents(f.fileno(), size)
            if size and extents != [[0, size]]:
                record["extents"] = extents
            record["object"] = store(f, extents if size else [], path)
        return record

    def install(self, site, dfd, name, record):
        self.write_copy(site.staged, dfd, name, record, site.owners.ids(record), record["mode"], locked=True,
                        move=site.staged.last_use(record["object"]))

    def write_copy(self, staged, dfd, name, record, owner, mode, locked=False, move=False):
        """Write the file of record at name in dfd from its staged object (staged: StagedObjects), as a
        new file given its mode, owner and mtime and fsynced before it is renamed over name (replace_at).
        An object this command verified, unchanged since, is not read again: with move (no install
        still names it), when it holds the file's bytes as they are (no holes) and has no other link,
        the object itself becomes the file, unless the rename finds it on another file system or mount
        (EXDEV); else it is copied inside the kernel (copy_in_kernel).  Any other object is copied
        through the agent and checked against the record on the way: a short or damaged one is
        removed, so that the next run fetches it again."""
        size, sha = record["size"], record["object"]
        short = "staged object %s is short; run 'isconf up' again" % sha

        def fill(fd):
            digest = hashlib.sha256()
            os.ftruncate(fd, size)  # holes stay holes: only data extents are written
            copy_extents(source, fd, record.get("extents", [[0, size]]), digest, into_holes=True, short=short)
            if source.read(1) or digest.hexdigest() != sha:
                raise StateError("staged object %s is damaged; run 'isconf up' again" % sha)

        def fill_verified(fd):
            os.ftruncate(fd, size)
            copy_in_kernel(source.fileno(), fd, record.get("extents", [[0, size]]), short)
        with os.fdopen(staged.open(sha), "rb") as source:
            st = os.fstat(source.fileno())
            verified = staged.unchanged(sha, st)
            try:
                if verified and move and "extents" not in record and st.st_nlink == 1:
                    try:
                        replace_at(dfd, name, lambda tmp: staged.move(sha, source.fileno(), dfd, tmp, mode, owner,
                                                                      record["mtime_ns"]), locked=locked, sync=False)
                        return
                    except OSError as e:
                        if e.errno != errno.EXDEV:  # staged on another file system, or seen through another mount
                            raise
                replace_at(dfd, name, lambda tmp: write_new(dfd, tmp, fill_verified if verified else fill, mode,
                                                            owner, record["mtime_ns"]), locked=locked, sync=False)
            except StateError:
                staged.unlink(sha)
                raise

    def drift(self, look, record, st):
        drifts = []
        # Sizes are compared before anything is hashed (disk_digest): a file of another size is drift
        # without a byte read (attack: a sparse file of terabytes at a journaled path, days of holes to hash).
        if not (look.quick and st.st_size == record["size"] and st.st_mtime_ns == record["mtime_ns"]):
            with look.rootpath.open_file(record["path"]) as f:
                digest, size = disk_digest(f.fileno(), record["size"], record.get("extents"))
            if digest != record["object"] or size != record["size"]:
                drifts.append(("content", {"sha256": record["object"], "size": record["size"]},
                               {"sha256": digest, "size": size}))
        return drifts + FileType.drift(self, look, record, st)

    def describe(self, record):
        shown = FileType.describe(self, record)
        if not private_mode(record["mode"]):
            shown.update(size=record["size"], sha256=record["object"])
        return shown

    def content(self, record, fetch):
        """The bytes of the file of record, from its object (fetch), its holes zeros; at most DIFF_MAX."""
        data, stored = bytearray(record["size"]), fetch(record["object"], self.objects(record)[0][1])
        at = 0
        for offset, length in record.get("extents", [[0, record["size"]]]):
            data[offset:offset + length] = stored[at:at + length]
            at += length
        return bytes(data)

    def change(self, look, record, what, expected, found, fetch):
        shown = FileType.change(self, look, record, what, expected, found, fetch)
        path, mode = record["path"], record["mode"]
        if what in ("missing", "type"):  # all of its content is new
            if private_mode(mode):
                shown["note"] = "content not shown"
            elif record["size"] > DIFF_MAX:
                shown["note"] = "larger than %d bytes" % DIFF_MAX
            else:
                shown["diff"] = text_diff(path, b"", self.content(record, fetch), new_file=True)
                shown["note"] = None if shown["diff"] is not None else "binary"
            return shown
        if what != "content":
            return shown
        try:
            on_disk = stat.S_IMODE(look.rootpath.lstat(path).st_mode)
        except OSError:
            on_disk = 0  # gone meanwhile: nothing of it is shown
        if private_mode(mode) or private_mode(on_disk):
            return {"what": what, "before": None, "after": None, "diff": None,
                    "note": "mode %04o: not shown" % (mode if private_mode(mode) else on_disk)}
        shown["before"], shown["after"] = dict(found, type=self.label), dict(expected, type=self.label)
        shown["diff"], shown["note"] = None, "larger than %d bytes" % DIFF_MAX
        if found["size"] <= DIFF_MAX:
            with look.rootpath.open_file(path) as f:
                old = f.read(DIFF_MAX + 1)
            if shown["before"]["sha256"] is None:  # of another size: drift read none of it
                shown["before"]["sha256"] = sha256_hex(old)
            if record["size"] <= DIFF_MAX:
                shown["diff"] = text_diff(path, old, self.content(record, fetch))
                shown["note"] = None if shown["diff"] is not None else "binary"
        return shown


@file_type
class HardLink(FileType):
    """A further name of a file recorded earlier in the same snap: installed as a link to it."""
    name, label, ifmt = "hardlink", "regular file", stat.S_IFREG
    fields = {"target": str}

    def check(self, record, seen, what):
        validate_path(record["target"], what + ": hard link target")
        target = seen.get(record["target"])
        if target is None or target["type"] != RegularFile.name:
            raise Refused("%s: hard link %s names %s, which is not a file earlier in the same snap"
                          % (what, record["path"], record["target"]))
        FileType.check_trusted(target, record["path"], what)

    def content_object(self, record, by_path):
        target = by_path[record["target"]]
        return FILE_TYPES[target["type"]].content_object(target, by_path)

    def captures(self, st, links):
        return stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in links

    def capture(self, rootpath, path, st, links, owners, store):
        return {"path": path, "type": self.name, "target": links[(st.st_dev, st.st_ino)]}

    def install(self, site, dfd, name, record):
        tdfd, tname = site.rootpath.parent(record["target"])

        def make(tmp):
            os.link(tname, tmp, src_dir_fd=tdfd, dst_dir_fd=dfd, follow_symlinks=False)
        try:
            replace_at(dfd, name, make, locked=True, sync=False)
        finally:
            os.close(tdfd)

    def held_to(self, look, record):
        # the records of the snap that last named this path: the file record it links to is among them
        return look.last[record["path"]][1][record["target"]]

    def repaired_as(self, files, record):
        """Linked to its file while that path's last record is still it; else (a later snap gave that path a
        new inode) a file of its own, with the content it is held to (drift)."""
        want = files[record["path"]][1][record["target"]]
        return record if files.get(record["target"], (None,))[0] is want else dict(want, path=record["path"])

    def shares_with(self, files, record):
        return record["target"] if self.repaired_as(files, record) is record else None

    def drift(self, look, record, st):
        """Held to the file it links to and, while that path's last record is still that one, sharing
        its inode; once a later snap replaced the other path (a new inode), it keeps its content."""
        want = self.held_to(look, record)
        drifts = FILE_TYPES[want["type"]].drift(look, dict(want, path=record["path"]), st)
        if look.last.get(record["target"], (None,))[0] is want:
            try:
                target = look.rootpath.lstat(record["target"])
            except OSError:  # its own drift says so
                target = st
            if (target.st_dev, target.st_ino) != (st.st_dev, st.st_ino):
                drifts.insert(1 if drifts and drifts[0][0] == "content" else 0,
                              ("hardlink", record["target"], None))
        return drifts

    def describe(self, record):
        return {"type": self.label, "hardlink": record["target"]}

    def change(self, look, record, what, expected, found, fetch):
        if what == "content":  # its file's own record shows how
            return {"what": what, "before": None, "after": None, "diff": None,
                    "note": "that of %s" % record["target"]}
        return FileType.change(self, look, record, what, expected, found, fetch)


@file_type
class SymbolicLink(FileType):
    """A symbolic link: its target as written, its owner and mtime (a link has no mode of its own)."""
    name, label, ifmt = "symlink", "symbolic link", stat.S_IFLNK
    fields = dict(OWNER_FIELDS, target=str, mtime_ns=int)

    def check(self, record, seen, what):
        if not record["target"] or "\0" in record["target"]:
            raise Refused("%s: symlink %s has an empty target or one with NUL" % (what, record["path"]))

    def capture(self, rootpath, path, st, links, owners, store):
        return dict(owners.record(st), path=path, type=self.name, target=rootpath.readlink(path),
                    mtime_ns=st.st_mtime_ns)

    def leads_to(self, record):
        return record["target"]

    def install(self, site, dfd, name, record):
        uid, gid = site.owners.ids(record)

        def make(tmp):
            os.symlink(record["target"], tmp, dir_fd=dfd)
            os.chown(tmp, uid, gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(tmp, ns=(record["mtime_ns"], record["mtime_ns"]), dir_fd=dfd, follow_symlinks=False)
        replace_at(dfd, name, make, locked=True, sync=False)

    def drift(self, look, record, st):
        target = look.rootpath.readlink(record["path"])
        drifts = [("target", record["target"], target)] if target != record["target"] else []
        return drifts + FileType.drift(self, look, record, st)

    def describe(self, record):
        return dict(FileType.describe(self, record), target=record["target"])


@file_type
class Directory(FileType):
    """A directory: itself, its mode and owner; not what it holds (each of those is a record of its own)."""
    name, label, ifmt = "dir", "directory", stat.S_IFDIR
    fields = dict(OWNER_FIELDS, mode=int)
    may_be_root = True

    def capture(self, rootpath, path, st, links, owners, store):
        return dict(owners.record(st), path=path, type=self.name, mode=stat.S_IMODE(st.st_mode))

    def install(self, site, dfd, name, record):
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dfd)  # a file or link where a directory belongs
            st = None
        if st is None:
            os.mkdir(name, 0o700, dir_fd=dfd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            os.fchown(fd, *site.owners.ids(record))
            os.fchmod(fd, record["mode"])
            os.fsync(fd)
        finally:
            os.close(fd)


# --- entry kinds --------------------------------------------------------------
# What each kind means lives here and only here: its fields, its check, the objects it
# needs, its one-line summary, what it leaves on disk for 'verify', whether a run may apply
# it now, and how a host applies it.  A new kind is one class marked @entry_kind; a new field
# is one edit to its class (DESIGN rule 11: an agent that does not know it halts there,
# exit 10).  apply() gets a narrow context, the transaction (see Applier.transaction): the
# root, the staged objects, the environment and log of its command, the agent's own
# self-upgrade hooks; it returns what the run does next (DONE, REBOOT, HANDOVER).

KINDS = collections.OrderedDict()   # kind name -> Kind, in the order they are declared


def entry_kind(cls):
    """Class decorator: entries whose kind is cls.name mean what cls says."""
    KINDS[cls.name] = cls()
    return cls


class Kind(object):
    """An entry kind: the base says "no fields, no objects, nothing to do"."""
    name = None
    fields = {}        # the kind's own fields, beside the envelope's (ENTRY_FIELDS)
    holds = None       # the state (STATES) a host is in while an entry of this kind is its next
    ends_run = False   # a run ends once it applied one (the machine reboots): what follows waits for the next

    def check(self, fields, what):
        """Refused, saying what is wrong, beyond the field names and types check_fields saw."""

    def objects(self, fields):
        """(sha256, stored size) of every object an entry of this kind needs."""
        return []

    def object_path(self, fields, sha):
        """The path an object of this entry is the content of, for messages (None: not a path's)."""
        return None

    def summary(self, fields):
        return self.name

    def installs(self, fields):
        """The file records an entry of this kind leaves on disk: what 'verify' holds the disk to."""
        return []

    def names(self, fields, path):
        """Whether an entry of this kind names path beside what it installs: what it did to path may be
        the journal's last word on it, which 'verify --repair' cannot redo."""
        return False

    def waits(self, fields, allow_reboot):
        """Why a run stops before an entry of this kind, as (exit code, message); None to apply it now."""
        return None

    def retracts(self, fields):
        """(seq, id) of the earlier entry an entry of this kind retires for every host not past it, or None."""
        return None

    def apply(self, fields, transaction):
        """Apply one interpreted entry on the host; what the run does next."""
        return DONE


@entry_kind
class ExecKind(Kind):
    """Run a command in the host's root; a non-zero status fails the transaction."""
    name = "exec"
    fields = {"argv": list, "cwd": str}

    def check(self, fields, what):
        if not fields["argv"] or not all(isinstance(a, str) and "\0" not in a for a in fields["argv"]):
            raise Refused("%s: argv must be a non-empty list of strings" % what)
        validate_path(fields["cwd"], what + ": cwd")

    def summary(self, fields):
        return "exec " + " ".join(shlex.quote(a) for a in fields["argv"])

    def names(self, fields, path):
        return any(path in argument for argument in fields["argv"])  # 'rm PATH', 'sed -i ... PATH'

    def apply(self, fields, transaction):
        status = transaction.run(fields["argv"], fields["cwd"])
        if status != 0:
            failure = TransactionFailed("%s exited with status %d" % (self.summary(fields), status))
            failure.status = status
            raise failure
        # What the command wrote, and its log, must outlive a power cut once 'done' is recorded (rule 5): the
        # batch's syncfs covers both before its done records are written (Transaction.ran, DoneBatch).
        return DONE


@entry_kind
class SnapKind(Kind):
    """Install files, links and directories as the author had them (FILE_TYPES); a snap of the
    running agent's own file is a self-upgrade (the new agent's self-test passes first)."""
    name = "snap"
    fields = {"files": list}

    def check(self, fields, what):
        if not fields["files"]:
            raise Refused("%s: a snap must name at least one file" % what)
        seen = {}
        for record in fields["files"]:
            FileType.check_record(record, seen, what)

    def objects(self, fields):
        return [need for record in fields["files"] for need in FILE_TYPES[record["type"]].objects(record)]

    def object_path(self, fields, sha):
        return next((r["path"] for r in fields["files"] if sha in dict(FILE_TYPES[r["type"]].objects(r))), None)

    def summary(self, fields):
        return "snap " + " ".join(r["path"] for r in fields["files"])

    def installs(self, fields):
        return fields["files"]

    def apply(self, fields, transaction):
        for record in fields["files"]:  # a link an earlier transaction made may lead there now
            if transaction.writes_state(record["path"]):
                raise TransactionFailed("%s leads into this host's state directory, which no journal entry may "
                                        "write; nothing of this snap installed" % record["path"])
        agent = None
        for record in fields["files"]:
            if record["type"] == RegularFile.name and transaction.is_agent(record["path"]):
                agent = record
                transaction.try_agent(record["path"], lambda dfd, name: FILE_TYPES[RegularFile.name].write_copy(
                    transaction.staged, dfd, name, agent, (os.getuid(), os.getgid()), 0o600))
                break
        site = Site(transaction.rootpath, Owners(transaction.rootpath), transaction.staged)
        directories = DirectorySyncs()  # each file is durable before its rename; its directory once at the end
        linked = False  # once this snap installed a link, the paths after it are judged again on the disk
        try:
            for record in fields["files"]:
                if linked and transaction.writes_state(record["path"]):  # through a link this snap made just now
                    raise TransactionFailed("%s leads into this host's state directory through a link this snap "
                                            "installed, and no journal entry may write the agent's own state; "
                                            "the snap stopped there" % record["path"])
                try:
                    FileType.install_record(site, record, directories)
                except (OSError, OverflowError) as e:
                    raise TransactionFailed("cannot install %s: %s" % (record["path"], getattr(e, "strerror", None)
                                                                       or e))
                linked = linked or FILE_TYPES[record["type"]].leads_to(record) is not None
            try:
                directories.sync()
            except OSError as e:
                raise TransactionFailed("cannot make the snap's directories durable: %s" % e.strerror)
        finally:
            directories.close()
        return HANDOVER if agent is not None else DONE


def reboot_advice(root, command):
    """What to do at a reboot entry.  On a --root other than /, 'up -r' runs the reboot command on the
    machine running isconf, not in the root: with the default one that reboots this machine (a miniroot,
    or an admin's workstation), so the advice names --reboot-command and README's miniroot procedure."""
    if os.path.realpath(root) == "/":
        return "run 'isconf up -r' to record it and reboot"
    if command != DEFAULT_REBOOT:
        return "run 'isconf --root %s up -r' to record it and run the reboot command (%s)" % (root, command)
    return ("%s is not the machine running isconf, whose reboot 'up -r' would start (%s): give the host "
            "--reboot-command (init --force) to boot the target, or /bin/true to record the entry and boot it "
            "yourself (README: Building a target disk from a miniroot)" % (root, command))


def waiting_message(entry, waits, root, reboot_command):
    """(exit code, what up says) for an entry a run stops at (Kind.waits), a reboot's advice for this root added."""
    code, why = waits
    if code == EXIT_REBOOT:
        why += ": " + reboot_advice(root, reboot_command)
    return code, "transaction %d %s" % (entry.seq, why)


@entry_kind
class RebootKind(Kind):
    """Reboot the machine: recorded done first, then the configured reboot command runs."""
    name = "reboot"
    holds = "reboot"
    ends_run = True

    def waits(self, fields, allow_reboot):
        if not allow_reboot:
            return EXIT_REBOOT, "is a reboot"  # the run adds reboot_advice: it knows the root
        return None

    def apply(self, fields, transaction):
        return REBOOT


@entry_kind
class RetractKind(Kind):
    """Retire an earlier entry, named by seq and id, for every host that has not applied it: such a host
    skips it when its turn comes (recorded 'retracted'); one that applied it changes nothing.  The one
    signed, ordered exception to "never skip": a bad entry is fixed forward for the whole fleet."""
    name = "retract"
    fields = {"retracted_seq": int, "retracted_id": str}

    def check(self, fields, what):
        if not HEX64_RE.match(fields["retracted_id"]) or fields["retracted_seq"] < 1:
            raise Refused("%s: a retract names an entry by its seq (1 or more) and its id (a SHA-256 in hex)" % what)

    def summary(self, fields):
        return "retract %d %s" % (fields["retracted_seq"], fields["retracted_id"][:16])

    def retracts(self, fields):
        return fields["retracted_seq"], fields["retracted_id"]


class Entry(object):
    """One journal entry (one transaction) as it stands in the journal.

    Every version reads an entry's envelope (parse): the fields the hash chain and the
    history need, which are its attributes.  What its kind means is read only when its turn
    comes (interpret), and only by its Kind, so a journal may carry a new agent and, after it,
    entries only the new agent understands (DESIGN rule 11)."""

    def __init__(self, fields, line):
        self.fields = fields                  # the whole object: its kind's fields are the Kind's to read
        self.line = line                      # canonical bytes, without the newline
        self.id = sha256_hex(line)
        self.seq, self.prev, self.kind = fields["seq"], fields["prev"], fields["kind"]
        self.time, self.author, self.message = fields["time"], fields["author"], fields["message"]
        self.interpreted = False

    @classmethod
    def parse(cls, line, what):
        """The envelope: canonical JSON, seq, prev, time, author, message and a kind name."""
        fields = parse_canonical(line, what)
        check_fields(dict((k, fields[k]) for k in ENTRY_FIELDS if k in fields), ENTRY_FIELDS, what)
        if not HEX64_RE.match(fields["prev"]):
            raise Refused("%s: prev is not a SHA-256 in hex" % what)
        parse_time(fields["time"], what + ": time")
        if not KIND_RE.match(fields["kind"]):
            raise Refused("%s: kind %s is not a kind name" % (what, repr(fields["kind"])[:40]))
        return cls(fields, line)

    def check(self, what):
        """Everything about the entry's kind and fields; Refused, saying what is wrong, if this
        version does not understand it.  The author's side calls this as it stages."""
        kind = KINDS.get(self.kind)
        if kind is None:
            raise Unknown("%s: kind %s is not %s" % (what, repr(self.kind)[:40], names_list(KINDS)))
        check_fields(self.fields, dict(ENTRY_FIELDS, **kind.fields), what)
        kind.check(self.fields, what)
        self.interpreted = True
        return self

    def interpret(self):
        """check(), on a host.  A kind, file type or field this version does not know was
        signed, so a newer isconf wrote it: the host halts there (NeedsNewer) until one takes
        over.  What it does know but finds malformed (a path with '..') is refused, as at
        fetch time, where staging interprets every pending entry it can."""
        if not self.interpreted:
            try:
                self.check("entry %d" % self.seq)
            except Unknown as e:
                raise NeedsNewer("%s; isconf %s cannot interpret it: it needs a newer isconf (ship one through "
                                 "the journal before it, or install one by hand)" % (e, __version__))
        return self

    def meaning(self):
        """The entry's Kind, once interpreted (NeedsNewer if this version cannot)."""
        return KINDS[self.interpret().kind]

    # What its kind says of it (NeedsNewer if this version cannot interpret it).

    def objects(self):
        """(sha256, stored size) of every object this entry needs."""
        return self.meaning().objects(self.fields)

    def object_path(self, sha):
        return self.meaning().object_path(self.fields, sha)

    def installs(self):
        return self.meaning().installs(self.fields)

    def names(self, path):
        return self.meaning().names(self.fields, path)

    def waits(self, allow_reboot):
        return self.meaning().waits(self.fields, allow_reboot)

    def holds(self):
        return self.meaning().holds

    def ends_run(self):
        return self.meaning().ends_run

    def retracts(self):
        return self.meaning().retracts(self.fields)

    def apply(self, transaction):
        return self.meaning().apply(self.fields, transaction)

    def summary(self):
        try:
            kind = self.meaning()
        except NeedsNewer:
            return "%s (an entry this isconf cannot interpret)" % self.kind
        return kind.summary(self.fields)

    def as_json(self, **extra):
        """The entry as 'log --json' shows it: its fields as signed, its id, and what extra adds."""
        return dict(self.fields, id=self.id, **extra)


def interpretable(entries):
    """The leading entries this version can interpret: what a run may stage and apply."""
    known = []
    for entry in entries:
        try:
            known.append(entry.interpret())
        except NeedsNewer:
            break
    return known


def entry_at(entries, seq):
    """The entry of seq among consecutive entries (a journal, or its end from the applied entry on), or None."""
    if entries and entries[0].seq <= seq <= entries[-1].seq:
        return entries[seq - entries[0].seq]
    return None


def verify_chain(data, prev_seq, prev_id, what="journal"):
    """Parse journal bytes that must follow entry (prev_seq, prev_id); return the entries."""
    entries = []
    if data and not data.endswith(b"\n"):
        raise Refused("%s does not end with a newline: it is truncated" % what)
    for line in data.split(b"\n")[:-1] if data else []:
        where = "%s entry %d" % (what, prev_seq + 1)
        entry = Entry.parse(line, where)
        if entry.seq != prev_seq + 1:
            raise Refused("%s: says seq %d where %d was due; the journal was reordered or spliced"
                          % (where, entry.seq, prev_seq + 1))
        if entry.prev != prev_id:
            raise Refused("%s: does not follow entry %d (hash chain broken); the journal was "
                          "rewritten or damaged" % (where, prev_seq))
        entries.append(entry)
        prev_seq, prev_id = entry.seq, entry.id
    return entries


def verify_copy(lines, known, head):
    """The entries of a host's own verified copy of the journal, read back: lines are its entries
    from seq known on (from seq 1 when known is 0), whose chain must end at head's id."""
    entries = []
    if known:
        entries.append(Entry.parse(lines[0], "local journal entry %d" % known))
        if entries[0].seq != known:
            raise Refused("local journal entry %d says seq %d" % (known, entries[0].seq))
        lines = lines[1:]
    entries += verify_chain(b"".join(line + b"\n" for line in lines), known, entries[-1].id if entries else ZERO_ID,
                            "local journal")
    if (entries[-1].id if entries else ZERO_ID) != head.id:
        raise Refused("local journal does not end at the local head's id")
    return entries


class Head(object):
    """The small signed file that commits to a branch's whole journal."""

    def __init__(self, fields, data):
        self.fields, self.data = fields, data
        self.branch, self.seq, self.id = fields["branch"], fields["seq"], fields["id"]
        self.length, self.time = fields["length"], fields["time"]
        self.expires = fields.get("expires")

    @classmethod
    def build(cls, branch, seq, entry_id, length, now, expires=None):
        fields = {"format": FORMAT, "branch": branch, "seq": seq, "id": entry_id,
                  "length": length, "time": format_time(now)}
        if expires is not None:
            fields["expires"] = format_time(expires)
        return cls(fields, canonical(fields) + b"\n")

    @classmethod
    def parse(cls, data, what="head"):
        if not data.endswith(b"\n"):
            raise Refused("%s does not end with a newline: it is truncated or not an isconf head" % what)
        fields = parse_canonical(data[:-1], what)
        check_fields(fields, HEAD_FIELDS, what, optional=("expires",))
        if fields["format"] != FORMAT:
            raise Refused("%s has format %d; this isconf.py reads format %d: upgrade isconf.py"
                          % (what, fields["format"], FORMAT))
        if not HEX64_RE.match(fields["id"]) or not BRANCH_RE.match(fields["branch"]):
            raise Refused("%s has a malformed id or branch" % what)
        if (fields["seq"] == 0) != (fields["id"] == ZERO_ID) or (fields["seq"] == 0) != (fields["length"] == 0):
            raise Refused("%s: seq, id and length disagree about whether the journal is empty" % what)
        parse_time(fields["time"], what + ": time")
        if "expires" in fields:
            parse_time(fields["expires"], what + ": expires")
        return cls(fields, data)

    def check_expiry(self, now):
        if self.expires and parse_time(self.expires) < now:
            raise Refused("head of branch %s expired at %s (it is %s): its authors renew it with 'isconf sign "
                          "--expires DURATION' (or a mirror serves a stale copy: check it); if this clock is wrong, "
                          "pass --now"
                          % (self.branch, self.expires, format_time(now)))


# ---------------------------------------------------------------------------
# Host state: its files, config, history, logs and the verified journal copy.
# ---------------------------------------------------------------------------


class StateDir(object):
    """A directory of the host's own files (the state directory, etc/isconf), held open.

    The way to it is resolved inside the root as a chroot would (a target whose /var is a
    link keeps its state there); below it nothing is ever a link: every file and
    subdirectory is reached relative to the descriptor, with O_NOFOLLOW, and only if it is
    what isconf keeps there.  So nothing planted in the image, and nothing a transaction
    makes while it runs, can point the agent's own reads, writes or cleanup out of the
    root or block it on a FIFO (attack: 'ln -s /tmp/v /var/lib/isconf/objects').
    A host's own directory (inside, or at with private) is held by a CheckedDir: it, every
    directory on the way to it, its subdirectories and every file opened in it pass check_private.
    """

    def __init__(self, fd, path):
        self.fd, self.path, self._subdirs = fd, path, {}

    @classmethod
    def inside(cls, rootpath, path, create=False):
        """The host's own directory at path inside the root; made if create and missing."""
        try:
            fd = rootpath.open_dir(path, create, private=True)
        except FileNotFoundError:
            raise StateError("%s does not exist; run 'isconf init' first" % os.path.join(rootpath.root, path[1:]))
        except NotADirectoryError:
            raise StateError("%s (or a directory on the way to it) is not a directory; find out what put it there, "
                             "move it away, and run again" % os.path.join(rootpath.root, path[1:]))
        return cls(fd, rootpath.resolve(path))

    @classmethod
    def at(cls, path, private=False):
        """A directory named on the command line (--config): its path is the user's to choose; with
        private (a host's config), the directory itself passes check_private."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StateError("cannot open directory %s: %s" % (path, e.strerror))
        if private:
            fd = cls.checked(fd, path)
        return cls(fd, path)

    @staticmethod
    def checked(fd, path):
        """fd as a CheckedDir once it passed check_private; closed if it did not."""
        try:
            check_private(os.fstat(fd), path)
        except StateError:
            os.close(fd)
            raise
        return CheckedDir(fd)

    def close(self):
        for sub in self._subdirs.values():
            sub.close()
        os.close(self.fd)

    def file(self, name):
        """Where name is, for messages."""
        return os.path.join(self.path, name)

    def check_subdir(self, name):
        """What subdir checks of a subdirectory, on its lstat, without opening it: nothing if it is missing."""
        if name in self._subdirs:
            return
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            raise misplaced(self.file(name), file_kind(st.st_mode), "directory")
        if isinstance(self.fd, CheckedDir):
            check_private(st, self.file(name))

    def subdir(self, name, create=False, mode=0o700):
        """A subdirectory, opened once and kept: never a link, never anything but a directory."""
        if name not in self._subdirs:
            if create:
                try:
                    os.mkdir(name, mode, dir_fd=self.fd)
                    os.fsync(self.fd)
                except FileExistsError:
                    pass
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
            except FileNotFoundError:
                raise StateError("%s does not exist; run 'isconf up' to make it" % self.file(name))
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):  # a link, or not a directory: say which
                    raise
                st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
                raise misplaced(self.file(name), file_kind(st.st_mode), "directory")
            if isinstance(self.fd, CheckedDir):
                fd = self.checked(fd, self.file(name))
            self._subdirs[name] = StateDir(fd, self.file(name))
        return self._subdirs[name]

    def open(self, name, flags=os.O_RDONLY, mode=0o600):
        return open_regular(self.file(name), flags, mode, self.fd)

    def stat(self, name):
        """lstat of a regular file, or None if there is none."""
        return regular_stat(self.file(name), self.fd)

    def read(self, name, limit=None):
        return read_file(self.file(name), limit, self.fd)

    def write(self, name, data, mode=0o644, keep_owner=False, durable=True):
        atomic_write(self.file(name), data, mode, self.fd, keep_owner, durable)

    def append_at(self, name, keep, data):
        append_at(self.file(name), keep, data, self.fd)

    def append_record(self, name, fields):
        append_record(self.file(name), fields, self.fd)

    def open_records(self, name):
        return open_records(self.file(name), self.fd)

    def read_records(self, name, what, until=None, limit=RECORD_MAX):
        return read_records(self.file(name), what, until, self.fd, limit)

    def lock(self, name, what, **kw):
        return FileLock(self.file(name), what, self.fd, **kw)

    def listdir(self):
        return os.listdir(self.fd)

    def unlink(self, name):
        """Remove a name in this directory; a link is removed itself, never what it points to."""
        os.unlink(name, dir_fd=self.fd)

    def rename(self, old, new, temporary=True):
        """old becomes new, durably once fsync() is called (after several renames, one fsync)."""
        rename_into_place(self.fd, old, new, sync=False, temporary=temporary)

    def fsync(self):
        os.fsync(self.fd)


class StagedObjects(object):
    """The staging area (objects/ of the state, a StateDir) as one command of the agent uses it: which
    objects it verified by hash (Sync: as each was fetched, or, staged by an earlier run, read whole
    before any transaction, rule 4), each with its file's identity then, and how many installs still
    name each (uses).  An object is installed without being hashed again only while its file is the
    one verified, unchanged since (unchanged: a write, a truncation or another file put there changes
    its inode, size, mtime or ctime); one no install still names is moved into place, not copied
    (RegularFile.write_copy)."""

    def __init__(self, directory):
        self.directory, self.verified, self.uses = directory, {}, collections.Counter()

    @staticmethod
    def identity(st):
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def verify(self, sha, st):
        """Record that the object's file, as st found it before it was hashed, holds its bytes."""
        self.verified[sha] = self.identity(st)

    def unchanged(self, sha, st):
        """Whether st is the file of an object verified by this command, unchanged since."""
        return self.verified.get(sha) == self.identity(st)

    def count(self, shas):
        """One more install of each of shas to come (or one more reason to keep it staged)."""
        self.uses.update(shas)

    def last_use(self, sha):
        """Count one install of sha done; whether it was the last one counted (none was: False)."""
        if self.uses[sha] <= 0:
            return False
        self.uses[sha] -= 1
        return self.uses[sha] == 0

    def open(self, sha):
        return self.directory.open(sha)

    def unlink(self, sha):
        self.verified.pop(sha, None)
        with contextlib.suppress(FileNotFoundError):
            self.directory.unlink(sha)

    def move(self, sha, fd, dfd, name, mode, owner, mtime_ns):
        """Make the object sha (open as fd, found unchanged) the new file name in dfd, on the same file
        system, without copying a byte: moved out of the staging area, then finished (finish_new).  It
        is no longer staged: a later run that needs it fetches it again.  EXDEV (another mount) moves
        nothing."""
        rename_into_place(dfd, sha, name, sync=False, temporary=False, old_dfd=self.directory.fd)
        self.verified.pop(sha, None)
        moved, opened = os.stat(name, dir_fd=dfd, follow_symlinks=False), os.fstat(fd)
        if (moved.st_dev, moved.st_ino) != (opened.st_dev, opened.st_ino):  # replaced since it was opened
            raise StateError("staged object %s changed while it was installed; run 'isconf up' again" % sha)
        finish_new(fd, mode, owner, mtime_ns)


# At most 18 digits on either side of the point: int() of a long decimal takes quadratic time before 3.11.
NUMBER_RE = re.compile(r"^\+?(?:[0-9]{1,18}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})(?:[eE][+-]?[0-9]{1,3})?\Z")


def parse_positive(text, kind, what, most):
    """A number above 0 and at most most, written in ASCII digits: int() and float() also take
    other scripts' digits, 'nan' and 'inf'."""
    text, value = str(text).strip(), 0
    if NUMBER_RE.match(text):
        try:
            value = kind(text)
        except ValueError:  # a fraction where an integer is due
            value = 0
    if not (0 < value <= most):
        raise ValueError("%s must be a number above 0 and at most %d, not %r" % (what, most, text))
    return value


def parse_command(text):
    """A command line from the config, split as a shell would, never run by one."""
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise ValueError("command %r: %s" % (text, e))
    if not argv or "\0" in text:
        raise ValueError("command %r is empty or holds a NUL" % text)
    return argv


def check_variable(name, value):
    """A per-host variable for every exec: a shell-style name, not ISCONF_*, no NUL."""
    if not ENV_NAME_RE.match(name) or name.startswith("ISCONF_") or "\0" in value:
        raise ValueError("variable %r must have a shell-style name, not ISCONF_*, and a value without NUL" % name)


def check_metrics_path(path):
    """Where the metrics go, inside the root: absolute and normalised, and a .prom file, the
    only names node_exporter's textfile collector reads (another would be written for no one)."""
    try:
        validate_path(path, "metrics")
    except Refused as e:
        raise ValueError(str(e))
    if not path.endswith(".prom"):
        raise ValueError("metrics %r must be an absolute path ending in .prom, e.g. "
                         "/var/lib/node_exporter/textfile_collector/isconf.prom" % path)


class ConfigKey(object):
    """One key of the [isconf] section: its name, how its text is read (ValueError if it is wrong),
    its default, and, for a key 'init' sets with an option of its own, the option's metavar and help."""

    def __init__(self, name, read, default, metavar=None, help=None):
        self.name, self.read, self.default, self.metavar, self.help = name, read, default, metavar, help

    @property
    def option(self):
        return "--" + self.name.replace("_", "-")

    def value(self, text, what=None):
        """The value of the key's text, checked; ValueError naming the key (or what) otherwise."""
        return self.read(text, what or self.name)


def _number(kind, most):
    return lambda text, what: parse_positive(text, kind, what, most)


def _command(text, what):
    parse_command(text)
    return text


def _metrics(text, what):
    if text:
        check_metrics_path(text)
    return text or None


def _umask(text, what):
    if not re.match(r"^[0-7]{1,4}\Z", text) or int(text, 8) > 0o777:
        raise ValueError("%s %r must be a umask in octal, 000 to 777 (e.g. 022 or 027)" % (what, text))
    return int(text, 8)


def _urls(text, what):
    urls = text.split()
    for url in urls:
        try:
            Mirror(url)  # a mirror up could not use is a typo found when the config is read, with its line
        except UsageError as e:
            raise ValueError(str(e))
    return urls


def _yes_no(text, what):
    if text.lower() in ("yes", "true", "1", "no", "false", "0"):
        return text.lower() in ("yes", "true", "1")
    raise ValueError("%s %r must be yes, true or 1, or no, false or 0" % (what, text))


def _branch(text, what):
    if not BRANCH_RE.match(text):
        raise ValueError("%s %r must be letters, digits, '.', '_' or '-' (at most 64), starting with a letter or "
                         "digit" % (what, text))
    return text


# The host config's one schema: Config reads it, init's options and their --help come from it,
# and Config.render writes it.  A new key is one row.
CONFIG_KEYS = collections.OrderedDict((key.name, key) for key in [
    ConfigKey("branch", _branch, ""),
    ConfigKey("urls", _urls, []),
    ConfigKey("insecure", _yes_no, False),
    ConfigKey("reboot_command", _command, DEFAULT_REBOOT, "COMMAND",
              "what 'up -r' runs to reboot (default %s)" % DEFAULT_REBOOT),
    ConfigKey("timeout", _number(float, 3600), float(DEFAULT_TIMEOUT), "SECONDS",
              "seconds a connection may stay silent (default %d)" % DEFAULT_TIMEOUT),
    ConfigKey("deadline", _number(float, MAX_DEADLINE), float(DEFAULT_DEADLINE), "SECONDS",
              "seconds one fetch may take, plus 1 s per %d KiB (default %d)" % (MIN_RATE // 1024, DEFAULT_DEADLINE)),
    ConfigKey("retries", _number(int, 100), DEFAULT_RETRIES, "N",
              "rounds over all mirrors before giving up (default %d)" % DEFAULT_RETRIES),
    ConfigKey("exec_timeout", _number(float, MAX_DEADLINE), None, "SECONDS",
              "kill an exec still running after SECONDS, with its whole process group, and fail the transaction "
              "(default: no limit)"),
    ConfigKey("exec_umask", _umask, DEFAULT_EXEC_UMASK, "UMASK",
              "the umask execs run with, in octal: what they create is no more open than it allows "
              "(default %03o)" % DEFAULT_EXEC_UMASK),
    ConfigKey("boot_wait", _number(float, BOOT_WAIT_MAX), float(DEFAULT_BOOT_WAIT), "SECONDS",
              "how long 'up --boot' waits for a mirror (default %d)" % DEFAULT_BOOT_WAIT),
    ConfigKey("interrupted_max", _number(int, INTERRUPTED_MOST), DEFAULT_INTERRUPTED_MAX, "N",
              "halt, as failed, a transaction started N times that never ended (it reboots the machine, or kills "
              "the agent; a Ctrl-C or SIGTERM without a reboot does not count), instead of starting it again at "
              "every boot (default %d)" % DEFAULT_INTERRUPTED_MAX),
    ConfigKey("metrics", _metrics, None, "PATH",
              "after every 'up' and each disable, enable, skip and verify, write a Prometheus text file at PATH "
              "inside the root, for node_exporter's textfile collector (a .prom file; default: none)"),
])


def nearest(word, choices, form="%r"):
    """'did you mean X?' for the choice nearest a mistyped word (case aside), else the choices."""
    lower = collections.OrderedDict((choice.lower(), choice) for choice in choices)
    import_late("difflib")
    found = difflib.get_close_matches(word.lower(), list(lower), 1)
    if found:
        return "did you mean %s?" % (form % lower[found[0]])
    return "the valid ones are %s" % ", ".join(form % choice for choice in choices)


class Config(object):
    """ROOT/etc/isconf/isconf.conf: which branch, which mirrors, the keys of CONFIG_KEYS, and the
    per-host variables of [env]; each key is an attribute of the same name, texts holds the keys
    the file gives as written.  What it does not understand (a section, a key, a value) is refused
    with its line, never ignored: a typo must not leave a host on a default its admin meant to change."""

    SECTIONS = ("isconf", "env")

    def __init__(self, path, data):
        self.path = path
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # variable names keep their case
        try:
            text = data.decode("utf-8-sig")   # a byte-order mark an editor added is no error
            self.check_blanks(text)
            parser.read_string(text, path)
        except UnicodeDecodeError as e:
            raise StateError("cannot read config %s: %s" % (path, e))
        except configparser.DuplicateOptionError as e:
            raise self.damaged(e.lineno, "key %r appears twice in [%s]" % (e.option, e.section))
        except configparser.DuplicateSectionError as e:
            raise self.damaged(e.lineno, "section [%s] appears twice" % e.section)
        except configparser.MissingSectionHeaderError as e:
            raise self.damaged(e.lineno, "a key before the first [section]")
        except configparser.ParsingError as e:
            raise self.damaged(e.errors[0][0], "not KEY = VALUE, a [section] nor a comment")
        except configparser.Error as e:
            raise StateError("cannot read config %s: %s" % (path, str(e).splitlines()[0]))
        sections, lines = self.lines(text)
        for name, number in sections:
            if name not in self.SECTIONS:
                raise self.damaged(number, "unknown section [%s]; %s" % (name, nearest(name, self.SECTIONS,
                                                                                        "[%s]")))
        if not parser.has_section("isconf"):
            raise self.damaged(None, "no [isconf] section")
        section = parser["isconf"]
        self.texts = collections.OrderedDict()
        for name in section:
            if name not in CONFIG_KEYS:
                raise self.damaged(lines.get(("isconf", name)), "unknown key %r in [isconf]; %s"
                                   % (name, nearest(name, CONFIG_KEYS)))
        for key in CONFIG_KEYS.values():
            given = section.get(key.name)
            try:
                setattr(self, key.name, key.default if given is None else key.value(given))
            except ValueError as e:
                raise self.damaged(lines.get(("isconf", key.name)), str(e))
            if given is not None:
                self.texts[key.name] = given
        if not self.branch or not self.urls:
            raise self.damaged(None, "no %s in [isconf]" % ("branch" if not self.branch else "mirror (urls)"))
        self.reboot_argv = parse_command(self.reboot_command)
        self.env = dict(parser["env"]) if parser.has_section("env") else {}
        for name, value in self.env.items():
            try:
                check_variable(name, value)
            except ValueError as e:
                raise self.damaged(lines.get(("env", name)), str(e))

    BLANKS_RE = re.compile(r"\s{%d}" % (CONFIG_BLANKS + 1))

    def check_blanks(self, text):
        """Refuse a line holding a long run of blanks before its first '=' or ':', before configparser reads
        it: its pattern for KEY = VALUE takes time quadratic in such a run (a damaged config line of a
        megabyte of spaces held every verb, 'up --boot' among them, for hours on Python 3.6)."""
        for number, line in enumerate(text.split("\n"), 1):
            if self.BLANKS_RE.search(re.split(r"[=:]", line.strip(), maxsplit=1)[0]):
                raise self.damaged(number, "more than %d blanks in a row before its '=': not KEY = VALUE"
                                   % CONFIG_BLANKS)

    def damaged(self, number, what):
        """The error for the line of the config that does not read."""
        return StateError("config %s%s: %s%s the file, or write it anew with 'isconf init --force --reset'"
                          % (self.path, " line %d" % number if number else "", what,
                             " Fix" if what.endswith("?") else "; fix"))

    @staticmethod
    def lines(text):
        """Where each section header and each key is, by line number, as configparser reads the file
        (which does not say): [(section, number)] and {(section, key): number}."""
        sections, keys, section, open_key = [], {}, None, False
        for number, line in enumerate(text.split("\n"), 1):
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            if line[0] in " \t" and open_key:
                continue  # a continuation line of the value above
            header = re.match(r"\[(.+)\]", stripped)
            if header:
                section, open_key = header.group(1), False
                sections.append((section, number))
            else:
                keys.setdefault((section, re.split(r"[=:]", stripped, maxsplit=1)[0].strip()), number)
                open_key = True
        return sections, keys

    @staticmethod
    def render(values, env):
        """The config file holding values (key name -> its text, as CONFIG_KEYS reads it back) and env,
        read back before it is returned: a file that would not read as given is never written (a value
        on several lines, kept by 'init --force', continues on indented lines)."""
        def line(name, text):
            return "%s = %s" % (name, "\n    ".join(text.split("\n")))
        lines = ["# isconf host configuration; see 'isconf init --help'", "[isconf]"]
        lines += [line(name, values[name]) for name in CONFIG_KEYS if name in values]
        lines += ["", "# Per-host variables, given to every exec as environment variables.", "[env]"]
        lines += [line(name, value) for name, value in sorted(env.items())]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        written = Config("the new config", data)
        if written.env != env or dict(written.texts) != {k: v for k, v in values.items() if k in CONFIG_KEYS}:
            raise StateError("the new config would not read back as given (a value with a blank line or white "
                             "space at a line's end?); nothing written: edit the file by hand")
        return data


def check_config_value(value, what):
    """A value init writes into the config: on one line and kept as given when read back
    (a newline would end it and make the file unreadable; the INI reader strips white space)."""
    bad = CONTROL_RE.search(value)
    if bad:
        raise UsageError("%s holds a control character (%s), which the config file cannot keep; give the value "
                         "without it" % (what, printable(bad.group())))
    if value != value.strip():
        raise UsageError("%s begins or ends with white space, which the config file does not keep; give the value "
                         "without it (an exec can add it)" % what)


def boot_id():
    """The running kernel's boot id (BOOT_ID_PATH, a new one at every boot), or None where it cannot be
    read (no /proc): a 'started' record carries it, so that a later run tells whether the machine rebooted
    since.  The host's own kernel, even under --root: the target's /proc is not the machine's."""
    try:
        with open(BOOT_ID_PATH, "rb") as f:
            text = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if re.match(r"^[0-9a-f-]{36}$", text) else None


class History(object):
    """Append-only record of what this host did: started before, done or failed after.

    It grows with every transaction for the life of the host, so a run that only needs
    the applied position and the attempts since (recent=True) reads it backwards from the
    end, as far as a done, skipped or baseline event more than BATCH_MOST + 1 entries before
    the last: the starts of a batch's transactions, and of the one a signal or a failure
    stopped, come before its done records (DoneBatch), and those of a batch a crash lost
    before the done records a later run wrote for them.  A baseline event (init --baseline)
    says the image held everything up to its entry before isconf applied anything here."""

    # The events that move the applied position; 'authored': applied on the reference host as it was authored.
    POSITION = ("done", "authored", "skipped", "retracted", "baseline")

    def __init__(self, state, recent=False):
        self.state, self.path = state, state.file("history")
        self.fd = None  # opened at the first record, then kept for the run (under the host lock)
        self.events = state.read_records("history", "history", self.far_enough() if recent else None)
        # Where each entry's events are, and after each start the next one: kept up to date with events
        # (index), so that what a transaction asks of the history costs what is about it, not its length.
        self._of_entry, self._next_start, self._last_start, self._indexed = {}, {}, None, 0
        for event in self.events:
            if not (isinstance(event.get("event"), str) and isinstance(event.get("seq"), int)
                    and isinstance(event.get("id"), str)):
                raise StateError("history %s holds an event without event, seq and id; it was edited" % self.path)

    def far_enough(self):
        """The test a backwards read stops at (see above): a start of an entry not applied was written
        after the position its run had on disk, at most BATCH_MOST + 1 entries before that entry.  Positions
        only grow; one past the last is out of that order (another branch's history): the read stops there too."""
        last = []

        def far(event):
            if event.get("event") not in self.POSITION or not isinstance(event.get("seq"), int):
                return False
            last[:] = last or [event["seq"]]
            return not last[0] - BATCH_MOST - 1 <= event["seq"] <= last[0]
        return far

    @staticmethod
    def new_record(event, entry, **extra):
        """One record, as record writes it now or DoneBatch later."""
        if len(extra.get("error", "")) > ERROR_MAX:  # a failed snap of many files names them all
            extra["error"] = extra["error"][:ERROR_MAX] + "..."
        return dict(extra, event=event, seq=entry.seq, id=entry.id, time=format_time(time.time()))

    def record(self, event, entry, **extra):
        self.record_all([self.new_record(event, entry, **extra)])

    def record_all(self, records):
        """Append records (new_record) with one write and one fsync."""
        if self.fd is None:
            self.fd = self.state.open_records("history")
        # A signal that stops the run waits for the record: never torn by a Ctrl-C, and in events once on disk.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            durable_append(self.fd, b"".join(canonical(fields) + b"\n" for fields in records))
            self.events.extend(records)
        except BaseException:
            os.close(self.fd)  # a record torn by a full disk: the next one opens the file again, cutting it
            self.fd = None
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def applied(self):
        """(seq, id) of the last transaction done or skipped, or of the baseline: the applied prefix."""
        for event in reversed(self.events):
            if event["event"] in self.POSITION:
                return event["seq"], event["id"]
        return 0, ZERO_ID

    def baseline(self):
        """(seq, id) of the baseline event, or None: the host was not made from an image built without isconf,
        or its baseline is not yet tied to a verified entry."""
        for event in self.events:
            if event["event"] == "baseline":
                return event["seq"], event["id"]
        return None

    def index(self):
        """(entry (seq, id) -> the positions of its events in events, start position -> the next start's),
        brought up to date with the events recorded since the last call."""
        for n in range(self._indexed, len(self.events)):
            event = self.events[n]
            self._of_entry.setdefault((event["seq"], event["id"]), []).append(n)
            if event["event"] == "started":
                if self._last_start is not None:
                    self._next_start[self._last_start] = n
                self._last_start = n
        self._indexed = len(self.events)
        return self._of_entry, self._next_start

    def interruptions(self, entry, boot=None):
        """The attempts at this entry since it was last done or skipped that ended neither done nor failed.

        An attempt counts toward interrupted_max when its 'started' has no end record (the agent
        vanished: killed by SIGKILL or the OOM killer, or the machine went down under it), or when the
        agent ended it on a signal it caught ('interrupted') and the machine rebooted before the next
        start: init stopping the agent for a shutdown, as an exec that reboots the machine brings about.
        One stopped by a signal with no reboot after it (Ctrl-C, SIGTERM from a human or timeout(1))
        does not count.  Whether a reboot followed an attempt: its start's boot id against the next
        start's, or for the last one against boot (the running kernel's, boot_id()).

        {"attempts": how many count, "rebooted": how many of those a reboot followed, "unknown": how many
        of those cannot tell (a start recorded without a boot id, by an older isconf or without /proc),
        "signals": the names of the signals that stopped the others}.  The 'failed' that halts the entry
        for this (it carries 'interrupted') ends no attempt, so the halt holds at every run.

        An attempt whose next start is of a later entry ended applied: a run starts the next transaction
        only once this one succeeded, its done record waiting for the batch's barrier (DoneBatch), which a
        crash may have lost.  A next start of an earlier entry (a run begun again after a crash, from the
        first transaction not recorded done) leaves it never ended."""
        attempts = []  # [the start's boot id, how it ended: None (it did not), "failed", "applied", a signal's name]
        of_entry, next_start = self.index()
        own = of_entry.get((entry.seq, entry.id), [])
        for n, position in enumerate(own):
            event = self.events[position]
            kind = event["event"]
            if kind == "started":
                attempts.append([event.get("boot_id"), None])
                # The next start, if it comes before this entry's next event, is of another entry.
                after = next_start.get(position)
                if (after is not None and (n + 1 == len(own) or after < own[n + 1])
                        and self.events[after]["seq"] > entry.seq):
                    attempts[-1][1] = "applied"
            elif kind in ("done", "authored", "skipped", "retracted"):
                attempts = []
            elif attempts and attempts[-1][1] is None:
                if kind == "failed" and "interrupted" not in event:
                    attempts[-1][1] = "failed"
                elif kind == "interrupted":
                    attempts[-1][1] = str(event.get("signal") or "a signal")
        return self.tally(attempts, boot)

    @staticmethod
    def tally(attempts, boot):
        """interruptions' answer from the attempts at one entry: [the start's boot id, how it ended]."""
        seen = {"attempts": 0, "rebooted": 0, "unknown": 0, "signals": []}
        for (started, ended), after in zip(attempts, [a[0] for a in attempts[1:]] + [boot]):
            rebooted = started != after if isinstance(started, str) and after else None
            if ended in ("failed", "applied"):
                continue
            if ended is not None and not rebooted:
                seen["signals"].append(ended)
                continue
            seen["attempts"] += 1
            seen["rebooted"] += rebooted is True
            seen["unknown"] += rebooted is None
        return seen

    def last(self, entry):
        """The last event recorded for this entry (by its id: another branch's entry of the
        same seq is another transaction), or None."""
        for event in reversed(self.events):
            if event["id"] == entry.id and event["seq"] == entry.seq:
                return event
        return None


class TransactionLogs(object):
    """STATE/logs: one log per transaction (by seq, to sort, and id: two branches' seq N never share
    one), 0600 (commands print secrets too), kept bounded however often the transaction runs."""

    def __init__(self, directory, state_format):
        self.directory, self.state_format = directory, state_format

    @staticmethod
    def name(seq, entry_id):
        return "%06d-%s.log" % (seq, entry_id[:16])

    def path(self, entry):
        return self.directory.file(self.name(entry.seq, entry.id))

    def open(self, entry, attempt=False):
        """A descriptor appending to the transaction's log.

        The log keeps the last LOG_ATTEMPTS attempts, each under ATTEMPT_MAX bytes (run_command
        bounds what a command adds), so it stays under LOG_MAX however often the transaction
        fails: before a new attempt starts, a log that already holds LOG_ATTEMPTS of them (or
        more bytes than the others may keep: older versions did not bound logs) is cut to the
        last ones."""
        logs, name, keep = self.directory, self.name(entry.seq, entry.id), (LOG_ATTEMPTS - 1) * ATTEMPT_MAX
        st = logs.stat(name) if attempt else None
        if st is not None and st.st_size:
            with os.fdopen(logs.open(name), "rb") as f:
                f.seek(max(0, st.st_size - keep))
                old = f.read(keep)
            starts = [m.start() for m in LOG_ATTEMPT_RE.finditer(old)]
            if not starts or starts[0]:
                starts.insert(0, 0)  # output before the first header: an attempt of its own, or its end
            if len(starts) >= LOG_ATTEMPTS or st.st_size > keep:
                logs.write(name, old[starts[max(0, len(starts) - LOG_ATTEMPTS + 1)]:], 0o600)
        return logs.open(name, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)

    def note(self, entry, text):
        """One line of isconf's own at the end of the transaction's log."""
        with os.fdopen(self.open(entry), "ab") as log:
            log.write(log_line(text))

    def tail(self, entry, size):
        """(where the transaction's log is, its last size bytes): before a run upgraded the
        state, the log 0.1.0 named by seq alone; (where it will be, b"") if it has none."""
        names = [self.name(entry.seq, entry.id)]
        if self.state_format < 2:  # not yet upgraded by a run: logs are named by seq alone
            names.append("%06d.log" % entry.seq)
        for name in names:
            try:
                with os.fdopen(self.directory.open(name), "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                    return self.directory.file(name), f.read()
            except FileNotFoundError:
                pass
        return self.path(entry), b""


class Host(object):
    """The state of one host (or one mounted target disk) under --root.

    Its own files are reached through two StateDirs, opened once: the state directory
    (var/lib/isconf) and the config directory (etc/isconf, or --config's)."""

    def __init__(self, root="/", config_path=None):
        if not root:  # 'isconf --root "$TARGET" up' with TARGET unset: never the current directory
            raise UsageError("--root (or ISCONF_ROOT) is empty: give the host's root directory, / for this machine")
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise StateError("root %s is not a directory; mount the target disk there, or create it" % self.root)
        self.rootpath = RootPath(self.root)
        self.explicit_config = config_path and os.path.abspath(config_path)
        # Resolved inside the root, for messages: a target whose /var or /etc is a link keeps its state there.
        self.config_path = self.explicit_config or self.rootpath.resolve(CONFIG_PATH)
        self.state_path = self.rootpath.resolve(STATE_PATH)
        self.signers_path = self.rootpath.resolve(SIGNERS_PATH)
        self._config = self._state = self._etc = self._config_dir = self._logs = self._links_to_state = None
        self._staged = self._format = None

    def path(self, *parts):
        """Where a state file is, for messages; files are opened through self.state."""
        return os.path.join(self.state_path, *parts)

    @property
    def state(self):
        """The state directory, opened once; refused if a newer isconf wrote it."""
        if self._state is None:
            self.open_state(create=False)
        return self._state

    def open_state(self, create):
        state = StateDir.inside(self.rootpath, STATE_PATH, create)
        try:
            self.check_state_dir(state)
        except BaseException:
            state.close()
            raise
        self._state = state
        self.check_state_format()

    def check_state_dir(self, state):
        """Take a state directory only if it is one: not the root, not a directory that holds
        etc/isconf, and empty or already holding isconf's files.  (Attack or accident: a
        var/lib/isconf link to / or /etc planted in the image would have isconf make the
        target's root 0700 and spread its files there.)"""
        root, found = os.stat(self.root), os.fstat(state.fd)
        config_dir = self.rootpath.resolve(posixpath.dirname(CONFIG_PATH))
        if (found.st_dev, found.st_ino) == (root.st_dev, root.st_ino):
            why = "is the root itself"
        elif config_dir == state.path or config_dir.startswith(state.path.rstrip("/") + "/"):
            why = "holds %s" % config_dir
        elif os.listdir(state.fd) and not any(_lexists(name, state.fd) for name in STATE_NAMES):
            why = "is not empty and holds no isconf state"
        else:
            return
        link = os.path.join(self.root, STATE_PATH[1:])
        raise StateError("%s leads to %s, which %s; isconf does not take that over as its state directory: make %s "
                         "a directory of its own (or a link to an empty one) and run again"
                         % (link, state.path, why, link))

    def etc(self, create=False):
        """ROOT/etc/isconf: the config (unless --config names another) and the trusted keys."""
        if self._etc is None:
            self._etc = StateDir.inside(self.rootpath, posixpath.dirname(CONFIG_PATH), create)
        return self._etc

    def config_dir(self, create=False):
        """(directory, name) of the config file."""
        if self.explicit_config:
            if self._config_dir is None:
                if create:
                    makedirs(os.path.dirname(self.explicit_config))
                self._config_dir = StateDir.at(os.path.dirname(self.explicit_config), private=True)
            return self._config_dir, os.path.basename(self.explicit_config)
        return self.etc(create), posixpath.basename(CONFIG_PATH)

    def has_config(self):
        try:
            directory, name = self.config_dir()
        except StateError:
            if os.path.isdir(os.path.dirname(self.config_path)):
                raise  # there, but not private (check_private): not to be taken for a host without one
            return False
        return directory.stat(name) is not None

    @property
    def config(self):
        if self._config is None:
            try:
                directory, name = self.config_dir()
                data = directory.read(name, CONFIG_MAX)
            except FileNotFoundError:
                raise StateError("no config at %s; run 'isconf init URL --branch NAME' first" % self.config_path)
            except OSError as e:
                raise StateError("cannot read config %s: %s%s" % (self.config_path, e.strerror, denied_advice(e)))
            self._config = Config(self.config_path, data)
        return self._config

    def reread_config(self):
        """The config as it is on disk now, not as first read."""
        self._config = None
        return self.config

    def write_config(self, data):
        """The config holds [env], where admins put site secrets: 0600 when new, and a rewrite
        keeps the mode and owner the admin gave it."""
        directory, name = self.config_dir(create=True)
        directory.write(name, data, 0o600, keep_owner=True)

    def read_signers(self):
        """The bytes of ROOT/etc/isconf/allowed_signers, confined like the state."""
        return self.etc().read(posixpath.basename(SIGNERS_PATH), SIGNERS_MAX)

    def check_agent_file(self):
        """The agent file the units run (INSTALL_PATH), when there is one, and every directory on the way
        to it must pass check_private: whoever can change it runs code as root at the next boot.  Where
        it is a link (to an agent kept elsewhere), the way to the link and the file it leads to.  With
        no agent installed, nothing is checked (a group-writable /usr/local/sbin, Debian's old 2775
        root:staff, holds nothing the agent runs)."""
        resolved = self.rootpath.resolve(INSTALL_PATH)
        if not os.path.lexists(resolved):
            return
        real = "/" + os.path.relpath(resolved, self.root)
        for path in [INSTALL_PATH] + ([real] if real != INSTALL_PATH else []):
            try:
                dfd = self.rootpath.open_dir(posixpath.dirname(path), private=True)
            except (FileNotFoundError, NotADirectoryError):
                return  # nothing installed
            try:
                if path == real:
                    os.close(open_regular(os.path.join(self.root, path[1:]), os.O_RDONLY, 0, dfd))
            except FileNotFoundError:
                pass
            finally:
                os.close(dfd)

    def writes_state(self, path):
        """Whether a journaled path, installed as a snap installs it (the links of the directories on the
        way followed inside the root, the last name not), is the state directory or in it; or replaces a
        link on the way to it (a target whose /var is a link: a snap of /var would move the state away)."""
        if in_state(path):
            return True
        if path == "/":
            return False
        state = self.state_path.rstrip("/")
        try:
            where = self.place(path)
            if where == state or where.startswith(state + "/") or where in self.links_to_state():
                return True
            return self.mounts_state(path)
        except OSError:  # a loop, or a file where a directory belongs: installing it fails on its own
            return False

    def mounts_state(self, path):
        """Whether path, or a directory on the way to it, is the state directory under another name: a bind
        mount of it, or of a directory above it (attack: a snap of /mnt/state/history where /mnt/state is
        the state directory bind-mounted; no comparison of names sees it, its device and inode do)."""
        try:
            st = os.fstat(self._state.fd) if self._state is not None else os.stat(self.state_path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) in self.rootpath.way(posixpath.dirname(path)):
            return True
        try:
            found = self.rootpath.lstat(path)
        except FileNotFoundError:
            return False
        return (found.st_dev, found.st_ino) == (st.st_dev, st.st_ino)

    def place(self, path):
        """Where a path inside the root is, as seen from outside it: the links of the directories on the
        way followed inside the root, the last name not (what a snap of path replaces)."""
        head, name = posixpath.split(path)
        return os.path.join(self.rootpath.resolve(head), name) if name else self.root

    def links_to_state(self):
        """The places (see place) of the links the way to the state directory goes through, the links
        in their targets included: a snap that replaces one of them moves the state away."""
        if self._links_to_state is None:
            self._links_to_state, todo = set(), [STATE_PATH]
            while todo and len(self._links_to_state) < SYMLINK_HOPS:
                parts = todo.pop().strip("/").split("/")
                for n in range(1, len(parts) + 1):
                    path = "/" + "/".join(parts[:n])
                    try:
                        where = self.place(path)
                        if where in self._links_to_state or not os.path.islink(where):
                            continue
                        inside = "/" + os.path.relpath(os.path.dirname(where), self.root)
                        todo.append(posixpath.join(inside, os.readlink(where)))
                    except OSError:
                        continue
                    self._links_to_state.add(where)
        return self._links_to_state

    def make_state(self, dirs=True):
        """Make the state directory and what lives in it (0700: logs hold what commands print).  Without
        dirs ('up', which holds the lock file open), objects/ and logs/ are only looked at, as subdir would
        check them, not opened: make_dirs makes and opens them once a run stages or applies something."""
        if self._state is None:
            self.open_state(create=True)
        if stat.S_IMODE(os.fstat(self.state.fd).st_mode) != 0o700:
            os.fchmod(self.state.fd, 0o700)
        if not dirs:
            for sub in STATE_DIRS:
                self.state.check_subdir(sub)
            return
        self.make_dirs()
        os.close(self.state.open("lock", os.O_WRONLY | os.O_CREAT, 0o600))

    def make_dirs(self):
        """objects/ and logs/, made if missing, opened and checked (subdir)."""
        for sub in STATE_DIRS:
            self.state.subdir(sub, create=True)

    def state_format(self):
        """The format of the state directory: 1 (isconf 0.1.0) when it has no state-format file.  Read
        once (upgrade_state says the new one): an upgrade run twice finds nothing left to do."""
        if self._format is None:
            self._format = self.read_state_format()
        return self._format

    def write_state_format(self):
        self.state.write("state-format", b"%d\n" % STATE_FORMAT)
        self._format = STATE_FORMAT

    def read_state_format(self):
        try:
            text = self.state.read("state-format", 64).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return 1
        if not re.match(r"^[0-9]{1,9}$", text):
            raise StateError("%s holds %r, not a number; it was edited: write %d in it"
                             % (self.state.file("state-format"), text[:20], STATE_FORMAT))
        return int(text)

    def check_state_format(self):
        found = self.state_format()
        if found > STATE_FORMAT:
            raise StateError("the state in %s is format %d, written by a newer isconf; this is isconf %s (state "
                             "format %d): install the newer isconf.py again" % (self.state_path, found, __version__,
                                                                                STATE_FORMAT))

    def lock(self, wait=None):
        """The host lock, or the one a re-executing agent handed over; with wait, wait up to that
        many seconds for a run that holds it."""
        return self.state.lock("lock", "this host", holder=True, wait=wait, inherit=True,
                               on_wait=lambda holder: warn("waiting for this host's lock, held by %s"
                                                           % holder))

    def history(self, recent=False):
        return History(self.state, recent)

    def local_head(self):
        """The last head this host verified, or None before the first fetch."""
        try:
            data = self.state.read("head", HEAD_MAX)
        except FileNotFoundError:
            return None
        try:
            return Head.parse(data, "local head %s" % self.path("head"))
        except Refused as e:
            raise StateError(str(e))

    def local_journal(self, head, parse_after=0):
        """The verified local journal copy, checked again against the local head: its entries
        from seq parse_after on (from seq 1 without it).

        The copy was verified whole when it was committed.  Of what is applied (up to
        parse_after) only the last entry is read again: the file is read backwards from the
        head's length as far as that entry, which must say its seq, and the chain from it to
        the head's id is checked again.  So an up-to-date run costs what is pending, not the
        journal's length: a host that applied a million entries reads one.  'status' and
        'log' read them all.
        """
        if head is None:
            return []
        fix = ("; remove %s and %s and run 'isconf up' to fetch the journal again"
               % (self.path("journal"), self.path("head")))
        known = min(parse_after, head.seq)
        lines = self.journal_lines(head.length, head.seq - known + 1 if known else None)
        if lines is None or len(lines) != (head.seq - known + 1 if known else head.seq):
            raise StateError("local journal %s does not match its head%s" % (self.path("journal"), fix))
        try:
            return verify_copy(lines, known, head)
        except Refused as e:
            raise StateError(str(e) + fix)

    def journal_lines(self, length, count=None):
        """The lines of the local journal copy's first length bytes; with count, only the last
        count of them, read backwards from length in growing chunks.  None if the copy is
        shorter than length or does not end a line there."""
        if not length:
            return []
        try:
            fd = self.state.open("journal")
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size < length:
                return None
            if count is None:
                with os.fdopen(os.dup(fd), "rb") as f:
                    data, pos = f.read(length), 0
            else:
                data, pos = b"", length
                while pos and data.count(b"\n") <= count:  # count lines and the newline before them
                    n = min(pos, max(CHUNK, len(data)))
                    pos -= n
                    data = os.pread(fd, n, pos) + data
        finally:
            os.close(fd)
        if len(data) != length - pos or not data.endswith(b"\n"):
            return None
        lines = data.split(b"\n")[:-1]
        return lines if count is None else lines[-count:]

    def journal_bytes(self, length):
        """The first length bytes of the local journal copy (fewer if it is shorter)."""
        try:
            with os.fdopen(self.state.open("journal"), "rb") as f:
                return f.read(length)
        except FileNotFoundError:
            return b""

    def commit(self, head, signature, keep, tail):
        """Make a newly verified head and journal this host's local copy: the first keep
        bytes of the old copy, then tail (keep is 0 when moving to another branch).

        The journal grows first and the head second: a crash in between leaves a
        journal longer than the old head, and readers only ever read head.length bytes.
        """
        self.state.append_at("journal", keep, tail)
        if signature is not None:
            self.state.write("head.sig", signature)
        self.state.write("head", head.data)

    @property
    def objects(self):
        return self.state.subdir("objects")

    @property
    def staged(self):
        """The staging area as this command uses it (StagedObjects): one for the Host's life, one command."""
        if self._staged is None:
            self._staged = StagedObjects(self.objects)
        return self._staged

    @property
    def logs(self):
        """The transactions' logs (TransactionLogs), opened once."""
        if self._logs is None:
            self._logs = TransactionLogs(self.state.subdir("logs"), self.state_format())
        return self._logs

    def declared_baseline(self):
        """The seq 'init --baseline' declared, or None.  It is kept for good (init --force leaves it);
        the first verified fetch ties it to an entry with a baseline event in the history."""
        try:
            text = self.state.read("baseline", 64).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return None
        if not re.match(r"^[1-9][0-9]{0,17}$", text):
            raise StateError("%s holds %r, not a seq; it was edited: write the seq the image was built to in it"
                             % (self.state.file("baseline"), text[:20]))
        return int(text)

    def disabled(self):
        """The record 'isconf disable' wrote ({who, why, time}), or None while the host is enabled."""
        try:
            data = self.state.read("disabled", RECORD_MAX)
        except FileNotFoundError:
            return None
        try:
            record = parse_json(data)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:  # a damaged record still pauses the host: whoever wrote it meant that
            record = {}
        paused = {key: str(record.get(key, "?")) for key in ("who", "why", "time")}
        # 'disable --force' over another's: theirs, kept whole, oldest first
        earlier = record.get("earlier") if isinstance(record.get("earlier"), list) else []
        paused["earlier"] = [{key: str(item.get(key, "?")) for key in ("who", "why", "time")}
                             for item in earlier if isinstance(item, dict)]
        return paused

    def last_success(self):
        try:
            return parse_time(self.state.read("last-success", 64).decode().strip())
        except (FileNotFoundError, Refused, UnicodeDecodeError):
            return None

    def record_success(self, durable=True):
        """The time of this success.  An up-to-date run's is written without an fsync (durable false): a power
        cut may lose it, leaving the time of an earlier success (or, on a file system that commits a rename
        before the data it names, an empty file, read as none), which the next run writes again; what the
        host applied is in its history, durable on its own."""
        self.state.write("last-success", (format_time(time.time()) + "\n").encode(), durable=durable)

    def objects_since_success(self):
        """Whether objects/ changed after the last success was recorded.  A run that applies drops what no
        pending transaction needs before it records its success, so objects/ is newer only after a run that
        stopped past its last transaction (killed, a power cut) or one whose failed transaction was then
        skipped: what they staged is dropped by the next run, an up-to-date one too.  By the mtimes of two
        lstats, nothing opened (a clock set back may hide it until a run applies something)."""
        try:
            objects = os.stat("objects", dir_fd=self.state.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        success = self.state.stat("last-success")
        return success is None or objects.st_mtime_ns > success.st_mtime_ns

    def record_verify(self, drift_paths, paths, quick):
        """What the last 'verify' found, for status and the metrics: replaced atomically, as last-run."""
        record = {"time": format_time(time.time()), "drift_paths": drift_paths, "paths": paths, "quick": quick}
        self.state.write("last-verify", json.dumps(record, sort_keys=True).encode("utf-8") + b"\n", 0o644)

    def last_verify(self):
        """The record_verify record, or None before the first verify; a damaged one is None too."""
        try:
            record = parse_json(self.state.read("last-verify", RECORD_MAX))
        except (FileNotFoundError, ValueError):
            return None
        if not (isinstance(record, dict) and TIME_RE.match(str(record.get("time")))
                and all(isinstance(record.get(key), int) for key in ("drift_paths", "paths"))):
            return None
        return record


def upgrade_state(host):
    """From format 1 (0.1.0): logs were named by seq alone, and 0644; name each by the entry
    whose events are the last for that seq, as that run wrote it, and make it 0600; and the
    config, 0644 as 0.1.0 wrote it, 0600 (another mode is the admin's choice: kept)."""
    logs = host.state.subdir("logs", create=True)
    last = {}
    for event in host.history().events:
        last[event["seq"]] = event["id"]
    for seq, entry_id in sorted(last.items()):
        old, new = "%06d.log" % seq, TransactionLogs.name(seq, entry_id)
        if logs.stat(old) is not None and logs.stat(new) is None:
            fd = logs.open(old)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            logs.rename(old, new, temporary=False)
    logs.fsync()
    if host.has_config():  # 0.1.0 wrote it 0644, offering no choice, and [env] holds site secrets
        directory, name = host.config_dir()
        fd = directory.open(name)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) == 0o644:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    host.write_state_format()


def ensure_state(host, dirs=True):
    """make_state, and bring a state written by an older isconf up to this format (under the host lock)."""
    host.make_state(dirs)
    if host.state_format() < STATE_FORMAT:
        upgrade_state(host)


def declare_baseline(host, seq):
    """Keep the seq an image was built to; the first verified fetch ties it to its entry.  Only a host that
    has applied nothing can take one: a position isconf recorded is never overwritten by a claim."""
    history = host.history()
    tied, applied_seq = history.baseline(), history.applied()[0]
    if tied is not None and tied[0] != seq:
        raise UsageError("this host's baseline is seq %d, tied to its entry at the first fetch; it cannot be "
                         "changed" % tied[0])
    if tied is None and applied_seq:
        raise UsageError("this host has applied through seq %d already; a baseline is for an image built without "
                         "isconf, declared before its first 'up'" % applied_seq)
    host.state.write("baseline", b"%d\n" % seq)


def load_signers(path, read=None, missing="run 'isconf init --force --signers FILE' (or --insecure)"):
    """The keys a host trusts; a missing, damaged or empty file is a local problem, missing the advice
    for a file that is not there.  read, if given, returns the file's bytes (the host's own file, read confined)."""
    try:
        text = (read() if read else read_file(path, SIGNERS_MAX)).decode("utf-8")
        signers = parse_allowed_signers(text, path)
    except FileNotFoundError:
        raise StateError("no trusted keys at %s; %s" % (path, missing))
    except (OSError, UnicodeDecodeError) as e:
        raise StateError("cannot read trusted keys %s: %s" % (path, e))
    except Refused as e:
        raise StateError(str(e))
    if not signers:
        raise StateError("%s lists no keys; add the authors' public keys in allowed_signers format" % path)
    return signers


# ---------------------------------------------------------------------------
# Applying transactions: commands in a chroot; the disk held to the journal.
# ---------------------------------------------------------------------------


def exec_environment(branch, seq, entry_id, variables):
    """The whole environment an exec gets: documented, nothing inherited."""
    env = {"PATH": EXEC_PATH, "HOME": "/root", "LC_ALL": "C"}
    env.update(variables)  # a host may set its own PATH or locale
    env.update(ISCONF_BRANCH=branch, ISCONF_SEQ=str(seq), ISCONF_ID=entry_id)
    return env


# Linux mount(2) and unshare(2) flags: the pseudo-filesystems of a --root's execs, the systemctl of execs at boot.
CLONE_NEWNS, MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x20000, 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_SLAVE = 4096, 16384, 1 << 19
PSEUDO_FILESYSTEMS = [  # (where inside the root, source, type, flags, data); /dev brings /dev/pts along
    ("/proc", b"proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("/sys", b"/sys", None, MS_BIND | MS_REC, None),
    ("/dev", b"/dev", None, MS_BIND | MS_REC, None),
    ("/run", b"tmpfs", b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"),
]


def mount_table():
    """(where, file system type) of each mount now, from /proc/self/mountinfo (octal escapes undone); None
    where it cannot be read."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    table = []
    for line in lines:  # 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw
        fields, _, tail = line.partition(b" - ")
        if len(fields.split()) > 4:
            table.append((re.sub(br"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields.split()[4]),
                          (tail.split() or [b""])[0]))
    return table


def mount_points():
    """Where something is mounted now (mount_table)."""
    return set(where for where, _ in mount_table() or ())


# File systems with no disk under them: nothing to sync there (an autofs one would mount something if opened).
UNBACKED_FILESYSTEMS = frozenset([
    b"proc", b"sysfs", b"devtmpfs", b"devpts", b"tmpfs", b"ramfs", b"cgroup", b"cgroup2", b"securityfs",
    b"debugfs", b"tracefs", b"mqueue", b"hugetlbfs", b"bpf", b"pstore", b"configfs", b"fusectl", b"autofs",
    b"binfmt_misc", b"nsfs", b"rpc_pipefs", b"selinuxfs", b"efivarfs"])


def sync_filesystems(root):
    """Make what commands wrote under root durable, wherever in it: syncfs(2) of root's file system and of
    each one mounted inside it (a separate /var or /boot; with --root /, every one with a disk), once each.
    Not sync(2), which waits for every file system of the machine, other jobs' writes included; sync(2)
    only where libc has no syncfs, /proc/self/mountinfo cannot be read, or a mount inside cannot be
    opened.  StateError if a file system reports a write error (syncfs returns it since Linux 5.8)."""
    table = mount_table()
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        syncfs = None
    if syncfs is None or table is None:
        os.sync()
        return
    inside = os.fsencode(os.path.abspath(root)).rstrip(b"/") + b"/"
    places = [os.fsencode(os.path.abspath(root))] + [where for where, kind in table
                                                     if where.startswith(inside) and kind not in UNBACKED_FILESYSTEMS]
    synced = set()
    for place in places:
        try:
            fd = os.open(place, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # unmounted since: the unmount synced it
        except OSError:
            os.sync()
            return
        try:
            device = os.fstat(fd).st_dev
            if device in synced:
                continue
            if syncfs(fd) != 0:
                error = ctypes.get_errno()
                raise StateError("cannot sync the file system of %s: %s; the transactions applied since the last "
                                 "done record are not recorded done and run again: check the disk"
                                 % (os.fsdecode(place), os.strerror(error)))
            synced.add(device)
        finally:
            os.close(fd)


def pseudo_mounts(root):
    """The pseudo-filesystems an exec inside root needs and does not have yet: (source,
    target, type, flags, data), each target resolved inside the root (a link planted at
    ROOT/proc must not aim a mount at the miniroot) and an existing directory there.
    What the admin mounted already is used as it is."""
    rootpath, wanted = RootPath(root), []
    for where, source, fstype, flags, data in PSEUDO_FILESYSTEMS:
        target = rootpath.resolve(where)
        try:
            if not stat.S_ISDIR(os.lstat(target).st_mode):
                continue
        except OSError:
            continue  # a root without /proc gets none: isconf does not change the target's layout
        wanted.append((source, os.fsencode(target), fstype, flags, data))
    mounted = mount_points() if wanted else ()  # asked before each command: read only when it matters
    return [mount for mount in wanted if mount[1] not in mounted]


def libc_call(name, *arguments):
    """A libc system call wrapper (mount, unshare) called in this process, no program started; OSError if it fails."""
    if getattr(ctypes.CDLL(None, use_errno=True), name)(*arguments) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def enter_private_mounts(mounts, covers=()):
    """In the process that starts the commands (Launcher), before any starts: a mount namespace
    of its own, the pseudo-filesystems mounted in it, then covers, steps (what, function,
    arguments) run in it (see systemctl_covers).  It is the agent's slave: what the host mounts
    meanwhile (systemd at boot) reaches the commands, and nothing mounted in it reaches the host.
    Its mounts vanish with the last process in it, even if the agent is killed; nothing is
    mounted in the miniroot's namespace, and no program is started for it.  TransactionFailed
    says which step failed."""
    steps = [("make a mount namespace", libc_call, ("unshare", CLONE_NEWNS)),
             ("keep its mounts from the host", libc_call, ("mount", b"none", b"/", None, MS_REC | MS_SLAVE, None))]
    steps += [("mount %s on %s" % (m[0].decode(), m[1].decode("utf-8", "replace")), libc_call, ("mount",) + m)
              for m in mounts]
    for what, function, arguments in steps + list(covers):
        try:
            function(*arguments)
        except OSError as e:
            raise TransactionFailed("cannot %s: %s; run with --no-mounts to go without" % (what, e.strerror))


class CommandOutput(object):
    """What a command writes straight into its log (see run_command), echoed and kept bounded.

    The command appends to the log itself, so the agent cannot refuse its bytes; it follows
    them instead, every tenth of a second while the command runs and once more at its end:
    it echoes them, and once the attempt's output passes its share of ATTEMPT_MAX, cuts the
    file back to the output's first half, keeping the last bytes in memory.  finish() then
    writes a line saying what was cut, and those last bytes: the start and the end of a long
    output, where errors are.  The log grows past its bound by at most what the command
    writes between two looks; bytes it writes between a look and the cut are left out of
    both the log and the echo (counted as cut)."""

    def __init__(self, log, echo=True, limit=ATTEMPT_MAX - LOG_NOTES):
        self.log, self.echo = log, echo
        self.start = self.done = os.fstat(log).st_size  # where the output begins; how far it has been read
        self.head, self.tail_max = limit // 2, limit - limit // 2
        self.cut_at = None                              # where the log is cut back to, once it passed its bound
        self.tail, self.tail_size, self.cut = collections.deque(), 0, 0  # the last bytes; bytes left out
        self.finished = False
        self.dropped = REPORTER.dropped_total   # the echo's bytes our own stdout could not take, so far

    def follow(self):
        """Echo what the command added since the last look; cut the log back if it passed its bound."""
        for chunk in iter(lambda: os.pread(self.log, CHUNK, self.done), b""):
            self.done += len(chunk)
            if self.echo:
                REPORTER.output(chunk)
            if self.cut_at is not None:
                self.keep(chunk)
        if self.cut_at is None and self.done - self.start > self.head + self.tail_max:
            self.cut_at = self.start + self.head
            first = max(self.cut_at, self.done - self.tail_max)  # already echoed: only its end is kept now
            self.cut += first - self.cut_at
            for offset in range(first, self.done, CHUNK):
                self.keep(os.pread(self.log, min(CHUNK, self.done - offset), offset))
        if self.cut_at is not None and self.done > self.cut_at:
            # The command appends (O_APPEND): what it writes next lands at the cut.
            self.cut += os.fstat(self.log).st_size - self.done  # written since the read above: lost
            os.ftruncate(self.log, self.cut_at)
            self.done = self.cut_at

    def keep(self, chunk):
        """Keep the last tail_max bytes of the output past the cut, and count what drops out."""
        self.tail.append(chunk)
        self.tail_size += len(chunk)
        while self.tail_size - len(self.tail[0]) >= self.tail_max:
            dropped = len(self.tail.popleft())
            self.tail_size -= dropped
            self.cut += dropped

    def finish(self):
        """After the command ended: its last output, after a line saying what was cut before it."""
        if self.finished:
            return
        self.finished = True
        self.follow()
        if self.cut_at is not None:
            tail = b"".join(self.tail)
            self.cut += max(0, len(tail) - self.tail_max)
            write_all(self.log, ("\n[isconf] log cut: %d bytes of output left out here (a log keeps %d bytes "
                                 "per attempt)\n" % (self.cut, ATTEMPT_MAX)).encode() + tail[-self.tail_max:])
        dropped = REPORTER.dropped_total - self.dropped
        if dropped:
            write_all(self.log, b"\n" + log_line("[isconf] output to stdout blocked: %d bytes of the echo dropped "
                                                  "(they are in this log, but for what was cut)" % dropped))


def open_pidfd(pid):
    """A descriptor that turns readable when process pid exits, or None where the kernel or
    Python has none (before Linux 5.3, Python 3.9): then waiting polls, as Popen.wait(timeout)
    does, and ends a short command's transaction up to a few milliseconds late."""
    if PIDFD_OPEN is None:
        return None
    try:
        return PIDFD_OPEN(pid)
    except OSError:  # ENOSYS on an older kernel, or out of descriptors: poll instead
        return None


def wait_for_exit(proc, seconds, outputs=()):
    """proc's exit status as soon as it exits, or None after seconds, or sooner when one of
    the descriptors outputs can be written (our stdout taking what was deferred for it).
    proc.exit_fd turns readable when it exits (a pidfd, the Launcher's socket), or is None."""
    if proc.exit_fd is None:
        try:
            return proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return None
    poller = select.poll()
    poller.register(proc.exit_fd, select.POLLIN)
    for fd in outputs:
        poller.register(fd, select.POLLOUT)
    poller.poll(seconds * 1000)
    return proc.poll()


def kill_group(proc, sig):
    """Signal a command's whole process group (it leads one: start_new_session)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def send_frame(sock, message, fds=()):
    """One message of the Launcher's protocol: its JSON, length first, fds passed along (SCM_RIGHTS)."""
    data = json.dumps(message).encode()
    data = struct.pack("!I", len(data)) + data
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))] if fds else []
    sent = sock.sendmsg([data], ancillary)
    sock.sendall(data[sent:])


def receive_frame(sock):
    """The next message (send_frame) and the descriptors that came with it, or (None, []) at the end."""
    data, fds = b"", []
    while len(data) < 4:
        chunk, ancillary, _, _ = sock.recvmsg(4 - len(data), socket.CMSG_SPACE(struct.calcsize("i")),
                                              getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds += struct.unpack("%di" % (len(payload) // 4), payload[:len(payload) // 4 * 4])
                for fd in fds:
                    os.set_inheritable(fd, False)  # no command gets it but as its stdout and stderr
        if not chunk:
            return None, fds
        data += chunk
    size = struct.unpack("!I", data)[0]
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return None, fds
        body += chunk
    return json.loads(body.decode()), fds


def exit_code(status):
    """A waitpid status as Popen gives it: the exit status, or minus the signal that ended it."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# Signals the process that starts commands ignores (and Python ignores from the start): each command gets them back.
SPAWN_DEFAULT_SIGNALS = STOP_SIGNALS + (signal.SIGPIPE, signal.SIGXFSZ)


def spawn(argv, env, null, log):
    """Start argv as its own session's leader, stdin null, stdout and stderr log, with posix_spawn,
    looking it up in env's PATH as Popen does; its pid, or the OSError of the first candidate that
    exists."""
    actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)]
    names = [argv[0]] if "/" in argv[0] else [os.path.join(d, argv[0]) for d in os.get_exec_path(env)]
    failure = None
    for name in names:
        try:
            try:
                return os.posix_spawn(name, argv, env, file_actions=actions, setsid=True, setsigmask=(),
                                      setsigdef=SPAWN_DEFAULT_SIGNALS)
            except NotImplementedError:  # a C library without POSIX_SPAWN_SETSID (glibc before 2.26)
                return os.posix_spawn(name, argv, env, file_actions=actions, setpgroup=0, setsigmask=(),
                                      setsigdef=SPAWN_DEFAULT_SIGNALS)  # a group of its own, to kill whole
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR) and failure is None:
                failure = e
            last = e
    raise failure or last


class Spawned(object):
    """A command the Launcher's process started: what run_command needs of a Popen (pid, poll,
    wait), its exit status told by that process on the Launcher's socket (exit_fd)."""

    def __init__(self, launcher, pid):
        self.launcher, self.pid, self.returncode = launcher, pid, None
        self.exit_fd = launcher.sock.fileno()

    def ended(self, timeout):
        """Whether the status frame is waiting, within timeout seconds (None: for ever)."""
        poller = select.poll()
        poller.register(self.exit_fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def poll(self):
        # Ctrl-C between the frame's header and its body, or between its read and returncode, would
        # leave the socket out of step, and the wait for a status already read would never end.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self.returncode is None and self.ended(0):
                try:
                    self.returncode = self.launcher.receive()["status"]
                except TransactionFailed:  # the process that waits for it is gone: so is the command's group
                    kill_group(self, signal.SIGKILL)
                    self.returncode = -signal.SIGKILL
                    raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None and not self.ended(timeout):
            raise subprocess.TimeoutExpired(self.pid, timeout)
        return self.poll()


class Launcher(object):
    """What starts a run's commands.  A command inside a --root needs a chroot, a mount namespace
    with the pseudo-filesystems (enter_private_mounts) and its umask: set up in a child for each
    command, that is a copy of this whole process running Python code before the exec, several
    times the cost of the command itself.  So one process is made for the run, forked once, set up
    once (umask, namespace, chroot), and it starts each command with posix_spawn (vfork and exec:
    no copy of the agent, no Python in the child); the run's commands share its mount namespace,
    where a command's own mounts stay for the later ones until the run ends, as on a host.  It is
    made again when what it set up would differ (a transaction made ROOT/proc, a systemctl was
    replaced).  Without os.posix_spawn (Python 3.6, 3.7) each command gets the set-up child.
    With --root / and nothing to set up, Popen starts the command itself (vfork)."""

    def __init__(self):
        self.pid = self.sock = self.setup = None

    def start(self, root, argv, cwd, env, log, setup):
        """Start argv in root (setup: (chroot, pseudo mounts, covers, umask), made by run_command);
        a Popen-like (pid, poll, wait, exit_fd).  OSError or TransactionFailed if it cannot start."""
        chroot, pseudo, covers, umask = setup
        if not (chroot or pseudo or covers or umask != AGENT_UMASK):
            # The command inherits the agent's own umask (AGENT_UMASK, set in main); no Python runs in the child.
            return self.popen(argv, cwd, env, log)
        if not hasattr(os, "posix_spawn"):
            def enter_root():
                os.umask(umask)
                try:
                    if pseudo or covers:
                        enter_private_mounts(pseudo, covers)
                except TransactionFailed as e:
                    os.write(2, ("isconf: %s\n" % e).encode("utf-8", "replace"))
                    os._exit(126)
                if chroot:
                    os.chroot(root)
                os.chdir(cwd)
            return self.popen(argv, None, env, log, enter_root)
        setup = (setup, self.bound(covers))
        if setup != self.setup or self.pid is None:
            self.close()
            self.fork(root, setup)
        try:
            # STOP_SIGNALS are held by the caller (follow_command): a frame is never left half read
            send_frame(self.sock, {"command": argv, "directory": cwd, "environment": env}, [log])
            message = self.receive()
        except BaseException:
            self.close()
            raise
        if "error" in message:
            raise OSError(message["errno"], message["error"], argv[0])
        return Spawned(self, message["pid"])

    @staticmethod
    def spawns(setup):
        """Whether start() asks the Launcher's process (posix_spawn) rather than Popen."""
        chroot, pseudo, covers, umask = setup
        return hasattr(os, "posix_spawn") and bool(chroot or pseudo or covers or umask != AGENT_UMASK)

    def popen(self, argv, cwd, env, log, preexec_fn=None):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=preexec_fn, cwd=cwd, close_fds=True, start_new_session=True)
        proc.exit_fd = open_pidfd(proc.pid)
        return proc

    def receive(self):
        message, fds = receive_frame(self.sock)
        for fd in fds:
            os.close(fd)
        if message is None:
            self.close()
            raise TransactionFailed("the process that starts commands in the root has ended (killed?); run "
                                    "'isconf up' again")
        return message

    @staticmethod
    def bound(covers):
        """Which files the covers bind (device, inode): one replaced since is bound again, in a new process."""
        found = []
        for _, function, arguments in covers:
            if function is libc_call and arguments[0] == "mount" and arguments[4] == MS_BIND:
                try:
                    st = os.stat(arguments[1])
                    found.append((st.st_dev, st.st_ino))
                except OSError:
                    found.append(None)
        return found

    def fork(self, root, setup):
        """Make the process that starts the commands: it tells 'ready' once set up, or what failed."""
        chroot, pseudo, covers, umask = setup[0]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with warnings.catch_warnings():  # 3.12+: a thread (the stall guard, a stuck share) is no hazard
            warnings.simplefilter("ignore", DeprecationWarning)  # to a child that takes none of their locks
            pid = os.fork()
        if pid == 0:  # the child: nothing of the agent's may run here, and nothing but os._exit ends it
            try:
                gc.disable()  # an object of the agent's collected here would close a descriptor number reused
                for signum in STOP_SIGNALS:  # the agent stops the commands; this ends when the agent does
                    signal.signal(signum, signal.SIG_IGN)
                ours.close()
                self.serve(theirs, root, chroot, pseudo, covers, umask)
            finally:
                os._exit(0)
        theirs.close()
        self.pid, self.sock, self.setup = pid, ours, setup
        message = self.receive()
        if "error" in message:
            self.close()
            raise TransactionFailed(message["error"])

    @staticmethod
    def serve(sock, root, chroot, pseudo, covers, umask):
        """The child's life: set up once, then start each command asked for and tell its pid and
        exit status, until the agent closes its end."""
        keep = sock.fileno()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        # The host lock and every file of the agent's, /proc or not (a miniroot may not have mounted it):
        # a flock held here would make the next 'up' busy after a SIGKILLed agent.
        if os.path.isdir("/proc/self/fd"):
            others = [int(name) for name in os.listdir("/proc/self/fd")]
        else:
            others = range(3, os.sysconf("SC_OPEN_MAX"))  # as subprocess does without /proc
        for fd in others:
            if fd not in (0, 1, 2, keep, null):
                try:
                    os.close(fd)
                except OSError:
                    pass
        namespace = top = None
        try:
            os.umask(umask)
            if pseudo or covers:
                enter_private_mounts(pseudo, covers)
                # Each command gets a copy of this namespace (below): what one mounts or unmounts (a
                # chroot script's 'umount /proc') never reaches the next, as when each had its own.
                if os.path.exists("/proc/self/ns/mnt"):
                    namespace = os.open("/proc/self/ns/mnt", os.O_RDONLY)
                    top = os.open(root if chroot else "/", os.O_RDONLY | os.O_DIRECTORY)
            if chroot:
                os.chroot(root)
            os.chdir("/")
        except (OSError, TransactionFailed) as e:
            send_frame(sock, {"error": str(e) if isinstance(e, TransactionFailed) else
                              "cannot enter %s: %s" % (root, e.strerror)})
            return
        send_frame(sock, {"ready": True})
        while True:
            request, fds = receive_frame(sock)
            if request is None:
                return
            try:
                if namespace is not None:
                    libc_call("setns", namespace, CLONE_NEWNS)  # back to the run's, as set up (root and cwd reset)
                    for mount in pseudo:  # a transaction removed a mount point and made it again (rmdir, mkdir)
                        if os.path.isdir(mount[1]) and not os.path.ismount(mount[1]):
                            libc_call("mount", *mount)
                    os.fchdir(top)
                    os.chroot(".")
                    libc_call("unshare", CLONE_NEWNS)  # a copy for this command; it ends with its processes
                os.chdir(request["directory"])
                pid = spawn(request["command"], request["environment"], null, fds[0])
            except OSError as e:
                send_frame(sock, {"error": e.strerror or str(e), "errno": e.errno or errno.EIO})
                continue
            except Exception as e:  # ValueError (argv[0] ''), NotImplementedError (setsid, glibc < 2.26)
                send_frame(sock, {"error": "%s: %s" % (type(e).__name__, e), "errno": errno.EINVAL})
                continue
            finally:
                for fd in fds:
                    os.close(fd)
            send_frame(sock, {"pid": pid})
            send_frame(sock, {"status": exit_code(os.waitpid(pid, 0)[1])})

    def close(self):
        """End the process (it exits once its end of the socket closes) and reap it."""
        if self.sock is not None:
            self.sock.close()
        if self.pid is not None:
            for _ in range(100):
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.01)
            else:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        self.pid = self.sock = self.setup = None


def follow_command(launcher, root, argv, cwd, env, log, setup, output, timeout):
    """Start argv (run_command) and follow it to its end; its exit status."""
    # A stop between the request and the pid's frame, or before proc is bound here, would leave the
    # command running after the run: held until the try below can kill its group.  (posix_spawn
    # gives the command an empty mask; Popen's children would inherit this one: not held for them.)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if launcher.spawns(setup) else None
    proc = None
    try:
        try:
            proc = launcher.start(root, argv, cwd, env, log, setup)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            message = "cannot start %s in %s (cwd %s): %s" % (argv[0], root, cwd, e)
            write_all(log, log_line(message))
            raise TransactionFailed(message)
        except TransactionFailed as e:
            write_all(log, log_line("isconf: %s" % e))
            raise
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a stop pending lands in the try below
        started = time.monotonic()
        status = None
        while status is None:
            status = wait_for_exit(proc, 0.1, REPORTER.waiting())
            if status is None and timeout is not None and time.monotonic() - started > timeout:
                kill_group(proc, signal.SIGKILL)
                proc.wait()
                output.finish()
                write_all(log, ("\n[isconf] killed: still running after exec_timeout %g s\n" % timeout).encode())
                raise TransactionFailed("%s was killed after running for exec_timeout %g s; fix the "
                                        "command, or raise exec_timeout in the host config" % (argv[0], timeout))
            output.follow()
            REPORTER.pump()
    except BaseException:
        # Ctrl-C or an error of ours: the command must not outlive the run, and a second Ctrl-C
        # during the wait must not leave it running (it comes once the group is gone).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if proc is not None and proc.returncode is None:
                kill_group(proc, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    kill_group(proc, signal.SIGKILL)
                    proc.wait()
            if proc is not None:
                output.finish()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    finally:
        if isinstance(proc, subprocess.Popen) and proc.exit_fd is not None:
            os.close(proc.exit_fd)
    output.finish()
    write_all(log, ("[isconf] exit status %d\n" % status).encode())
    return status


def run_command(root, argv, cwd, env, log, echo=True, timeout=None, mounts=True, covers=(), umask=AGENT_UMASK,
                launcher=None):
    """Start a transaction's process, chrooted into root: the one place isconf runs a program.

    log is a descriptor of the transaction's log, open for reading and appending; the
    caller closes it, and syncs it if it must outlive a power cut.  stdin is /dev/null
    (a prompt would hang a host for ever).
    Output goes straight into the log, not through a pipe: an init script that leaves
    a daemon holding its output must not keep the transaction open, and the daemon
    must not die of SIGPIPE when we stop reading.  The transaction ends when the
    command exits; with echo, what it wrote so far is copied to our stdout as it comes,
    and a long output is cut in the log (see CommandOutput).
    The command leads a process group of its own, which a timeout kills whole.  Inside
    a --root, with mounts, it finds /proc, /sys, /dev (and /dev/pts) and /run mounted
    in a mount namespace (see enter_private_mounts), which covers (at boot, the systemctl
    that does not wait: systemctl_covers) also give it, --root / included.  It runs with
    umask (the config's exec_umask), not its caller's: the modes of what it creates do not
    depend on who ran 'up'.  launcher (a run's Launcher) starts it; without one, one is
    made for this command.
    Returns the exit status.
    """
    chroot = os.path.abspath(root) != "/"
    try:
        os.close(RootPath(root).open_dir(cwd))
    except OSError as e:
        raise TransactionFailed("working directory %s cannot be entered inside %s: %s" % (cwd, root, e.strerror))
    pseudo = pseudo_mounts(root) if chroot and mounts else []
    setup = (chroot, pseudo, list(covers), umask)
    output = CommandOutput(log, echo)
    own = launcher is None
    launcher = launcher or Launcher()
    try:
        return follow_command(launcher, root, argv, cwd, env, log, setup, output, timeout)
    finally:
        if own:
            launcher.close()


# --- verify: the disk held to the journal ------------------------------------------------
# The inverse of installing: each path's last applied snap record, checked on the disk as a
# chroot would reach it, with the content read as the author's side stored it (FileType.drift_of).


def applied_entries(rows):
    """The entries of host_report's rows that reached this disk (applied, or in the image's baseline), in
    journal order: skipped and pending entries never touched it."""
    return (entry for entry, mark, _ in rows if mark in ("applied", "baseline"))


def journaled_files(rows):
    """path -> (its record, the records of that snap by path), from the last snap applied here
    that names each path."""
    return FileType.last_records(entry.installs() for entry in applied_entries(rows))


def disk_drifts(rootpath, files, quick, paths=None):
    """Every drift of the journaled files (journaled_files) on the disk, by path; with paths, of those alone."""
    look = Look(rootpath, Owners(rootpath), files, quick)
    return [{"path": path, "what": what, "expected": expected, "found": found}
            for path in sorted(files if paths is None else paths)
            for what, expected, found in FileType.drift_of(look, files[path][0])]


def drift_text(what, expected, found):
    """One drift as 'verify' says it, after the path."""
    if what == "missing":
        return "missing"
    if what == "content":
        if expected["size"] != found["size"]:
            return "content differs (%d bytes, journal says %d)" % (found["size"], expected["size"])
        return "content differs"
    if what == "hardlink":
        return "not a hard link of %s any more" % expected
    if what == "unreadable":
        return "cannot be read: %s" % found
    return "%s %s, journal says %s" % (what, found, expected)


# ---------------------------------------------------------------------------
# Self-upgrade: a new agent proves itself before it is installed; the agent
# re-executes itself after a new agent or a new interpreter (rules 6 and 12).
# ---------------------------------------------------------------------------


def interpreter_identity():
    """What tells whether the interpreter and standard library on disk are still the ones this
    process loaded: a package upgrade repoints a link, renames a new file in (a new inode) or
    rewrites one (a new mtime), and changes the standard library's directory."""
    found = []
    for path in (os.path.realpath(sys.executable), os.path.dirname(os.__file__)):
        try:
            st = os.stat(path)
            found.append((path, st.st_dev, st.st_ino, st.st_mtime_ns))
        except OSError:
            found.append((path, None))
    return found


def agent_files():
    """(device, inode) of the file this agent runs from and of the name it was started by (when
    that is a link to it): a snap that replaces either replaces the agent."""
    found = set()
    for look in (os.stat, os.lstat):
        try:
            st = look(AGENT_PATH)
            found.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    return found


def quote_output(text, most=400):
    """A program's output as one line for an error message: its last lines, escaped."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    quoted = printable(" | ".join(lines[-3:])) or "(no output)"
    return quoted if len(quoted) <= most else "..." + quoted[-most:]


def runnable(path):
    """Whether path is a file that can be executed (an interpreter a transaction purged is not)."""
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def shebang_interpreter(agent):
    """The interpreter agent's #! line names, a name after /usr/bin/env looked up in $PATH as env
    would; None when the line names none that is there."""
    try:
        with open(agent, "rb") as f:
            line = f.readline(256)
    except OSError:
        return None
    words = line[2:].decode("utf-8", "replace").split() if line.startswith(b"#!") else []
    if words and posixpath.basename(words[0]) == "env":  # env's options and NAME=VALUE come before the name
        names = [w for w in words[1:] if not w.startswith("-") and "=" not in w][:1]
        found = [posixpath.join(d, name) for name in names for d in os.environ.get("PATH", os.defpath).split(":")
                 if d.startswith("/")]
        return next((path for path in found if runnable(path)), None)
    return words[0] if words and words[0].startswith("/") and runnable(words[0]) else None


def next_interpreter(agent):
    """The one home of which interpreter runs the agent file agent next (its self-test, the hand-over
    to it): the running one, else, when that is gone from disk (a transaction purged the versioned
    python the agent was started by, as '/usr/bin/python3.11 isconf up' from an admin or an old cron
    line), the one agent's #! line names, then FALLBACK_PYTHON.  Returns (python, None) for the
    running one, (python, how it was found) for a fallback; TransactionFailed when there is none."""
    if runnable(sys.executable):
        return sys.executable, None
    named = shebang_interpreter(agent)
    if named:
        return named, "named by the #! line of %s" % agent
    if runnable(FALLBACK_PYTHON):
        return FALLBACK_PYTHON, "the default, as the #! line of %s names none that is there" % agent
    raise TransactionFailed("no interpreter to run the next agent: %s, which runs this one, is gone from disk, and "
                            "neither the one its #! line names nor %s is there; install one"
                            % (sys.executable or "the interpreter", FALLBACK_PYTHON))


def self_test_agent(python, path, root, config=None):
    """Run an agent file's --self-test under python, in a fresh process: the one program isconf
    starts for its own work (rule 12).  Returns the version it printed; raises TransactionFailed
    with its output quoted unless it exits 0 and prints 'isconf VERSION self-test ok'."""
    argv = [python, "-I", path, "--self-test", "--root", root] + (["--config", config] if config else [])
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                close_fds=True, start_new_session=True)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        raise TransactionFailed("cannot run the self-test of %s under %s: %s" % (path, python, e))
    try:
        out = proc.communicate(timeout=SELF_TEST_TIMEOUT)[0].decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGKILL)
        proc.communicate()
        raise TransactionFailed("the self-test of %s under %s still ran after %d s; killed"
                                % (path, python, SELF_TEST_TIMEOUT))
    except BaseException:
        kill_group(proc, signal.SIGKILL)
        proc.wait()
        raise
    found = SELF_TEST_RE.search(out)
    if proc.returncode != 0 or not found:
        raise TransactionFailed("the self-test of %s under %s failed (exit %d): %s"
                                % (path, python, proc.returncode, quote_output(out)))
    return found.group(1)


def cmd_self_test(args):
    """What a new agent must pass before an older one installs it: it loads, it verifies a
    signature built into it with its own code, and it reads this host's config, keys, state
    and journal.  Its last line, 'isconf VERSION self-test ok', is a contract every version keeps."""
    import_late()  # all that it will import before its first transaction imports under this interpreter
    try:
        verify_signature(SELF_TEST_MESSAGE, SELF_TEST_SIGNATURE, parse_allowed_signers(SELF_TEST_SIGNER, "self-test"))
    except Refused as e:
        raise Refused("self-test: the signed sample built into this file does not verify: %s" % e)
    host = Host(args.root, args.config)
    if host.has_config():
        if not host.config.insecure:
            load_signers(host.signers_path, host.read_signers)
        if os.path.isdir(host.state_path):
            applied_seq = host.history(recent=True).applied()[0]
            host.local_journal(host.local_head(), parse_after=applied_seq)
    show("isconf %s self-test ok" % __version__)
    return EXIT_OK


# ---------------------------------------------------------------------------
# At boot and from cron: waiting for the repository, splay, a systemctl that does not wait.
# ---------------------------------------------------------------------------


# While isconf.service runs, its start job is still open: a service ordered after it cannot start until
# the agent is done, so a transaction's 'systemctl restart S' (or a maintainer script's, an init
# script's through /lib/lsb/init-functions, service's, invoke-rc.d's, deb-systemd-invoke's) that waited
# for S would wait for ever: the boot deadlocks.  At boot every exec runs in a mount namespace of its
# own where each systemctl of the root, by whatever path it is called (/usr/bin/systemctl, /bin/systemctl,
# a name found in PATH, /sbin/reboot's link), is this script: it queues the jobs and returns, and S
# starts once isconf.service is done.  The real systemctl is bound under boot-bin/real, by its names.
# The price: in that namespace the systemctl files are mount points, which an exec at boot cannot
# replace or remove (EBUSY: a systemd upgrade fails there, and the timer's run applies it), and what
# an exec mounts itself stays in its namespace (mount through systemd, e.g. 'systemctl start X.mount').
SYSTEMCTL_PATHS = ("/usr/bin/systemctl", "/bin/systemctl")  # inside the root: the real one, the first found
# The names systemctl takes other meanings by (its links in /sbin); the wrapper keeps them, with no --no-block.
SYSTEMCTL_NAMES = ("halt", "poweroff", "reboot", "shutdown", "telinit", "runlevel")
# The words that make systemctl start or stop units (the verbs, their aliases, enable --now): it waits for
# those jobs unless told --no-block.  Any argument equal to one queues: a false match costs nothing.
SYSTEMCTL_JOB_WORDS = ("start", "stop", "reload", "restart", "try-restart", "reload-or-restart",
                       "try-reload-or-restart", "reload-or-try-restart", "force-reload", "condrestart", "condreload",
                       "condstop", "isolate", "default", "rescue", "emergency", "halt", "poweroff", "reboot", "kexec",
                       "soft-reboot", "exit", "switch-root", "suspend", "hibernate", "hybrid-sleep",
                       "suspend-then-hibernate", "sleep", "--now")
SYSTEMCTL_NO_BLOCK = """\
#!/bin/sh
# Written by 'isconf up --boot' for its execs: in their mount namespace it stands over the root's
# systemctl (and comes first in their PATH).  A job is queued, not waited for, so that a service ordered
# after isconf.service cannot deadlock the boot; it starts when isconf.service is done.
real=%(real)s
if [ ! -x "$real/systemctl" ]; then
    real=%(directory)s  # no namespace (--no-mounts), or not root: the root's own, unless it is this
    if [ "$real/systemctl" -ef "$0" ]; then
        echo "systemctl: at boot, execs of isconf reach systemctl as root only" >&2
        exit 1
    fi
fi
case ${0##*/} in
%(names)s) exec "$real/${0##*/}" "$@" ;;
esac
for word in "$@"; do
    case $word in
    %(words)s) queue=1 ;;
    esac
done
if [ -n "$queue" ]; then
    for word in "$@"; do  # --wait contradicts --no-block (systemctl refuses both): queued, it waits for nothing
        shift
        [ "$word" = --wait ] || set -- "$@" "$word"
    done
    exec "$real/systemctl" --no-block "$@"
fi
exec "$real/systemctl" "$@"
"""


def systemctl_files(rootpath):
    """The root's systemctl binaries: (path inside the root, where it is seen from outside) of each
    regular file SYSTEMCTL_PATHS lead to, its links followed inside the root, each file once (on a
    merged /usr, /bin/systemctl is /usr/bin/systemctl)."""
    found = []
    for path in SYSTEMCTL_PATHS:
        try:
            where = rootpath.resolve(path)
            if stat.S_ISREG(os.lstat(where).st_mode) and where not in [w for _, w in found]:
                found.append((path, where))
        except OSError:
            continue
    return found


def new_empty_file(path):
    """A mount point for a file, in a directory of the exec's namespace."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755))


def systemctl_covers(rootpath, boot_bin):
    """The steps (enter_private_mounts) that, in an exec's mount namespace, put the wrapper
    boot_bin/systemctl (a path seen from outside the root) over each of the root's systemctl
    binaries, read-only: a tmpfs on boot_bin/real, the first binary bound onto a file
    'systemctl' in it and linked there by its other names, then the wrapper bound over each.
    Looked at for each exec: an earlier transaction may have moved or replaced the binaries
    (an upgrade, a /usr merge), and the Launcher's namespace is made again when the steps or
    the files they bind differ, never holding a later exec to files already replaced."""
    files = systemctl_files(rootpath)
    if not files:
        return []
    wrapper, real = os.fsencode(os.path.join(boot_bin, "systemctl")), os.path.join(boot_bin, "real")
    steps = [("mount a tmpfs on %s" % real, libc_call,
              ("mount", b"tmpfs", os.fsencode(real), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755")),
             ("make %s/systemctl" % real, new_empty_file, (os.path.join(real, "systemctl"),))]
    steps += [("link %s/%s" % (real, name), os.symlink, ("systemctl", os.path.join(real, name)))
              for name in SYSTEMCTL_NAMES]
    steps.append(("bind %s on %s/systemctl" % (files[0][1], real), libc_call,
                  ("mount", os.fsencode(files[0][1]), os.fsencode(os.path.join(real, "systemctl")), None, MS_BIND,
                   None)))
    for _, where in files:
        steps += [("bind %s on %s" % (wrapper.decode("utf-8", "replace"), where), libc_call,
                   ("mount", wrapper, os.fsencode(where), None, MS_BIND, None)),
                  ("make %s read-only" % where, libc_call,
                   ("mount", None, os.fsencode(where), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None))]
    return steps


def jitter():
    """A fraction in [0, 1) from the kernel's random source: never one seed shared by a fleet."""
    return int.from_bytes(os.urandom(4), "big") / 2.0 ** 32


def boot_backoff(attempt):
    """Seconds before the next round over the mirrors at boot: doubling from 1 s up to
    BOOT_BACKOFF_MAX, each between half and all of that, so hosts that a power cut booted
    together do not knock in step."""
    return min(2 ** (attempt - 1), BOOT_BACKOFF_MAX) * (0.5 + 0.5 * jitter())


def machine_id(host):
    """ROOT/etc/machine-id, read confined like the host's other files; the host name where there is none."""
    try:
        data = host.rootpath.read_file(MACHINE_ID_PATH, 4096).strip()
    except OSError:
        data = b""
    return data or socket.gethostname().encode("utf-8", "surrogateescape")


def splay_delay(machine_id, seconds):
    """The part of --splay SECONDS this host waits: a stable hash of its machine-id spread evenly
    over [0, SECONDS), so a rack on one cron minute knocks over SECONDS, each host at its own time."""
    digest = hashlib.sha256(b"isconf-splay\0" + machine_id.strip()).digest()
    return seconds * (int.from_bytes(digest[:8], "big") / 2.0 ** 64)


def boot_wait(args, config):
    """How long 'up' waits for a mirror: with --boot, --boot-wait or the config's boot_wait; else not at all."""
    if not args.boot:
        if args.boot_wait is not None:
            raise UsageError("--boot-wait is for 'up --boot'; a run without --boot tries 'retries' rounds")
        return None
    if args.boot_wait is None:
        return config.boot_wait
    try:
        return parse_positive(str(args.boot_wait), float, "--boot-wait", BOOT_WAIT_MAX)
    except ValueError as e:
        raise UsageError(str(e))


def splay(host, seconds):
    try:
        seconds = parse_positive(str(seconds), float, "--splay", SPLAY_MAX)
    except ValueError as e:
        raise UsageError(str(e))
    delay = splay_delay(machine_id(host), seconds) + min(1.0, seconds / 100.0) * jitter()
    REPORTER.syslog.send("splay: waiting %.1f s" % delay)
    REPORTER.notice("--splay: waiting %.1f s before this run: this host's share of %g s, so that a fleet started "
                    "at once does not knock at once" % (delay, seconds))
    time.sleep(delay)


# ---------------------------------------------------------------------------
# The agent, syncing: fetch, verify and stage a branch from the first good mirror.
# ---------------------------------------------------------------------------


class Run(object):
    """What syncing and applying share in one run of the agent on a host: the host, its config,
    its history (read once a run, under the host's lock), the clock and the reporter."""

    def __init__(self, host, now=None):
        self.host, self.config = host, host.config
        self.now_override = now
        self.local_head = local = host.local_head()  # read once a run: the sync compares the mirror's with it
        self.clock_floor = parse_time(local.time) if local else 0
        self.history = host.history(recent=True)
        self.record = None  # the RunRecord of an 'up', counting what it applied and fetched

    def now(self):
        """The time used for expiry and key validity: never earlier than the last verified head,
        so a host whose clock was reset cannot be fed heads older than what it has seen."""
        if self.now_override is not None:
            return self.now_override
        return max(time.time(), self.clock_floor)


class RunRecord(object):
    """The result of one 'up', kept in the state whatever it was (ok, failed, refused, unreachable,
    busy, disabled, ...): the runs that end in an error are those a monitor most needs to see.
    A busy run does not hold the host lock, so the record is one small file replaced atomically
    (last-run), never appended to.  A re-executed agent carries on its parent's record."""

    RESULTS = dict((code, result) for code, result, _ in EXIT_CODES)

    def __init__(self):
        self.start, self.clock, self.before = time.time(), time.monotonic(), 0.0
        self.applied = self.fetched = 0
        self.noop = False  # set by a run that found the host at the mirror's head
        carried = os.environ.pop(RUN_ENV, "")
        if carried and os.environ.get(REEXEC_ENV):
            try:
                start, applied, fetched = carried.split(",")
                numbers = [ascii_number(n) for n in start.split(".") + [applied, fetched]]
                if len(numbers) != 4 or None in numbers:
                    raise ValueError(carried)
                self.start, self.applied, self.fetched = float(start), numbers[2], numbers[3]
                self.before = max(0.0, time.time() - self.start)
            except ValueError:  # not what a parent wrote: this run starts its own record
                pass

    def restart(self):
        self.start, self.clock = time.time(), time.monotonic()

    def carry(self):
        return "%.3f,%d,%d" % (self.start, self.applied, self.fetched)

    def result(self, code):
        if code > EXIT_SIGNAL:
            return "interrupted"
        return self.RESULTS.get(code, "error")

    def save(self, host, code, reason=None, durable=True):
        """Write last-run inside the state directory (as every state file: never through a link).  An
        up-to-date run's record is not fsynced (durable false): a power cut may lose it, leaving an earlier
        run's record (or, on a file system that commits a rename before the data it names, an empty file,
        read as none) until the next run, at boot the boot's own; what the host applied is in its history."""
        end = time.time()
        if reason is not None and len(reason) > ERROR_MAX:
            reason = reason[:ERROR_MAX] + "..."
        record = {"time": format_time(self.start), "end": format_time(end), "exit_code": code,
                  "result": self.result(code), "duration": round(self.before + time.monotonic() - self.clock, 3),
                  "applied": self.applied, "fetched_bytes": self.fetched, "reason": reason, "pid": os.getpid()}
        host.state.write("last-run", json.dumps(record, sort_keys=True).encode("utf-8") + b"\n", 0o644,
                         durable=durable)


def last_run(host):
    """What the last 'up' recorded (RunRecord.save), or None before the first; a damaged record is None too,
    as a monitor must still get the rest of the report (a torn one cannot be: it is replaced atomically)."""
    try:
        record = parse_json(host.state.read("last-run", RECORD_MAX))
    except (FileNotFoundError, ValueError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("exit_code"), int) and TIME_RE.match(
            str(record.get("end"))) and isinstance(record.get("duration"), (int, float))
            and all(isinstance(record.get(key, 0), int) for key in ("applied", "fetched_bytes"))
            and all(isinstance(record.get(key), (str, type(None))) for key in ("reason", "result"))):
        return None  # every field status and the metrics show, of the type they show it as
    return record


class Plan(object):
    """The outcome of a sync: the verified journal (from the applied entry on, when the local
    copy was read), what is left to apply, and what to record locally before applying
    (nothing when the head was unchanged)."""

    def __init__(self, head, entries, applied_seq, signature=None, keep=0, tail=None, baseline=None, history=None):
        self.head, self.entries = head, entries
        self.pending = [e for e in entries if e.seq > applied_seq]
        self.signature, self.keep, self.tail = signature, keep, tail
        self.baseline, self.history = baseline, history

    @property
    def noop(self):
        """Nothing to apply and nothing new to record: the host was at the mirror's head already."""
        return not self.pending and self.tail is None and self.baseline is None

    def commit(self, host):
        """Make the newly verified head and journal this host's local copy; tie a declared
        baseline to its entry first, so that no crash leaves a journal without it."""
        if self.baseline is not None:
            self.history.record("baseline", self.baseline)
        if self.tail is not None:
            host.commit(self.head, self.signature, self.keep, self.tail)


class FetchProgress(object):
    """Bytes fetched for the objects of one run, for the progress line a terminal shows while
    a large download goes on (the reporter shows it on a terminal only, never in a log)."""

    LARGE = 4 * 1024 * 1024   # below this a download is over before a progress line would help
    EVERY = 0.5               # seconds between two updates of the line

    def __init__(self, wanted):
        self.total, self.count = sum(size for _, size in wanted), len(wanted)
        self.done, self.shown = 0, time.monotonic()

    def add(self, n):
        self.done += n   # from several threads: an update lost to a race only delays the line
        now = time.monotonic()
        if (self.total >= self.LARGE and now - self.shown >= self.EVERY
                and threading.current_thread() is threading.main_thread()):
            self.shown = now
            REPORTER.progress("isconf: fetching %d object(s): %.1f of %.1f MiB"
                              % (self.count, self.done / 1048576.0, self.total / 1048576.0))


class _Stopped(Unreachable):
    """A worker's fetch ended because another one failed, or the run was interrupted."""


class ObjectPart(object):
    """The sink an object streams into: objects/SHA.part, hashed on the way to the disk.
    Writes end between two chunks once the run is stopping."""

    def __init__(self, f, stop, progress=None):
        self.f, self.stop, self.progress = f, stop, progress
        self.sha256, self.length, self.kept = hashlib.sha256(), 0, 0

    def resume(self, size):
        """Hash what a previous run left (kept), to go on after it; longer than the object, it
        cannot be the object's start: start over."""
        self.f.seek(0)
        while self.length < size:
            chunk = self.f.read(min(CHUNK, size - self.length))
            if not chunk:
                break
            self.sha256.update(chunk)
            self.length += len(chunk)
        if self.f.read(1):
            self.restart()
        self.kept = self.length

    def restart(self):
        self.f.seek(0)
        self.f.truncate()
        self.sha256, self.length, self.kept = hashlib.sha256(), 0, 0

    def write(self, data):
        if self.stop.is_set():
            raise _Stopped("stopped")
        self.f.write(data)
        self.sha256.update(data)
        self.length += len(data)
        if self.progress is not None:
            self.progress.add(len(data))

    def matches(self, sha, size):
        return self.length == size and self.sha256.hexdigest() == sha


class Sync(object):
    """Fetch and verify a branch's signed head and journal from the mirrors, and stage the
    objects pending transactions need.  Staging writes only objects/ (SHA.part files, renamed once all
    verified); the local head, journal and history change only when the Plan commits."""

    def __init__(self, run):
        self.run, self.host, self.config, self.history = run, run.host, run.config, run.history
        self.now = run.now
        self.signers = None
        self.staged_bytes = 0  # the sizes of the objects this run fetched and staged (the run's record)
        if self.config.insecure:
            warn("insecure mode: heads are not signature-checked; anyone on the network "
                 "can run commands as root here. Run 'isconf init --force --signers FILE' to fix.")
        else:
            self.signers = load_signers(self.host.signers_path, self.host.read_signers)

    def mirrors(self):
        try:
            return [Mirror(url, self.config.timeout, self.config.deadline) for url in self.config.urls]
        except UsageError as e:
            raise StateError("config %s: %s" % (self.config.path, e))

    def sync(self, stage=True, branch=None, wait=None):
        """Fetch and verify from the first mirror that gives a good answer; returns a Plan.

        Network trouble moves on to the next mirror and, after a round, backs off and
        tries again; a refusal moves on too, but is what gets reported if no mirror is good.
        Every mirror that failed is named in a warning, unless the error names it already.
        With wait (seconds, at boot), rounds go on, backing off with jitter, until that time
        has passed: the network or the repository may come up after the agent.
        """
        refusals, failures, failed = [], [], collections.OrderedDict()
        give_up = time.monotonic() + wait if wait else None
        try:
            attempt = 0
            while True:
                if attempt:
                    delay = boot_backoff(attempt) if give_up else min(2 ** (attempt - 1), 30)
                    if give_up:
                        delay = min(delay, max(0, give_up - time.monotonic()))
                        if attempt == 1:
                            warn("waiting up to %d s for a mirror (%s)" % (wait, failures[-1]))
                    time.sleep(delay)
                missing = []  # the mirrors of this round that answered the branch has no head
                mirrors = self.mirrors()
                for mirror in mirrors:
                    try:
                        plan = self._sync_from(mirror, stage, branch)
                        failed.pop(mirror.url, None)
                        return plan
                    except Refused as e:
                        refusals.append(e)
                        failed[mirror.url] = e
                    except Unreachable as e:
                        failures.append(e)
                        failed[mirror.url] = e
                        if isinstance(e, BranchMissing):
                            missing.append(mirror)
                    finally:
                        mirror.close()
                if len(missing) == len(mirrors) and not give_up:
                    # Every mirror answered: a wrong name is not cured by asking again.  At boot a
                    # repository may still be on its way there: that waits on.
                    for mirror in missing:
                        failed.pop(mirror.url, None)
                    raise self.no_such_branch(branch or self.config.branch, missing)
                if refusals:
                    break  # a hostile answer is not cured by asking again
                attempt += 1
                if (time.monotonic() >= give_up) if give_up else attempt >= max(1, self.config.retries):
                    break
            if len(missing) == len(mirrors) and not refusals:
                for mirror in missing:
                    failed.pop(mirror.url, None)
                raise self.no_such_branch(branch or self.config.branch, missing)
            error = refusals[0] if refusals else failures[-1]
            for url, e in list(failed.items()):
                if e is error:
                    del failed[url]   # the error line says it
            raise refusals[0] if refusals else Unreachable(
                "no mirror could be reached (%s); check the network and the URLs in %s"
                % (failures[-1], self.config.path))
        finally:
            for url, e in failed.items():
                warn("mirror %s: %s" % (url, e))

    @staticmethod
    def no_such_branch(branch, mirrors):
        """The error for a branch none of the mirrors has, naming the branches each one that can say holds."""
        said = []
        for mirror in mirrors:
            names = mirror.branches()
            said.append("%s%s" % (mirror, "" if names is None else " (branches there: %s)"
                                  % (", ".join(names) if names else "none")))
        return NoSuchBranch("branch %s does not exist on %s; check the branch name (and the mirror URLs)"
                            % (branch, ", ".join(said)))

    def _sync_from(self, mirror, stage, branch):
        """Fetch and verify one mirror's head and journal tail, then stage what pending
        transactions need.  Only objects/ changes here; the Plan commits the rest later."""
        host = self.host
        branch = branch or self.config.branch
        applied_seq, applied_id = self.history.applied()
        baseline = None if applied_seq else host.declared_baseline()
        local = self.run.local_head
        local_entries = host.local_journal(local, parse_after=applied_seq)
        moving = local if local is not None and local.branch != branch else None
        if moving is not None:
            # Moving to another branch (or finishing a move a crash interrupted): its
            # journal is fetched whole and replaces the local copy once it verified.
            local, local_entries = None, []
        prefix = "branches/%s/" % branch

        # Always the whole head, never a conditional request: nginx's ETag and Last-Modified
        # are the mtime in whole seconds and the size, so two same-size heads published
        # within one second look alike, and a 304 would leave the host behind for good.
        # The head is ~200 bytes: an up-to-date run is still one small request.
        try:
            response = mirror.fetch(prefix + "head", HEAD_MAX)
        except NotFound as e:
            # No head: the branch does not exist there, unless a directory mirror holds no repository
            # at all (a share not mounted yet), which is a mirror not reached.
            if mirror.directory is not None and mirror.branches() is None:
                raise
            raise BranchMissing(str(e))
        if local is not None and response.body == local.data and self.local_head_trusted(local):
            local.check_expiry(self.now())  # a mirror serving the same head for ever is a freeze attack
            tied = self.tie_baseline(mirror, local_entries, baseline)
            plan = Plan(local, local_entries, tied.seq if tied else applied_seq, baseline=tied, history=self.history)
            self.refuse_state_writes(mirror, plan.pending)
            if stage:
                self.stage_objects(mirror, plan.pending)  # one lost since the last run (a damaged copy)
            return plan
        signature = self.check_signature(mirror, prefix, branch, response.body)
        head = Head.parse(response.body, "head from %s" % mirror)
        # Moving, the journal fetched whole says where the branch leaves this host's history.
        self.check_head(mirror, head, branch, local, 0 if moving else applied_seq)

        base = local_entries
        start = local.length if local is not None else 0
        tail = self.fetch_tail(mirror, prefix + "journal", start, head.length)
        try:
            entries = base + verify_chain(tail, base[-1].seq if base else 0, base[-1].id if base else ZERO_ID,
                                          "journal from %s" % mirror)
        except Refused:
            if start:
                self.check_same_start(mirror, prefix + "journal", branch, local)
            raise
        if (entries[-1].id if entries else ZERO_ID) != head.id or (entries[-1].seq if entries else 0) != head.seq:
            raise Refused("journal from %s does not end at the entry the signed head names (seq %d); "
                          "head and journal are from different times" % (mirror, head.seq))
        # Rule 2: what this host applied must be a prefix of what it fetched.  The chain
        # makes one id comparison enough: equal ids at applied_seq mean equal prefixes.
        applied = entry_at(entries, applied_seq)
        if applied_seq and (applied is None or applied.id != applied_id):
            if moving is not None:
                raise Refused(self.not_extending(branch, mirror, moving, entries, applied_seq))
            raise Refused("branch %s from %s does not extend what this host has applied (seq %d, %s): the "
                          "journal was rewritten; reinstall the host and replay"
                          % (branch, mirror, applied_seq, applied_id[:16]))
        tied = self.tie_baseline(mirror, entries, baseline)
        plan = Plan(head, entries, tied.seq if tied else applied_seq, signature, start, tail, tied, self.history)
        self.refuse_state_writes(mirror, plan.pending)
        if stage:
            self.stage_objects(mirror, plan.pending)
        return plan

    def own_ids(self, head):
        """The ids of the entries of this host's verified journal copy up to head, in order (read whole:
        for an error's message only)."""
        return [sha256_hex(line) for line in self.host.journal_lines(head.length) or []]

    def not_extending(self, branch, mirror, moving, entries, applied_seq):
        """Why branch (a move's target) cannot follow what this host applied: where the two part."""
        ours = self.own_ids(moving)[:applied_seq]
        seq = next((i + 1 for i, (mine, theirs) in enumerate(zip(ours, entries)) if mine != theirs.id),
                   min(len(ours), len(entries)) + 1)
        if seq > len(entries):
            return ("branch %s from %s does not extend this host's history: it ends at seq %d, before the %d "
                    "this host applied; migrate once it has them (promote), or to a branch that has"
                    % (branch, mirror, len(entries), applied_seq))
        return ("branch %s from %s does not extend this host's history (diverges at seq %d): it holds other "
                "transactions than this host applied; migrate to a branch that extends it, or reinstall the host "
                "and replay that branch" % (branch, mirror, seq))

    def check_same_start(self, mirror, relpath, branch, local):
        """After a journal's new part did not verify: whether the mirror's journal starts with this
        host's copy at all.  Where it does not, the branch was forked or rewritten past what this host
        verified, and the error says so, not what the bytes at that offset happen to look like."""
        try:
            got = mirror.fetch(relpath, local.length, start=0, stop=local.length).body
        except IsconfError:
            return  # the mirror cannot say: the error about its new part stands
        ours = self.host.journal_bytes(local.length)
        if got == ours:
            return
        theirs = got.split(b"\n")
        seq = next((i + 1 for i, (mine, line) in enumerate(zip(ours.split(b"\n"), theirs)) if mine != line),
                   len(theirs))
        raise Refused("journal of branch %s from %s diverges from this host's copy at seq %d: the branch was "
                      "forked or rewritten after this host verified it (seq %d); reinstall the host and replay, or "
                      "migrate to a branch that extends it" % (branch, mirror, seq, local.seq))

    def refuse_state_writes(self, mirror, pending):
        """Refused, before anything applies, if a pending entry would install a path that leads into
        this host's state directory (attack: a signed snap of the history makes the agent forget what
        it applied, and run transaction 1 again).  An entry naming STATE_PATH is refused on its own
        (FileType.check_record); here the links in the root on the way are followed too."""
        known = interpretable(pending)
        retired = set(filter(None, (entry.retracts() for entry in known)))
        for entry in known:
            if (entry.seq, entry.id) in retired:
                continue
            links = {}  # path -> target of the links this entry installs before the record looked at
            for record in entry.installs():
                if self.host.writes_state(record["path"]) or self.through_links(record["path"], links):
                    raise Refused("journal from %s: entry %d snaps %s, which leads into this host's state "
                                  "directory %s, and no journal entry may write the agent's own state; remove "
                                  "the link or mount on the way, or retract the entry"
                                  % (mirror, entry.seq, record["path"], self.host.state_path))
                links.pop(record["path"], None)
                target = FILE_TYPES[record["type"]].leads_to(record)
                if target is not None:
                    links[record["path"]] = target

    def through_links(self, path, links):
        """Whether path leads into the state directory through links (path -> target) its own snap installs
        before it, which are not on the disk yet: the first of them on the way is followed by name, the
        rest of path after its target ('..' taken by name too), as often as a link leads to another."""
        for _ in range(SYMLINK_HOPS if links else 0):
            parts = path.split("/")
            above = next((way for way in ("/".join(parts[:n]) for n in range(2, len(parts))) if way in links), None)
            if above is None:
                return False
            path = "/" + posixpath.normpath(posixpath.join(posixpath.dirname(above), links[above],
                                                           path[len(above) + 1:])).lstrip("/")
            if self.host.writes_state(path):
                return True
        return False  # a loop of links: installing through it fails on its own

    def tie_baseline(self, mirror, entries, baseline):
        """The verified entry a declared baseline names (None without one): a journal that does not
        reach it is refused, as the image holds transactions this repository does not have."""
        if baseline is None:
            return None
        if len(entries) < baseline:
            raise Refused("the journal from %s ends at seq %d, before this host's baseline seq %d: the image was "
                          "built from a journal this repository does not have (yet); check the mirror, or run "
                          "'isconf init --force --baseline SEQ' with the right seq" % (mirror, len(entries), baseline))
        return entries[baseline - 1]

    def local_head_trusted(self, local):
        """Whether the local head's signature still verifies with the keys trusted now.
        If a key was removed, a mirror serving the same head must not let the pending
        entries it signed through: its signature is then fetched and checked again."""
        if self.signers is None:
            return True
        try:
            verify_signature(local.data, self.host.state.read("head.sig", SIGNATURE_MAX), self.signers,
                             now=self.now())
        except (Refused, OSError, StateError):
            return False
        return True

    def check_signature(self, mirror, prefix, branch, head_bytes):
        """Fetch head.sig and verify it over the head's exact bytes; None in insecure mode."""
        if self.signers is None:
            return None
        try:
            signature = mirror.fetch(prefix + "head.sig", SIGNATURE_MAX).body
            verify_signature(head_bytes, signature, self.signers, now=self.now())
        except NotFound:
            raise Refused("head of branch %s from %s has no head.sig: this host accepts only signed "
                          "heads; the author must 'ci --sign KEY'" % (branch, mirror))
        except Refused as e:
            raise Refused("head of branch %s from %s: %s" % (branch, mirror, e))
        return signature

    def check_head(self, mirror, head, branch, local, applied_seq):
        """A signed head can still be the wrong one: another branch, too old, a fork, expired."""
        if head.branch != branch:
            raise Refused("head from %s is for branch %r, but this host follows %r; the mirror is "
                          "misconfigured or replaying another branch" % (mirror, head.branch, branch))
        head.check_expiry(self.now())
        known = max(applied_seq, local.seq if local else 0)
        if head.seq < known:
            raise Refused("head from %s is at seq %d, older than the %d this host has verified (rollback); "
                          "the mirror is stale or replaying an old head" % (mirror, head.seq, known))
        if local is not None and head.seq == local.seq and head.id != local.id:
            raise Refused("head from %s names a different entry %d than this host verified (fork); "
                          "the journal was rewritten: reinstall or migrate" % (mirror, head.seq))
        if local is not None and head.length < local.length:
            raise Refused("head from %s says the journal is %d bytes, shorter than the %d verified here "
                          "(truncation)" % (mirror, head.length, local.length))

    def fetch_tail(self, mirror, relpath, start, length):
        """The journal's bytes [start, length): by Range, or from a whole file whose first
        start bytes must be the ones this host verified (a server that ignores Range)."""
        if length == start:
            return b""
        got = mirror.fetch(relpath, length, start=start, stop=length)
        tail = got.body
        if not got.partial:
            verified = self.host.journal_bytes(start) if start else b""
            if tail[:start] != verified:
                raise Refused("journal from %s does not begin with the journal this host verified; it was "
                              "rewritten" % mirror)
            tail = tail[start:]
        if len(tail) != length - start:
            raise Refused("journal from %s is %d bytes where the signed head says %d (truncated or padded)"
                          % (mirror, start + len(tail), length))
        return tail

    def stage_objects(self, mirror, pending):
        """Download every object pending transactions need, several at once, each streamed and
        hashed to objects/SHA.part and checked against the signed journal's hash and size.

        They are renamed into the staging area only when all of them verified, so a refused run
        leaves the host's state as it was.  A run that could not finish (a mirror unreachable,
        a Ctrl-C) keeps its .part files: the next one hashes each again and asks for the rest.
        """
        needed = {}
        for entry in interpretable(pending):  # what comes after is for the agent that can read it
            for sha, size in entry.objects():
                needed[sha] = size
        if needed:  # a run with nothing to stage leaves objects/ alone
            self.host.make_dirs()
            self.stage(mirror, self.missing(needed))

    def missing(self, needed):
        """The (sha, size) of needed ({sha: size}) not staged intact (staged_intact), largest first: a big
        object started last would hold up the end of the run alone."""
        objects = self.host.objects
        wanted = [(sha, size) for sha, size in needed.items() if not self.staged_intact(objects, sha, size)]
        wanted.sort(key=lambda item: (-item[1], item[0]))
        return wanted

    def stage(self, mirror, wanted):
        """Fetch the (sha, size) pairs of wanted from mirror, each verified, and rename them into the
        staging area once all verified (stage_objects)."""
        if not wanted:
            return
        objects = self.host.objects
        touched = []
        try:
            self.fetch_objects(mirror, wanted, touched)
        except (Unreachable, KeyboardInterrupt):
            raise   # what arrived stays as .part, to resume from
        except BaseException:
            for part in touched:
                with contextlib.suppress(FileNotFoundError):
                    objects.unlink(part)
            raise
        for sha, _ in wanted:
            objects.rename(sha + ".part", sha)
        objects.fsync()
        for sha, _ in wanted:  # each hashed as it was fetched (fetch_object): as the rename left it
            self.host.staged.verify(sha, objects.stat(sha))
        self.staged_bytes += sum(size for _, size in wanted)

    def stage_any(self, needed):
        """Stage needed objects ({sha: size}) no longer staged intact here (pruned once applied) from the
        first mirror that serves them all, each verified by the hash and size the local journal gives;
        for 'verify --repair', which reads no head.  Nothing is staged unless all of them verified."""
        wanted = self.missing(needed)
        if wanted:
            self.from_any_mirror(lambda mirror: self.stage(mirror, wanted))

    def from_any_mirror(self, attempt):
        """attempt(mirror)'s answer from the first mirror, in the config's order, where it neither is refused
        nor fails to reach it, for a fetch that reads no head ('verify --repair', the dry run's objects).  If
        none: the first refusal (a mirror serving what the signed journal does not say), else unreachable.
        Each mirror that failed is named in a warning, unless the error names it already (as sync does)."""
        failed = []  # (mirror, its error)
        try:
            for mirror in self.mirrors():
                try:
                    return attempt(mirror)
                except (Refused, Unreachable) as e:
                    failed.append((mirror, e))
                finally:
                    mirror.close()
            refusals = [e for _, e in failed if isinstance(e, Refused)]
            error = refusals[0] if refusals else failed[-1][1] if failed else "none configured"
            failed = [(mirror, e) for mirror, e in failed if e is not error]
            raise error if refusals else Unreachable(
                "no mirror could be reached (%s); check the network and the URLs in %s" % (error, self.config.path))
        finally:
            for mirror, e in failed:
                warn(str(e) if str(mirror) in str(e) else "mirror %s: %s" % (mirror, e))

    def staged_intact(self, objects, sha, size):
        """Whether objects/SHA, staged by an earlier run, holds the object's bytes: its size, then its
        hash, read once per run before any transaction (rule 4: an object damaged since it was
        staged must not wait for its snap, after earlier transactions ran, to be found out), and
        recorded verified (StagedObjects).  A damaged one is removed, to be fetched again."""
        known = self.host.staged
        if sha in known.verified:
            return True
        staged = objects.stat(sha)
        if staged is None:
            return False
        if staged.st_size == size:
            digest = hashlib.sha256()
            with os.fdopen(objects.open(sha), "rb") as f:
                st = os.fstat(f.fileno())  # before it is read: a write while it is hashed shows as a change
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    digest.update(chunk)
            if digest.hexdigest() == sha:
                known.verify(sha, st)
                return True
        warn("staged object %s is damaged (it changed since it was staged); fetching it again" % sha[:16])
        objects.unlink(sha)
        return False

    def fetch_objects(self, mirror, wanted, touched):
        """Fetch (sha, size) pairs with up to FETCH_THREADS requests in flight, each worker with
        its own Mirror (one kept-alive connection per server, for one thread).  This thread
        takes its share too, so Ctrl-C and SIGTERM arrive in a fetch as before.  The first
        error stops the other workers at once (their sockets are shut down); it is raised
        here once every worker has ended.  touched gets each .part name a worker opened."""
        queue, lock, stop, errors = collections.deque(wanted), threading.Lock(), threading.Event(), []
        progress = FetchProgress(wanted)
        mirrors = [mirror] + [Mirror(mirror.url, mirror.timeout, mirror.deadline)
                              for _ in range(min(FETCH_THREADS, len(wanted)) - 1)]

        def halt():
            stop.set()
            for other in mirrors:
                other.abort()

        def work(own):
            try:
                while not stop.is_set():
                    with lock:
                        if not queue:
                            return
                        sha, size = queue.popleft()
                    self.fetch_object(own, sha, size, stop, touched, progress)
            except Exception as e:   # handed to the calling thread, raised there
                with lock:
                    if not stop.is_set():
                        errors.append(e)   # the first error wins: the others follow from halt()
                halt()
            finally:
                if own is not mirror:
                    own.close()

        threads = []
        try:
            # The workers block the signals that stop a run (they inherit this thread's mask): the
            # kernel gives a process's signal to any thread that takes it, and Python runs handlers
            # in this thread only when it wakes, which a read waiting on a stalled mirror does not.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                for own in mirrors[1:]:
                    thread = threading.Thread(target=work, args=(own,), name="isconf-fetch")
                    thread.daemon = True   # a second Ctrl-C during the join below must still end the agent
                    thread.start()
                    threads.append(thread)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            work(mirror)
            for thread in threads:
                thread.join()
        except BaseException:   # Ctrl-C, SIGTERM, or a thread that could not start
            halt()
            for thread in threads:
                thread.join()
            raise
        if errors:
            raise errors[0]

    def fetch_object(self, mirror, sha, size, stop, touched, progress=None):
        """Make objects/SHA.part the object whose hash and size the signed journal gives.

        What a previous run left there is hashed again and only the rest is asked for, with a
        Range.  If the whole then does not match, the kept prefix was damaged here (after a
        power loss a file can end in zeros), not by the mirror: the object is fetched once more
        from its first byte, and only a mismatch then is the mirror's, and refused."""
        fd = self.host.objects.open(sha + ".part", os.O_RDWR | os.O_CREAT, 0o600)
        touched.append(sha + ".part")   # ours now, to remove if the run is refused; not what open refused
        with os.fdopen(fd, "r+b") as f:
            part = ObjectPart(f, stop, progress)
            part.resume(size)
            if part.length < size:
                try:
                    mirror.fetch("objects/" + sha, size, start=part.length, sink=part)
                except ShortFile:
                    # This mirror's copy ends before the start kept here: fetch it from zero (below), and
                    # let the hash judge it.
                    if not part.kept:
                        raise
            if part.kept and not part.matches(sha, size):
                part.restart()
                mirror.fetch("objects/" + sha, size, sink=part)
            if not part.matches(sha, size):
                raise Refused("object %s from %s does not match the signed journal (%d bytes, %d "
                              "expected, or another hash); the mirror holds a damaged or swapped file"
                              % (sha[:16], mirror, part.length, size))
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------
# The agent, applying: pending transactions in order, each as its kind says; the hand-over to
# a new agent or interpreter.
# ---------------------------------------------------------------------------


def retractions(entries):
    """(seq, id) of each entry a retract entry among entries retires -> that retract entry; entries past one
    this version cannot interpret are not looked at (the agent that can will)."""
    found = {}
    for entry in interpretable(entries):
        target = entry.retracts()
        if target is not None and target[0] < entry.seq:
            found.setdefault(tuple(target), entry)
    return found


def drop_left_copies(rootpath, entry):
    """Remove what an attempt at entry's snap, killed before its renames, left beside its paths (replace_at's
    temporary names, the same at every attempt, whole and with their final modes, set-id bits included).
    The next attempt removes them first; an entry that will never run again (skipped, retracted) calls this."""
    try:
        records = entry.installs()
    except NeedsNewer:
        return  # never interpreted here, so never attempted
    for record in records:
        try:
            dfd, name = rootpath.parent(record["path"])
        except OSError:
            continue  # its directory is missing, or not one: nothing of this snap was left in it
        try:
            left = temp_name(name, locked=True)
            if not stat.S_ISDIR(os.stat(left, dir_fd=dfd, follow_symlinks=False).st_mode):
                os.unlink(left, dir_fd=dfd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dfd)


class Transaction(object):
    """What a kind's apply (Kind.apply) may use of the host while one entry applies, and nothing
    more: the root and the staged objects (objects, and staged: what this command verified of them),
    its command's run, and the agent's self-upgrade hooks."""

    def __init__(self, host, entry, environment, timeout, mounts, agent_files, covers=(), launcher=None):
        if not imported_late():  # rule 6: no transaction runs before everything is imported
            raise AssertionError("transaction %d would run before the late imports (import_late)" % entry.seq)
        self.rootpath, self.objects, self.staged = host.rootpath, host.objects, host.staged
        self._host, self._entry = host, entry
        self._environment, self._timeout, self._mounts, self._covers = environment, timeout, mounts, covers
        self._agent_files, self._launcher = agent_files, launcher
        self.ran = False  # a command ran: what it wrote, anywhere, waits for the batch's syncfs (DoneBatch)

    def run(self, argv, cwd):
        """Run the transaction's command chrooted into the root, its output appended to the
        transaction's log (run_command); its exit status.  What a failure printed is synced."""
        self.ran = True
        log = self._host.logs.open(self._entry)
        try:
            status = run_command(self._host.root, argv, cwd, self._environment, log, timeout=self._timeout,
                                 mounts=self._mounts, covers=self._covers, umask=self._host.config.exec_umask,
                                 launcher=self._launcher)
            if status != 0:
                os.fsync(log)  # what the failure printed outlives a power cut
            return status
        finally:
            os.close(log)

    def writes_state(self, path):
        """Whether installing path would write the host's state directory (Host.writes_state)."""
        return self._host.writes_state(path)

    def is_agent(self, path):
        """Whether path inside the root is the running agent's own file.  Known by device and inode,
        so it holds with any --root: from the host itself (--root /) a snap of the agent's own path,
        and from a miniroot never a file inside the target, which is not the running agent even when
        it is the same path there."""
        try:
            st = self.rootpath.lstat(path)
        except (OSError, IsconfError):
            return False
        return (st.st_dev, st.st_ino) in self._agent_files

    def try_agent(self, path, write):
        """Have write(dfd, name) write the new agent beside the staged objects, and run its self-test
        under the running interpreter; it is removed either way.  TransactionFailed if it fails."""
        objects, name = self.objects, sha256_hex(path.encode("utf-8", "surrogateescape"))[:16] + ".agent"
        write(objects.fd, name)
        try:
            python, fallback = next_interpreter(objects.file(name))
            version = self_test_agent(python, objects.file(name), self._host.root, self._host.explicit_config)
        except TransactionFailed as e:
            raise TransactionFailed("new agent %s not installed: %s" % (path, e))
        finally:
            objects.unlink(name)
        say("new agent %s passed its self-test: isconf %s%s" % (path, version, " under %s" % python if fallback
                                                                 else ""))


class DoneBatch(object):
    """Group commit: the done (and retracted) records of transactions applied one after another, written
    together once their effects are durable: what commands wrote by one syncfs of the root's file systems
    (sync_filesystems), a snap's files by its own fsyncs (old or new, never torn, needs them anyway), then
    the records in one write and one fsync.  So no done record exists, even in the page cache, before its
    transaction's effects are on disk, and a crash loses at most the records of the batch not yet written:
    those transactions run again (at least once).  A batch is flushed when it holds BATCH_MOST records or
    its first waited BATCH_SECONDS, and by Applier before whatever must find them on disk: a reboot, a
    re-exec, a failure's or an interruption's record, a halt, the end of the run."""

    def __init__(self, history, root):
        self.history, self.root = history, root
        self.records, self.since, self.unsynced = [], None, False

    def add(self, event, entry, ran=False, **extra):
        """Queue a record of entry; ran: its command ran, so the flush syncs the file systems first."""
        if not self.records:
            self.since = time.monotonic()
        self.records.append(self.history.new_record(event, entry, **extra))
        self.unsynced = self.unsynced or ran

    def due(self):
        return len(self.records) >= BATCH_MOST or time.monotonic() - self.since >= BATCH_SECONDS

    def flush(self):
        """Effects synced, then the records written and fsynced; a signal that stops the run waits for
        both.  Records a failure here leaves unwritten are dropped: their transactions run again."""
        if not self.records:
            return
        records, unsynced, self.records, self.unsynced = self.records, self.unsynced, [], False
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if unsynced:
                sync_filesystems(self.root)
            self.history.record_all(records)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Applier(object):
    """Apply a Plan's pending transactions in order, halting at the first failure, and hand
    over to a new agent or interpreter between transactions.  For a hand-over (cmd_up), lock
    is the host lock to keep and argv the arguments to run again."""

    def __init__(self, run, mounts=True, lock=None, argv=None, boot=False):
        self.run, self.host, self.config, self.history = run, run.host, run.config, run.history
        self.mounts = mounts  # pseudo-filesystems for execs inside a --root, and the systemctl at boot (run_command)
        self.boot, self._boot_bin = boot, None  # at boot, execs find a systemctl that does not wait (boot_bin)
        self.lock, self.argv = lock, argv
        self.interpreter, self.agent_files = interpreter_identity(), agent_files()
        # Recorded in every 'started': a later run tells whether the machine rebooted.  Read before the first
        # transaction (one kernel's id for the process's whole life): a run with nothing to apply never needs it.
        self.boot_id = None
        self.batch = DoneBatch(self.history, self.host.root)
        self.launcher = Launcher()  # starts the run's commands (ended with the run, and before a re-exec)
        # Who applied each transaction, as this process started: kept in its done or failed record.
        self.provenance = {"agent": __version__, "python": sys.version.split()[0],
                           "python_path": os.path.realpath(sys.executable)}

    def apply(self, plan, allow_reboot=False):
        """Apply pending transactions in order, halting at the first failure.  An attempt the agent
        stops on a signal it caught ends with a record of it (record_interrupted)."""
        ran = len(self.history.events)  # what this run records comes after
        try:
            return self.apply_in_order(plan, allow_reboot)
        except KeyboardInterrupt as e:
            self.batch.flush()  # what ended before the signal is recorded done
            self.record_interrupted(plan, ran, e)
            raise
        except BaseException:
            self.batch.flush()  # every other way out, as the failure's own record did
            raise
        finally:
            self.launcher.close()

    def apply_in_order(self, plan, allow_reboot):
        host, history = self.host, self.history
        retracted = retractions(plan.pending)
        if plan.pending:
            import_late()  # rule 6: everything, before the first transaction runs
            host.make_dirs()  # objects/ and logs/, checked (exit 7) before anything runs
            self.boot_id = boot_id()
            # Every install of the run to come: an object is moved into place only at the last (write_copy).
            host.staged.count(sha for entry in interpretable(plan.pending) if (entry.seq, entry.id) not in retracted
                              for sha, _ in entry.objects())
        for entry in plan.pending:
            retraction = retracted.get((entry.seq, entry.id))
            if retraction is not None:  # a position in the history, in order with the done records
                drop_left_copies(host.rootpath, entry)
                self.batch.add("retracted", entry, by=retraction.id, by_seq=retraction.seq, why=retraction.message)
                REPORTER.end("[%d/%d]" % (entry.seq, plan.head.seq), entry.summary(),
                             "retracted by %d" % retraction.seq, 0)
                continue
            waits = entry.waits(allow_reboot)  # NeedsNewer halts here, unless an agent upgrade before it took over
            if waits is not None:
                code, why = waiting_message(entry, waits, host.root, self.config.reboot_command)
                self.batch.flush()
                say(why)
                return code
            position, summary, started = "[%d/%d]" % (entry.seq, plan.head.seq), entry.summary(), time.monotonic()
            interrupted = history.interruptions(entry, self.boot_id)
            if interrupted["attempts"] >= self.config.interrupted_max:
                REPORTER.end(position, summary, "halted", 0)
                self.halt_interrupted(entry, interrupted)
            REPORTER.begin(position, summary)
            # On disk before anything of it runs: a command that resets the machine is counted (interrupted_max).
            history.record("started", entry, **({"boot_id": self.boot_id} if self.boot_id else {}))
            try:
                outcome, ran = self.apply_one(entry)
            except (TransactionFailed, StateError) as e:
                REPORTER.end(position, summary, "failed", time.monotonic() - started)
                status = {"status": e.status} if getattr(e, "status", None) is not None else {}
                self.batch.flush()
                history.record("failed", entry, error=str(e), **dict(self.provenance, **status))
                host.logs.note(entry, "[isconf] failed: %s" % e)
                if isinstance(e, StateError):
                    raise
                raise TransactionFailed("transaction %d failed: %s; log in %s. Fix the cause and run 'isconf up' "
                                        "again, or 'isconf skip %d -m WHY'"
                                        % (entry.seq, e, host.logs.path(entry), entry.seq))
            self.batch.add("done", entry, ran, **self.provenance)
            REPORTER.end(position, summary, "ok", time.monotonic() - started)
            if self.run.record is not None:
                self.run.record.applied += 1
            if outcome == REBOOT:
                self.finish(plan)
                return self.reboot()
            python = self.handover(entry, outcome == HANDOVER)
            if python:
                self.batch.flush()
                self.launcher.close()
                self.reexec(python, entry)
            if self.batch.due():
                self.batch.flush()
        self.finish(plan)
        return EXIT_OK

    def record_interrupted(self, plan, ran, error):
        """End the attempt the agent stops on a signal it caught (Ctrl-C, SIGTERM, SIGHUP: error), once
        the command's process group is gone: an 'interrupted' record naming the signal, on disk before
        the agent exits.  Not counted toward interrupted_max unless the machine reboots before the next
        start (History.interruptions).  Nothing when no attempt of this run (the records after ran) is
        open: the signal came between two transactions, or before the first (the last start has its done
        record, the batch flushed first)."""
        events = self.history.events[ran:]
        starts = [i for i, e in enumerate(events) if e["event"] == "started"]
        if not starts or any(e["id"] == events[starts[-1]]["id"] for e in events[starts[-1] + 1:]):
            return
        entry = next((e for e in plan.pending if (e.seq, e.id) == (events[starts[-1]]["seq"],
                                                                   events[starts[-1]]["id"])), None)
        if entry is None:
            return
        name = signal.Signals(getattr(error, "signum", signal.SIGINT)).name
        self.history.record("interrupted", entry, signal=name)
        try:
            self.host.logs.note(entry, "[isconf] interrupted by %s" % name)
        except (OSError, IsconfError) as e:  # the history has it: the run still ends as the signal asked
            warn("the log of transaction %d does not say it was interrupted: %s" % (entry.seq, e))

    def halt_interrupted(self, entry, seen):
        """Fail a transaction started interrupted_max times that never ended (History.interruptions: seen),
        without starting it again: run again at every boot (rule 5), an exec that reboots the machine would
        loop its boots for ever.  The message says whether the machine rebooted during those attempts."""
        self.batch.flush()
        count = seen["attempts"]
        error = "started %s without ending (interrupted_max %d)" % (plural(count, "time"),
                                                                    self.config.interrupted_max)
        reboot = ("A reboot belongs in a 'reboot' entry ('isconf reboot'), not in an exec: once the journal has one, "
                  "run 'isconf skip %d -m WHY'" % entry.seq)
        if seen["rebooted"]:
            error += (", the machine rebooting during %d of them: it probably reboots or powers off the machine "
                      "itself, so it is not started again. %s" % (seen["rebooted"], reboot))
        elif seen["unknown"]:  # starts recorded by an older isconf, without a boot id
            error += ": it probably reboots or powers off the machine, or kills the agent, so it is not started " \
                     "again. %s" % reboot
        else:
            error += (", vanishing each time without a reboot: the agent was killed (SIGKILL, the OOM killer, or the "
                      "command killing it), so it is not started again. Find what kills it, then run 'isconf skip "
                      "%d -m WHY', or raise interrupted_max in the host config to let it run again" % entry.seq)
        self.history.record("failed", entry, error=error, interrupted=count, **self.provenance)
        self.host.logs.note(entry, "[isconf] %s halted: %s" % (format_time(time.time()), error))
        raise TransactionFailed("transaction %d halted: %s; log in %s" % (entry.seq, error, self.host.logs.path(entry)))

    def boot_bin(self):
        """At boot, the directory (a path inside the root) put first in the PATH of every exec: it holds
        a systemctl that queues jobs without waiting for them (see SYSTEMCTL_NO_BLOCK), and the empty
        directory 'real' where an exec's namespace finds the real one (systemctl_covers).  None
        otherwise, and where the root has no systemctl."""
        if not self.boot:
            return None
        if self._boot_bin is None:
            files = systemctl_files(self.host.rootpath)
            self._boot_bin = ""
            if files:
                directory = self.host.state.subdir("boot-bin", create=True)
                directory.subdir("real", create=True)
                inside = "/" + os.path.relpath(directory.path, self.host.root)
                script = (SYSTEMCTL_NO_BLOCK % {
                    "real": shlex.quote(inside + "/real"), "directory": shlex.quote(posixpath.dirname(files[0][0])),
                    "names": "|".join(SYSTEMCTL_NAMES), "words": "|".join(SYSTEMCTL_JOB_WORDS)}).encode()
                if directory.stat("systemctl") is None or directory.read("systemctl", len(script) + 1) != script:
                    directory.write("systemctl", script, 0o755)
                self._boot_bin = inside
        return self._boot_bin or None

    def boot_covers(self):
        """At boot, what each exec's mount namespace gets (systemctl_covers), unless mounts are off."""
        if not self.mounts or not self.boot_bin():
            return []
        return systemctl_covers(self.host.rootpath, self.host.state.subdir("boot-bin").path)

    def finish(self, plan):
        self.batch.flush()  # before the applied position is read, and before a reboot entry's command
        if not plan.noop or self.host.objects_since_success():
            self.host.make_dirs()
            self.release_objects(plan)
        if self.history.applied()[0] >= plan.head.seq:  # not after a reboot entry with more behind it
            self.host.record_success(durable=not plan.noop)

    def reboot(self):
        """Run the configured reboot command on the machine running the agent (not chrooted).

        From the moment it starts, the machine is going down at our request: init stopping the
        agent (SIGTERM from systemd, a SIGHUP or SIGINT) is then the reboot, not an interruption.
        A signal that comes while the command runs waits for its end (killing it could cancel the
        reboot); once it succeeded, they are ignored and the run, which has nothing left to do,
        ends with exit 0, so that the boot unit ends as a success, not as 'failed'.  Ignored, not
        handled: the interpreter puts back the default action of its own handlers as it exits,
        and a SIGTERM then would kill the agent by the signal (systemd: "Failed with result
        'signal'", seen in a real boot)."""
        command = self.config.reboot_argv
        say("rebooting: %s" % self.config.reboot_command)
        caught = []
        previous = dict((signum, signal.signal(signum, lambda signum, frame: caught.append(signum)))
                        for signum in REBOOT_SIGNALS)
        try:
            status = subprocess.call(command, stdin=subprocess.DEVNULL)
        except OSError as e:
            status = e.strerror
        # Killed by the shutdown it asked for: the reboot is under way.
        going_down = bool(caught) and isinstance(status, int) and status < 0
        if status != 0 and not going_down:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            raise StateError("the reboot is recorded as done, but reboot command %r failed (%s): reboot by hand"
                             % (self.config.reboot_command, status))
        for signum in REBOOT_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        return EXIT_OK

    def apply_one(self, entry):
        """Log the transaction's start, then apply it as its kind says; what the run does next, and
        whether a command ran (Transaction.ran)."""
        with os.fdopen(self.host.logs.open(entry, attempt=True), "ab") as log:
            log.write(log_line("[isconf] %s transaction %d %s %s" % (format_time(time.time()), entry.seq,
                                                                     entry.id, entry.summary())))
        environment = exec_environment(self.config.branch, entry.seq, entry.id, self.config.env)
        boot_bin = self.boot_bin()
        if boot_bin:
            environment["PATH"] = boot_bin + ":" + environment["PATH"]
        transaction = Transaction(self.host, entry, environment, self.config.exec_timeout, self.mounts,
                                  self.agent_files, self.boot_covers(), self.launcher)
        return entry.apply(transaction), transaction.ran

    def handover(self, entry, upgraded):
        """The interpreter to re-execute under after this transaction, or None to carry on here:
        after a new agent (its self-test passed), or when the interpreter or its standard library
        changed on disk and this agent passes its self-test under the new one (else a warning).
        Only a command-line run hands over, and never twice after the same transaction."""
        changed = interpreter_identity() != self.interpreter
        if self.argv is None or not sys.executable or not (upgraded or changed):
            return None
        if entry.id in os.environ.get(REEXEC_ENV, "").split(","):
            warn("already re-executed after transaction %d; carrying on in this process" % entry.seq)
            return None
        try:
            python, fallback = next_interpreter(AGENT_PATH)
        except TransactionFailed as e:
            self.interpreter = interpreter_identity()  # warned once; a later change is looked at again
            warn("%s; carrying on in the running one" % e)
            return None
        if changed and not upgraded:
            try:
                self_test_agent(python, AGENT_PATH, self.host.root, self.host.explicit_config)
            except TransactionFailed as e:
                self.interpreter = interpreter_identity()  # warned once; a later change is looked at again
                warn("the interpreter changed on disk, but this agent fails its self-test under it; "
                     "carrying on in the running one: %s" % e)
                return None
        if fallback:
            warn("%s, which this agent runs under, is gone from disk; the next agent runs under %s, %s: start "
                 "isconf by its #! line, not by a versioned interpreter" % (sys.executable, python, fallback))
        return python

    def reexec(self, python, entry):
        """Become the agent at AGENT_PATH under python, with the same arguments and pid, the host
        lock held throughout: its descriptor is inherited and named in $ISCONF_LOCK_FD."""
        say("after transaction %d: re-executing %s under %s" % (entry.seq, AGENT_PATH, python))
        seen = [i for i in os.environ.get(REEXEC_ENV, "").split(",") if i]
        os.environ[REEXEC_ENV] = ",".join(seen + [entry.id])
        os.environ[LOCK_FD_ENV] = str(self.lock.fd)
        if self.run.record is not None:
            os.environ[RUN_ENV] = self.run.record.carry()
        for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
            signal.setitimer(timer, 0)  # interval timers survive execve
        REPORTER.flush()  # what is buffered would be lost
        os.set_inheritable(self.lock.fd, True)
        try:
            os.execv(python, [python, "-I", AGENT_PATH] + list(self.argv))
        except OSError as e:
            os.set_inheritable(self.lock.fd, False)
            os.environ.pop(LOCK_FD_ENV, None)
            os.environ.pop(RUN_ENV, None)
            raise StateError("transaction %d is done, but re-executing %s under %s failed: %s; run 'isconf up' "
                             "again" % (entry.seq, AGENT_PATH, python, e.strerror or e))

    def release_objects(self, plan):
        """Drop staged objects no pending transaction still needs."""
        applied_seq = self.history.applied()[0]
        keep = set(sha for e in interpretable(e for e in plan.entries if e.seq > applied_seq)
                   for sha, _ in e.objects())
        objects = self.host.objects
        for name in objects.listdir():
            if name in keep:
                continue
            try:
                st = os.stat(name, dir_fd=objects.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):  # isconf stages regular files only: what else is here is not ours
                warn("%s is a %s, not an object isconf staged; left alone: move it away"
                     % (objects.file(name), file_kind(st.st_mode)))
                continue
            objects.unlink(name)


# ---------------------------------------------------------------------------
# Reports: what status, its JSON, the metrics, log and the dry run say, each built once as data.
# ---------------------------------------------------------------------------


def host_report(host, history=None, recent=False):
    """What status and log show: the journal entries with their state on this host, from one
    read of its history (history, or read here).  recent: only the entries from the applied one
    on, as a run reads them (the local journal from its end): what pending, failed and waiting
    entries are, at a cost that does not grow with the journal."""
    head = host.local_head()
    history = history or host.history(recent)
    applied_seq, applied_id = history.applied()
    entries = host.local_journal(head, applied_seq if recent else 0)
    baseline_seq = (history.baseline() or (0, None))[0]
    marks = {}  # by id: after a migrate, another branch's seq N is another transaction
    for event in history.events:
        if event["event"] in ("done", "authored", "skipped", "retracted", "failed"):
            marks[event["id"]] = event
    rows = []
    for entry in entries:
        event = marks.get(entry.id)
        if entry.seq <= applied_seq:
            if event and event["event"] in ("done", "authored", "skipped", "retracted"):
                mark = event["event"] if event["event"] in ("skipped", "retracted") else "applied"
            else:  # in the image before isconf ran here
                mark = "baseline" if entry.seq <= baseline_seq else "applied"
        elif event and event["event"] == "failed":
            mark = "failed"
        else:
            mark = "pending"
        rows.append((entry, mark, event))
    return head, rows, applied_seq, applied_id


def run_by(event):
    """Provenance of a done or failed event: the agent version and the interpreter that ran it."""
    if not event or "agent" not in event:
        return None  # skipped, or recorded by an older isconf
    return {"agent": event["agent"], "python": event.get("python"), "python_path": event.get("python_path")}


def last_run_by(history):
    """Provenance of the last transaction this host ran (done or failed), or None."""
    for event in reversed(history.events):
        if event["event"] in ("done", "failed"):
            return run_by(event)
    return None


def lock_holder(host):
    """{"pid", "since"} of the process holding the host lock, or None; read, never taken (a status
    that took it, even for a moment, could make an 'up' starting then exit busy).  The lock file names
    its holder, but a holder killed with SIGKILL leaves its name behind: the kernel's table of flocks
    (/proc/locks) says whether a process still holds the file, and which; without /proc, whether the
    named process is alive."""
    try:
        fd = host.state.open("lock")
    except FileNotFoundError:
        return None
    try:
        ino, text = os.fstat(fd).st_ino, os.pread(fd, 256, 0)
    finally:
        os.close(fd)
    try:
        named = parse_json(text)
    except ValueError:
        named = None
    if not (isinstance(named, dict) and isinstance(named.get("pid"), int) and TIME_RE.match(str(named.get("since")))):
        named = None
    try:
        with open("/proc/locks", "rb") as f:
            table = f.read(4 << 20).decode("ascii", "replace")
    except OSError:
        table = None
    if table is None:
        if named is None:
            return None
        try:
            os.kill(named["pid"], 0)
        except ProcessLookupError:
            return None
        except OSError:  # another user's process: alive
            pass
        return named
    for line in table.splitlines():
        fields = line.split()  # 1: FLOCK  ADVISORY  WRITE 4711 fe:00:2148590 0 EOF  ('->' for a waiter)
        if len(fields) < 6 or fields[1] != "FLOCK" or not ID_RE.match(fields[4]):
            continue
        if fields[5].rpartition(":")[2] == str(ino):
            pid = int(fields[4])
            if named is not None and named["pid"] == pid:
                return named
            return {"pid": pid, "since": None}  # taken a moment ago, not yet named
    return None


STATES = collections.OrderedDict([  # the state status reports: the first that holds, in this order
    ("running", "running now"),
    ("disabled", "disabled ('isconf enable' lifts it)"),
    ("interrupted", "interrupted: a transaction started and never ended; the next 'up' runs it again"),
    ("failed", "halted at a failed transaction"),
    ("needs-newer", "halted: the next transaction needs a newer isconf"),
    ("refused", "refused at the last run"),
    ("unreachable", "no mirror reachable at the last run"),
    ("baseline", "baseline declared, never fetched: run 'isconf up'"),
    ("never-fetched", "never fetched: run 'isconf up'"),
    ("reboot", "waiting for a reboot"),  # status adds reboot_advice: it depends on the root
    ("pending", "transactions pending: run 'isconf up'"),
    ("up-to-date", "up to date"),
])


def status_report(host, recent=False):
    """Where the host stands, from its local state only: the one report that status, status --json and
    the metrics render.  Its fields are documented in README (Monitoring) under STATUS_SCHEMA.  recent:
    for the metrics after every run, read as a run reads (host_report); the skipped, retracted and
    repaired lists, which the metrics do not show, hold only what that read reaches."""
    config = host.config
    # One read of the history: an 'up' appending to it meanwhile cannot make one report mix two states.
    history = host.history(recent)
    head, rows, applied_seq, applied_id = host_report(host, history, recent)
    failed = [(e, ev) for e, mark, ev in rows if mark == "failed"]
    tied, declared = history.baseline(), host.declared_baseline()
    baseline = None
    if tied or declared:  # declared, and not yet verified, until the first fetch ties it to its entry
        baseline = {"seq": tied[0] if tied else declared, "id": tied[1] if tied else None}
    last = host.last_success()
    report = {
        "schema": STATUS_SCHEMA,
        "branch": config.branch, "applied_seq": applied_seq, "applied_id": applied_id,
        "head_seq": head.seq if head else 0, "pending": sum(1 for _, mark, _ in rows if mark in ("pending",
                                                                                                 "failed")),
        "skipped": [{"seq": e.seq, "why": ev.get("why"), "who": ev.get("who")} for e, mark, ev in rows
                    if mark == "skipped"],
        "retracted": [{"seq": e.seq, "id": e.id, "by_seq": ev.get("by_seq"), "by": ev.get("by"),
                       "why": ev.get("why")} for e, mark, ev in rows if mark == "retracted"],
        "failed": None, "last_success": format_time(last) if last else None,
        "last_success_age": int(time.time() - last) if last else None, "insecure": config.insecure,
        "baseline": baseline, "disabled": host.disabled(), "fetched": head is not None,
    }
    if failed:
        entry, event = failed[0]
        log, tail = host.logs.tail(entry, 64 * 1024)
        tail = tail.decode("utf-8", "replace").splitlines()[-20:]  # logs can be huge
        report["failed"] = {"seq": entry.seq, "id": entry.id, "summary": entry.summary(),
                            "error": event.get("error"), "log": log, "log_tail": tail}
    report.update(agent=__version__, last_run_by=last_run_by(history))
    report["needs_newer"] = report["reboot"] = None
    waiting = [e for e, mark, _ in rows if mark == "pending"]
    if waiting and not failed:  # the next transaction is one this version cannot read: halted there
        try:
            holds = waiting[0].holds()  # a state of STATES, with a field of its name in the report
            if holds:
                report[holds] = {"seq": waiting[0].seq, "id": waiting[0].id}
        except NeedsNewer as e:
            report["needs_newer"] = {"seq": waiting[0].seq, "id": waiting[0].id, "kind": waiting[0].kind,
                                     "error": str(e)}
    # The last event (the recent history ends with it): a 'started' that is the run holding the lock, or
    # one that never ended (killed, a power cut); or an 'interrupted', the end of one stopped by a signal.
    events = history.events
    last = events[-1] if events and events[-1]["event"] in ("started", "interrupted") else None
    started = None
    if last is not None:
        start = next((e for e in reversed(events) if e["event"] == "started" and e["id"] == last["id"]), last)
        entry = next((e for e, _, _ in rows if e.id == last["id"]), None)
        # attempts: how many count toward interrupted_max, this one included if it never ended
        # (History.interruptions); at interrupted_max the next 'up' halts it instead.  rebooted: how many of
        # those the machine rebooted during; signal: what stopped this one (null: it never ended); signals:
        # what stopped the attempts that do not count.
        seen = history.interruptions(entry, boot_id()) if entry else {"attempts": 1, "rebooted": 0, "signals": []}
        started = {"seq": last["seq"], "id": last["id"], "summary": entry.summary() if entry else None,
                   "since": start.get("time"), "attempts": seen["attempts"], "rebooted": seen["rebooted"],
                   "signal": last.get("signal") if last["event"] == "interrupted" else None,
                   "signals": seen["signals"]}
    holder = lock_holder(host)
    report["running"] = dict(holder, transaction=started if last and last["event"] == "started" else None) \
        if holder else None
    report["interrupted"] = started if started and not holder else None
    report["last_run"] = last_run(host)
    result = (report["last_run"] or {}).get("result")
    holds = {
        "running": holder, "disabled": report["disabled"], "interrupted": report["interrupted"], "failed": failed,
        "needs-newer": report["needs_newer"], "refused": result == "refused", "unreachable": result == "unreachable",
        "baseline": head is None and baseline, "never-fetched": head is None, "reboot": report["reboot"],
        "pending": report["pending"], "up-to-date": True,
    }
    report["state"] = next(state for state in STATES if holds[state])
    report["verify"] = host.last_verify()
    # The last 'verify --repair' that put something back: its events, one per snap (Repair.record).
    repaired, last = [], None
    for event in reversed(events):
        if event["event"] != "repaired":
            continue
        if last is not None and (event.get("started"), event.get("pid")) != last:
            break
        last = (event.get("started"), event.get("pid"))
        repaired.insert(0, {"seq": event["seq"], "id": event["id"], "time": event.get("time"),
                            "who": event.get("who"), "count": event.get("count"), "paths": event.get("paths")})
    report["repaired"] = repaired
    return report


def repaired_text(event):
    """The paths of a 'repaired' event, as status and log say them: the first few, and how many in all."""
    paths, count = event.get("paths") or [], event.get("count") or 0
    shown = ", ".join(paths[:3]) + (", ..." if count > 3 else "")
    return "%s (%d path%s)" % (shown, count, "s"[count == 1:])


def disabled_text(paused):
    """Who disabled the host, when and why, the latest first, then the earlier reasons 'disable --force' kept."""
    return "; and before, by ".join("%s at %s: %s" % (item["who"], item["time"], item["why"])
                                    for item in [paused] + list(reversed(paused.get("earlier", []))))


def age(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def status_text(report, interrupted_max, advice=None):
    """The lines of 'status' for a status report; advice: what to do at a reboot entry (reboot_advice)."""
    lines = []
    advice = advice or reboot_advice("/", DEFAULT_REBOOT)
    state = STATES[report["state"]]
    if report["state"] == "reboot":
        state += ": " + advice
    run, interrupted, last = report["running"], report["interrupted"], report["last_run"]
    if report["state"] in ("refused", "unreachable") and last.get("reason"):
        state += ": " + last["reason"]
    lines.append("state:        %s" % state)
    lines.append("branch:       %s%s" % (report["branch"], "  (INSECURE: signatures not checked)" if report["insecure"]
                                         else ""))
    lines.append("applied:      seq %d  %s" % (report["applied_seq"], report["applied_id"][:16]))
    baseline = report["baseline"]
    if baseline:
        lines.append("baseline:     seq %d  %s" % (baseline["seq"], baseline["id"][:16] if baseline["id"] else
                                                   "(declared; checked at the first fetch)"))
    if report["disabled"]:
        paused = report["disabled"]
        lines.append("DISABLED:     by %s at %s: %s ('isconf enable' lifts it)" % (paused["who"], paused["time"],
                                                                                   paused["why"]))
        for item in reversed(paused["earlier"]):
            lines.append("              and before, by %s at %s: %s" % (item["who"], item["time"], item["why"]))
    if run:
        doing = run["transaction"]
        lines.append("running:      pid %d since %s%s" % (run["pid"], run["since"] or "a moment ago",
                                                          ", transaction %d %s" % (doing["seq"], doing["summary"])
                                                          if doing else ""))
    if interrupted:
        said = ["started %s, %s" % (interrupted["since"], "stopped by %s" % interrupted["signal"]
                                    if interrupted["signal"] else "never ended")]
        if interrupted["signals"]:
            said.append("stopped by a signal %s without a reboot, not counted (%s)"
                        % (plural(len(interrupted["signals"]), "time"), ", ".join(sorted(set(interrupted["signals"])))))
        said.append("interrupted %d of %d times%s" % (interrupted["attempts"], interrupted_max,
                                                     ", the machine rebooting during %d" % interrupted["rebooted"]
                                                     if interrupted["rebooted"] else ""))
        lines.append("INTERRUPTED:  seq %d %s (%s: the next 'up' %s)"
                     % (interrupted["seq"], interrupted["summary"], "; ".join(said),
                        "halts it" if interrupted["attempts"] >= interrupted_max else "runs it again"))
    if report["fetched"]:
        lines.append("pending:      %d (verified head at seq %d)" % (report["pending"], report["head_seq"]))
    else:
        lines.append("pending:      unknown: never fetched")
    if report["reboot"]:
        lines.append("reboot:       seq %d is a reboot: %s" % (report["reboot"]["seq"], advice))
    lines.append("last success: %s" % ("%s (%s ago)" % (report["last_success"], age(report["last_success_age"]))
                                       if report["last_success"] else "never"))
    if last:
        lines.append("last run:     %s, exit %d (%s) after %.1f s, %d applied, %d bytes fetched%s"
                     % (last["end"], last["exit_code"], last.get("result"), last["duration"], last.get("applied", 0),
                        last.get("fetched_bytes", 0), ": " + last["reason"] if last.get("reason") else ""))
    verified = report.get("verify")
    if verified:
        lines.append("verified:     %s%s: %s" % (verified["time"], " (--quick)" if verified.get("quick") else "",
                                                  "%d of %d journaled paths drifted: run 'isconf verify --repair'"
                                                  % (verified["drift_paths"], verified["paths"])
                                                  if verified["drift_paths"] else
                                                  "no drift in %s" % plural(verified["paths"], "journaled path")))
    for item in report.get("repaired", []):
        lines.append("repaired:     %s by %s: %s from seq %d" % (item["time"], item["who"], repaired_text(item),
                                                                 item["seq"]))
    for item in report["retracted"]:
        lines.append("retracted:    seq %d by seq %s: %s" % (item["seq"], item["by_seq"], item["why"]))
    for item in report["skipped"]:
        lines.append("skipped:      seq %d by %s: %s" % (item["seq"], item["who"], item["why"]))
    if report["failed"]:
        failure = report["failed"]
        lines.append("FAILED:       seq %d %s" % (failure["seq"], failure["summary"]))
        lines.append("              %s" % failure["error"])
        lines.append("log %s:" % failure["log"])
        for line in failure["log_tail"]:
            lines.append("    " + line)
    if report["needs_newer"]:
        lines.append("HALTED:       seq %d needs a newer isconf" % report["needs_newer"]["seq"])
        lines.append("              %s" % report["needs_newer"]["error"])
    return lines


METRICS = [  # (name, help, the value from a status report)
    ("isconf_last_run_timestamp_seconds", "When the last 'isconf up' ended (Unix time).",
     lambda r, run: parse_time(run["end"]) if run else 0),
    ("isconf_last_run_exit_code", "Exit code of the last 'isconf up' (see README, Exit codes).",
     lambda r, run: run["exit_code"] if run else 0),
    ("isconf_last_run_duration_seconds", "How long the last 'isconf up' took.",
     lambda r, run: run["duration"] if run else 0),
    ("isconf_last_run_applied_transactions", "Transactions the last 'isconf up' applied.",
     lambda r, run: run.get("applied", 0) if run else 0),
    ("isconf_last_run_fetched_bytes", "Bytes the last 'isconf up' fetched (head, journal, objects).",
     lambda r, run: run.get("fetched_bytes", 0) if run else 0),
    ("isconf_last_success_timestamp_seconds", "When an 'isconf up' last ended with nothing left to apply "
     "(Unix time; 0: never).", lambda r, run: parse_time(r["last_success"]) if r["last_success"] else 0),
    ("isconf_applied_seq", "Seq of the last transaction applied (or skipped, or in the baseline).",
     lambda r, run: r["applied_seq"]),
    ("isconf_head_seq", "Seq of the last head this host verified.", lambda r, run: r["head_seq"]),
    ("isconf_pending_transactions", "Verified transactions not yet applied.", lambda r, run: r["pending"]),
    ("isconf_failed_seq", "Seq of the failed transaction the host is halted at (0: none).",
     lambda r, run: r["failed"]["seq"] if r["failed"] else 0),
    ("isconf_disabled", "1 while 'isconf disable' pauses the host.", lambda r, run: 1 if r["disabled"] else 0),
    ("isconf_drift_paths", "Journaled paths the last 'isconf verify' found drifted (0: none, or never verified).",
     lambda r, run: r["verify"]["drift_paths"] if r["verify"] else 0),
]


def metric_label(value):
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def render_metrics(report):
    """The status report in Prometheus' text format, for node_exporter's textfile collector."""
    run, lines = report["last_run"], []
    for name, text, value in METRICS:
        try:
            number = value(report, run)
        except KeyError:  # a report of damaged state holds the last run alone
            continue
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s gauge" % name, "%s %s" % (name, number)]
    if "state" not in report:
        return ("\n".join(lines) + "\n").encode("utf-8")
    lines += ["# HELP isconf_info The agent's version, the branch and the applied entry's id (one query shows which "
              "hosts share an identical history).", "# TYPE isconf_info gauge",
              'isconf_info{version="%s",branch="%s",applied_id="%s"} 1'
              % (metric_label(__version__), metric_label(report["branch"]), metric_label(report["applied_id"])),
              "# HELP isconf_state The host's state as 'isconf status' names it (README, status).",
              "# TYPE isconf_state gauge"]
    lines += ['isconf_state{state="%s"} %d' % (state, state == report["state"]) for state in STATES]
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_metrics(host, path, report, durable=True):
    """Replace the metrics file atomically (the collector never reads half of one), reached inside the
    root as the host's other files are: never through a link at its name, only over a regular file.
    Not durable after an up-to-date run, as its last-run record (RunRecord.save)."""
    where = host.rootpath.resolve(posixpath.dirname(path))
    try:
        directory = StateDir(host.rootpath.open_dir(posixpath.dirname(path)), where)
    except OSError as e:
        raise StateError("metrics directory %s: %s; make it (node_exporter's --collector.textfile.directory) or "
                         "change the path with 'isconf init --force --metrics PATH'" % (where, e.strerror))
    try:
        directory.write(posixpath.basename(path), render_metrics(report), 0o644, durable=durable)
    finally:
        directory.close()


def fetched_bytes(plan, sync):
    """What a sync fetched: the head, and when it was new its signature and the journal's new bytes,
    and the objects it staged."""
    return len(plan.head.data) + len(plan.signature or b"") + len(plan.tail or b"") + sync.staged_bytes


class ObjectBytes(object):
    """Objects' bytes for the dry run's diffs, in memory only (a dry run writes nothing): a staged copy whose
    hash is right, else one fetched from the mirrors (Sync.from_any_mirror), checked against the signed
    journal.  Only the last one is kept: the paths of one file's hard links ask for it in turn."""

    def __init__(self, host, sync):
        self.objects, self.sync, self.last = host.objects, sync, (None, None)

    def __call__(self, sha, size):
        if self.last[0] != sha:
            self.last = (sha, self.read(sha, size))
        return self.last[1]

    def read(self, sha, size):
        staged = self.objects.stat(sha)
        if staged is not None and staged.st_size == size:
            data = self.objects.read(sha, size)
            if sha256_hex(data) == sha:
                return data
        return self.sync.from_any_mirror(lambda mirror: self.fetch(mirror, sha, size))

    @staticmethod
    def fetch(mirror, sha, size):
        data = mirror.fetch("objects/" + sha, size).body
        if len(data) != size or sha256_hex(data) != sha:
            raise Refused("object %s from %s does not match the signed journal; the mirror holds a damaged or "
                          "swapped file" % (sha[:16], mirror))
        return data


def pending_changes(host, entry, fetch, written):
    """What a pending entry would change on the disk, path by path (FileType.changes_of), against the disk as
    it is now; a path an earlier pending entry writes first (written: path -> its seq) says so."""
    files = entry.installs()
    look = Look(host.rootpath, Owners(host.rootpath), FileType.last_records([files]), False)
    changes = []
    for record in files:
        if record["path"] in written:
            changes.append({"path": record["path"], "what": "earlier", "before": written[record["path"]],
                            "after": None, "diff": None, "note": None})
        changes.extend(FileType.changes_of(look, record, fetch))
        written.setdefault(record["path"], entry.seq)
    return changes


# How the dry run names each part of a new path (FileType.describe), in this order.
NEW_PATH_DETAILS = (("target", "-> %s"), ("hardlink", "a hard link of %s"), ("mode", "mode %s"),
                    ("owner", "owner %s"), ("group", "group %s"), ("size", "%d bytes"), ("sha256", "sha256 %s"))


def change_text(change):
    """The lines of one change as the dry run shows it (pending_changes)."""
    what, before, after = change["what"], change["before"], change["after"]
    if what in ("new", "type"):
        details = ", ".join([text % after[key] for key, text in NEW_PATH_DETAILS if key in after] +
                            [change.get("note")] * bool(change.get("note")))
        head = ("new %s" % after["type"] if what == "new" else "type change: %s -> %s" % (before, after["type"]))
        line = "%s: %s%s" % (change["path"], head, " (%s)" % details if details else "")
    elif what == "content" and change["diff"] is None:
        if before is None:
            line = "%s: content changes (%s)" % (change["path"], change["note"])
        else:
            line = "%s: content (%s): %s -> %s" % (change["path"], change["note"], "%s, %d bytes, sha256 %s" % (
                before["type"], before["size"], before["sha256"] or "not read"), "%s, %d bytes, sha256 %s" % (
                after["type"], after["size"], after["sha256"]))
    elif what == "content":
        line = "%s: content" % change["path"]
    elif what == "earlier":
        line = "%s: written by transaction %d first; shown against the disk as it is now" % (change["path"], before)
    elif what == "hardlink":
        line = "%s: becomes a hard link of %s" % (change["path"], after)
    elif what == "unreadable":
        line = "%s: cannot be read: %s" % (change["path"], before)
    else:
        line = "%s: %s %s -> %s" % (change["path"], "link target" if what == "target" else what, before, after)
    return [line] + ["  " + diff for diff in (change.get("diff") or "").splitlines()]


def dry_run(run, plan, sync, args):
    """What 'up' would do: the transactions in order as it would take them (skipping the retracted), up to
    where it would stop (a reboot entry without -r, a halt, an entry this version cannot interpret), with
    a mark on one that failed at its last attempt, and the objects they need, from a verified journal;
    with args.diff, what each snap would change on the disk.  Nothing is applied, staged or recorded.
    EXIT_PENDING when something would run."""
    host, history = run.host, run.history
    known = interpretable(plan.pending)
    objects, seen = [], set()
    for entry in known:
        for sha, size in entry.objects():
            if sha not in seen:
                seen.add(sha)
                st = host.objects.stat(sha)
                objects.append({"sha": sha, "size": size, "staged": st is not None and st.st_size == size})
    waiting = plan.pending[len(known)] if len(known) < len(plan.pending) else None
    retracted, fetch, written = retractions(plan.pending), ObjectBytes(host, sync), {}
    transactions, stop = [], None
    for entry in plan.pending:
        item = {"seq": entry.seq, "id": entry.id, "kind": entry.kind, "summary": entry.summary(),
                "action": "not-reached", "failed_last_run": None, "changes": None}
        transactions.append(item)
        if stop is not None:
            continue
        retraction = retracted.get((entry.seq, entry.id))
        if retraction is not None:
            item.update(action="retracted", by_seq=retraction.seq)
            continue
        try:  # as Applier.apply_in_order takes it
            waits = entry.waits(args.reboot)
            if waits is not None:
                waits = waiting_message(entry, waits, host.root, run.config.reboot_command)
        except NeedsNewer as e:
            waits = EXIT_NEWER, str(e)
        interrupted = history.interruptions(entry, boot_id())
        if waits is None and interrupted["attempts"] >= run.config.interrupted_max:
            waits = EXIT_FAILED, "transaction %d halts: started %s without ending (interrupted_max %d)" % (
                entry.seq, plural(interrupted["attempts"], "time"), run.config.interrupted_max)
        if waits is not None:
            item["action"] = "stop"
            stop = {"seq": entry.seq, "exit_code": waits[0], "message": waits[1]}
            continue
        item["action"] = "apply"
        last = history.last(entry)
        if last is not None and last["event"] == "failed":
            status = last.get("status")  # a damaged record's of another type is not shown as one
            item["failed_last_run"] = {"time": last["time"], "error": last.get("error"),
                                       "status": status if isinstance(status, int) else None}
        if args.diff and entry.installs():
            item["changes"] = pending_changes(host, entry, fetch, written)
        if entry.ends_run():
            stop = {"seq": entry.seq, "exit_code": EXIT_OK, "message": "transaction %d ends the run: what follows "
                    "waits for the next 'up'" % entry.seq}
    report = {
        "schema": STATUS_SCHEMA, "branch": plan.head.branch, "head_seq": plan.head.seq,
        "applied_seq": plan.head.seq - len(plan.pending), "transactions": transactions, "stop": stop,
        "objects": objects, "fetch_bytes": sum(o["size"] for o in objects if not o["staged"]),
        "needs_newer": waiting.seq if waiting is not None else None,
    }
    if args.json:
        emit(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        for item in transactions:
            failed = item["failed_last_run"]
            mark = "" if failed is None else " (failed last run: %s)" % (
                "exit %d" % failed["status"] if failed["status"] is not None else failed["error"])
            if item["action"] == "apply":
                show("would apply %d %s%s" % (item["seq"], item["summary"], mark))
            elif item["action"] == "retracted":
                show("would skip %d %s (retracted by %d)" % (item["seq"], item["summary"], item["by_seq"]))
            elif item["action"] == "stop":
                show("would stop at %d %s" % (item["seq"], item["summary"]))
            for change in item["changes"] or ():
                for line in change_text(change):
                    show("  " + line)
            if item["changes"] == []:
                show("  (no change on disk)")
        if stop is not None:
            after = plan.head.seq - stop["seq"]
            show("  %s%s" % (stop["message"], "; %d more after it not reached" % after if after else ""))
        for item in objects:
            show("  object %s %d bytes%s" % (item["sha"], item["size"], " (staged)" if item["staged"] else ""))
        show("isconf: %d pending on branch %s, %d bytes to fetch (dry run: nothing applied)"
             % (len(plan.pending), plan.head.branch, report["fetch_bytes"]))
    # 11 only if a plain 'up' would change something: not for a pending reboot entry it stops at without -r
    acts = any(item["action"] in ("apply", "retracted") for item in report["transactions"])
    return EXIT_PENDING if acts else EXIT_OK


# ---------------------------------------------------------------------------
# The agent, one run: sync, apply, and record the result whatever it was.
# ---------------------------------------------------------------------------


def parse_now(text):
    if text is None:
        return None
    try:
        return parse_time(text, "--now")
    except Refused as e:
        raise UsageError(str(e))


def refresh_metrics(host, reason=None, durable=True):
    """Write the metrics file, when the config names one, from the report status gives: after every
    run, and after each verb that changes what it shows (disable, enable, skip, verify), the host lock
    let go (else the report says 'running').  A failure is a warning (unless reason, a run's own error,
    says it already): the change itself is made."""
    try:
        metrics = host.config.metrics
        if metrics:
            try:
                report = status_report(host, recent=True)
            except (IsconfError, OSError):  # damaged state: still this run's result, and what can be read
                report = {"last_run": last_run(host)}
            write_metrics(host, metrics, report, durable)
    except (IsconfError, OSError) as e:
        if str(e) != reason:  # the run's own error says it already
            warn("metrics not written: %s" % e)


def finish_run(host, record, code, reason=None):
    """Record the run's result, then write the metrics from the report status gives.  After a run that
    went well, a record that cannot be written (a link where last-run belongs) is the run's error;
    after one that did not, it is a warning, and the run's own error is the one reported."""
    try:
        host.state  # noqa: B018 -- opened with every check a run makes
    except IsconfError:
        if code == EXIT_OK:
            raise
        return  # no state of ours to record in (not initialised, or refused): the run's error says so
    durable = not (record.noop and code == EXIT_OK)
    try:
        record.save(host, code, reason, durable)
    except (IsconfError, OSError) as e:
        if code == EXIT_OK:
            raise
        warn("the result of this run was not recorded: %s" % e)
        return
    refresh_metrics(host, reason, durable)


def up(args, host, record):
    host.check_agent_file()
    if args.boot or args.syslog:
        REPORTER.syslog.open(host.rootpath)
    if args.splay is not None and not os.environ.get(REEXEC_ENV):  # a re-exec does not wait again
        splay(host, args.splay)  # before the lock: a waiting host holds nothing
        if record is not None:
            record.restart()  # the run's duration is its work, not the sleep
    with host.lock(args.wait) as lock:
        # objects/ and logs/ are made and opened once the run stages or applies something (make_dirs), or
        # for a dry run, which reads staged objects: an up-to-date run only checks them.
        ensure_state(host, dirs=args.dry_run)
        paused = host.disabled()
        if paused:
            raise Disabled("this host was disabled by %s; nothing applied until 'isconf enable'"
                           % disabled_text(paused))
        run = Run(host, parse_now(args.now))
        run.record = record
        # The interpreter and agent files are known as this process started, before any wait.
        applier = Applier(run, mounts=not args.no_mounts, lock=lock, argv=args.argv, boot=args.boot)
        sync = Sync(run)
        plan = sync.sync(stage=not args.dry_run, wait=boot_wait(args, run.config))
        if args.dry_run:
            return dry_run(run, plan, sync, args)
        record.fetched += fetched_bytes(plan, sync)
        plan.commit(host)
        if not plan.pending:
            say("branch %s is up to date at seq %d" % (plan.head.branch, plan.head.seq))
            record.noop = plan.noop
        code = applier.apply(plan, allow_reboot=args.reboot)
        if code == EXIT_OK and plan.pending:
            say("applied through seq %d" % run.history.applied()[0])
        return code


def recorded_up(args, host):
    """One run, its result recorded in the state and the metrics whatever it was (a dry run records
    nothing): the record is written after the run let go of the host lock, or never held it (busy)."""
    if args.dry_run:
        return up(args, host, None)
    record = RunRecord()
    try:
        code = up(args, host, record)
    except IsconfError as e:
        finish_run(host, record, e.exit_code, str(e))
        raise
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        finish_run(host, record, EXIT_SIGNAL + signum, "interrupted by %s" % signal.Signals(signum).name)
        raise
    except OSError as e:  # as main reports it: a local problem (a full disk), not a bug
        finish_run(host, record, EXIT_OK if isinstance(e, BrokenPipeError) else EXIT_STATE, str(e))
        raise
    except Exception as e:  # noqa: B902 -- a bug: recorded as one, then reported by main
        finish_run(host, record, EXIT_SOFTWARE, "internal error: %s: %s" % (type(e).__name__, str(e)[:300]))
        raise
    finish_run(host, record, code)
    return code


# ---------------------------------------------------------------------------
# Repair: drifted paths put back as the journal last made them ('verify --repair').
# ---------------------------------------------------------------------------


def snapped_by(rows):
    """path -> the applied snap entry (of host_report's rows) whose record 'verify' holds the path to."""
    by = {}
    for entry in applied_entries(rows):
        for record in entry.installs():
            by[record["path"]] = entry
    return by


def named_after(rows, path, after):
    """The first entry applied after seq after that names path beside what it installs (Kind.names: an
    exec whose arguments name it), or None: what it did, not the snap, may be the journal's last word on
    the path ('rm PATH', 'sed -i ... PATH'), which a repair from the snap would undo."""
    for entry in applied_entries(rows):
        if entry.seq > after and entry.names(path):
            return entry
    return None


def clear_way(rootpath, record):
    """Remove an empty directory where the record is of another type (no rename replaces it); one that
    holds anything is left as it is (StateError)."""
    if record["type"] == Directory.name:
        return
    try:
        dfd, name = rootpath.parent(record["path"])
    except FileNotFoundError:
        return
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
            os.rmdir(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise StateError("a directory holding files stands where the journal has a %s: move it away and "
                         "repair again" % FILE_TYPES[record["type"]].label)
    finally:
        os.close(dfd)


def bounded_names(paths):
    """The first of paths whose names fit in REPAIR_NAMES_MAX bytes: a history record stays small."""
    kept, size = [], 0
    for path in paths:
        size += len(path.encode("utf-8", "surrogateescape")) + 4
        if size > REPAIR_NAMES_MAX:
            break
        kept.append(path)
    return kept


class Repair(object):
    """'verify --repair': each drifted path (of asked, or all) put back under the host lock as the last
    applied snap recorded it, through the install a snap uses (FileType.install_record), from staged
    objects verified by hash (Sync.stage_any fetches the pruned ones first: nothing is installed unless
    all verified).  A path no applied snap records, or one an exec after its snap names, is out of reach.
    Its results: repaired (paths), left ([(path, why)]), still (drifts of every journaled path after),
    files (journaled_files), applied_seq; 'repaired' events in the history, by snap."""

    def __init__(self, host, asked, quick, who):
        self.host, self.asked, self.quick, self.who = host, asked, quick, who
        self.repaired, self.left, self.still, self.files, self.applied_seq = [], [], [], {}, 0
        self.started = format_time(time.time())

    def run(self):
        host = self.host
        host.check_agent_file()
        with host.lock():
            ensure_state(host)
            paused = host.disabled()
            if paused:
                raise Disabled("this host was disabled by %s; nothing is repaired until 'isconf enable'"
                               % disabled_text(paused))
            history = host.history()
            if history.events and history.events[-1]["event"] in ("started", "interrupted"):
                raise StateError("transaction %d started and never ended; run 'isconf up' to finish it, then "
                                 "repair" % history.events[-1]["seq"])
            _, rows, self.applied_seq, _ = host_report(host, history)
            self.files = files = journaled_files(rows)
            sources = snapped_by(rows)
            drifts = disk_drifts(host.rootpath, files, self.quick)
            records = self.chosen(rows, sources, set(d["path"] for d in drifts))
            touched = set(path for path, _ in records)
            try:
                self.install(rows, sources, records)
            finally:
                self.record(history, sources)
            self.still = sorted([d for d in drifts if d["path"] not in touched]
                                + disk_drifts(host.rootpath, files, False, touched), key=lambda d: d["path"])
            host.record_verify(len(set(d["path"] for d in self.still)), len(files), self.quick)
        return self

    def chosen(self, rows, sources, drifted):
        """[(path, record to install)] in journal order: the drifted paths asked for within reach, with
        what hard links tie to them (a link's drifted file first; the links of a file that gets a new inode)."""
        files, left = self.files, self.left
        for path in self.asked or []:
            if path not in files:
                left.append((path, "no snap this host applied records it (an exec's work, or not the journal's): "
                                   "out of repair's reach"))
        chosen = set(p for p in drifted if self.asked is None or p in self.asked)
        for _ in range(2):
            for path in files:
                target = FileType.shared_with(files, path)
                if target is not None and path in chosen and target in drifted:
                    chosen.add(target)
                if target is not None and target in chosen:
                    chosen.add(path)
        out = {}
        for path in sorted(chosen):
            entry = sources[path]
            writer = named_after(rows, path, entry.seq)
            if writer is not None:
                out[path] = ("%s %d, applied after its snap (seq %d), names it: the journal may last have changed "
                             "it there, out of repair's reach (snap it again to make a snap its reference)"
                             % (writer.kind, writer.seq, entry.seq))
            elif self.host.writes_state(path):
                out[path] = "leads into this host's state directory, which no journal entry may write"
        for path in sorted(chosen):
            target = FileType.shared_with(files, path)
            if path not in out and target in out:
                out[path] = "a hard link of %s, which is not repaired" % target
        left.extend(sorted(out.items()))
        order = {}
        for entry in set(sources.values()):
            for number, record in enumerate(entry.installs()):
                order[(entry.id, record["path"])] = number
        keep = sorted((p for p in chosen if p not in out), key=lambda p: (sources[p].seq, order[(sources[p].id, p)]))
        return [(path, FileType.repair_record(files, path)) for path in keep]

    def install(self, rows, sources, records):
        host = self.host
        objects, staged = host.objects, host.staged
        needed = dict(need for _, record in records for need in FILE_TYPES[record["type"]].objects(record))
        before = set(objects.listdir())
        pending = interpretable(e for e, mark, _ in rows if mark in ("pending", "failed"))
        keep = set(sha for e in pending for sha, _ in e.objects())
        # What was staged before stays staged, and what pending transactions need: the rest of what the
        # repair fetched is moved into place at its last install (write_copy).
        staged.count(sha for _, record in records for sha, _ in FILE_TYPES[record["type"]].objects(record))
        staged.count(before | keep)
        try:
            if needed:
                Sync(Run(host)).stage_any(needed)  # every object verified before anything is installed
            site, agent = Site(host.rootpath, Owners(host.rootpath), staged), agent_files()
            for path, record in records:
                transaction = Transaction(host, sources[path], {}, None, False, agent)
                try:
                    clear_way(host.rootpath, record)
                    if record["type"] == RegularFile.name and transaction.is_agent(path):
                        transaction.try_agent(path, lambda dfd, name: FILE_TYPES[RegularFile.name].write_copy(
                            staged, dfd, name, record, (os.getuid(), os.getgid()), 0o600))
                    FileType.install_record(site, record)
                except (OSError, OverflowError, TransactionFailed, StateError) as e:
                    self.left.append((path, "cannot install it: %s" % (getattr(e, "strerror", None) or e)))
                    continue
                self.repaired.append(path)
        finally:  # what was fetched for this alone goes, as an 'up' prunes what it applied
            for sha in needed:
                if sha not in before and sha not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        objects.unlink(sha)

    def record(self, history, sources):
        """One 'repaired' event per snap the repaired paths came from: its seq and id, the paths (as many
        as REPAIR_NAMES_MAX holds), their count, who, and when and by which process the repair started
        (the events of one repair share them)."""
        by_entry = collections.OrderedDict()
        for path in self.repaired:
            by_entry.setdefault(sources[path], []).append(path)
        for entry, paths in by_entry.items():
            history.record("repaired", entry, paths=bounded_names(paths), count=len(paths), who=self.who,
                           started=self.started, pid=os.getpid())


# ---------------------------------------------------------------------------
# Installing the agent and the units that run it at boot and periodically.
# ---------------------------------------------------------------------------


# What install writes.  Every file says who wrote it, and none carries a time or a
# version: a second install of the same agent with the same options changes nothing.
INSTALL_KINDS = (("systemd", "a systemd oneshot service running 'up -r --boot' at boot"),
                 ("timer", "a systemd timer running 'up' periodically"),
                 ("sysv", "an LSB init script running 'up -r --boot' at boot, linked into rc2.d to rc5.d"),
                 ("cron", "an /etc/cron.d entry running 'up --splay' every 30 minutes"))
WRITTEN_BY = "# Written by 'isconf install'; 'isconf uninstall' removes it.\n"
BOOT_SERVICE = WRITTEN_BY + """\
[Unit]
Description=isconf: replay this host's journal at boot
Wants=network-online.target
After=network-online.target
%(mounts)s
[Service]
Type=oneshot
ExecStart=%(agent)s up -r --boot
# boot_wait (%(wait)d s) for a mirror, plus time to fetch and apply: never held for ever.
TimeoutStartSec=%(timeout)d
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""
PERIODIC_SERVICE = WRITTEN_BY + """\
[Unit]
Description=isconf: replay this host's journal (periodic run, started by isconf-update.timer)
Wants=network-online.target
After=network-online.target isconf.service
%(mounts)s
[Service]
Type=oneshot
# Without -r: a reboot entry waits for the next boot, where isconf.service takes it.
ExecStart=%(agent)s up --periodic
# 5: a reboot entry waits for the next boot (status and the metrics show it); 6: the boot run (or an admin's)
# is still at work; 9: the host is paused (isconf disable). States, not failures.
SuccessExitStatus=5 6 9
TimeoutStartSec=%(timeout)d
"""
PERIODIC_TIMER = WRITTEN_BY + """\
[Unit]
Description=isconf: replay this host's journal periodically

[Timer]
OnBootSec=15min
OnUnitInactiveSec=30min
RandomizedDelaySec=10min
AccuracySec=1min
Persistent=true
Unit=isconf-update.service

[Install]
WantedBy=timers.target
"""
SYSV_SCRIPT = """\
#!/bin/sh
### BEGIN INIT INFO
# Provides:          isconf
# Required-Start:    $network $remote_fs $syslog
# Required-Stop:
# Should-Start:      $named $time
# Default-Start:     2 3 4 5
# Default-Stop:
# Short-Description: replay this host's isconf journal at boot
# Description:       Fetches, verifies and applies the pending transactions of this
#                    host's isconf branch, waiting up to boot_wait for a mirror.
### END INIT INFO
""" + WRITTEN_BY + """\
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

case "$1" in
    start) %(agent)s up -r --boot ;;
    stop|restart|force-reload) exit 0 ;;
    status) exec %(agent)s status ;;
    *) echo "Usage: $0 {start|stop|status}" >&2; exit 3 ;;
esac
"""
CRON_ENTRY = WRITTEN_BY + """\
SHELL=/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Every 30 minutes, each host at its own minute (--splay); errors reach syslog and cron's mail; a host
# busy, disabled or waiting for a reboot is a state, said in syslog only (--periodic).
*/30 * * * * root %(agent)s up --splay 1500 --periodic --syslog >/dev/null
"""
SYSV_RUNLEVELS = (2, 3, 4, 5)
InstallItem = collections.namedtuple("InstallItem", "path data mode link")


def running_agent():
    """The bytes of the file this agent runs from."""
    with open(os.path.abspath(__file__), "rb") as f:
        return f.read()


def default_install_kinds(rootpath):
    """systemd's units where the root has systemd, else an init script and cron."""
    for path in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd", "/etc/systemd"):
        try:
            if os.path.lexists(rootpath.resolve(path)):
                return ["systemd", "timer"]
        except OSError:
            continue
    return ["sysv", "cron"]


def mirror_mounts(config):
    """The directories of the config's file-share mirrors (a directory or a file:// URL): the units
    wait for the mounts that hold them (RequiresMountsFor=), as they wait for the network."""
    found = []
    for url in config.urls if config else ():
        try:
            directory = Mirror(url).directory
        except UsageError:
            continue  # 'up' says what is wrong with it
        if directory and directory not in found:
            found.append(directory)
    return found


def unit_path(path):
    """A path as a unit file's list of paths takes it: quoted if it holds a space or a quote, and
    '%' doubled, which would otherwise start a specifier."""
    path = path.replace("%", "%%")
    if re.search(r'[\s"\\\']', path):
        path = '"%s"' % path.replace("\\", "\\\\").replace('"', '\\"')
    return path


def install_items(kinds, boot_wait, agent, mounts=()):
    """Every file and link install writes for kinds, in the order it writes them; mounts, the
    directories the agent reads mirrors from."""
    values = {"agent": INSTALL_PATH, "wait": boot_wait, "timeout": boot_wait + BOOT_MARGIN,
              "mounts": "RequiresMountsFor=%s\n" % " ".join(unit_path(m) for m in mounts) if mounts else ""}
    items = [InstallItem(INSTALL_PATH, agent, 0o755, None)]
    if "systemd" in kinds:
        items += [InstallItem("/etc/systemd/system/isconf.service", (BOOT_SERVICE % values).encode(), 0o644, None),
                  InstallItem("/etc/systemd/system/multi-user.target.wants/isconf.service", None, None,
                              "/etc/systemd/system/isconf.service")]
    if "timer" in kinds:
        items += [InstallItem("/etc/systemd/system/isconf-update.service", (PERIODIC_SERVICE % values).encode(),
                              0o644, None),
                  InstallItem("/etc/systemd/system/isconf-update.timer", PERIODIC_TIMER.encode(), 0o644, None),
                  InstallItem("/etc/systemd/system/timers.target.wants/isconf-update.timer", None, None,
                              "/etc/systemd/system/isconf-update.timer")]
    if "sysv" in kinds:
        items.append(InstallItem("/etc/init.d/isconf", (SYSV_SCRIPT % values).encode(), 0o755, None))
        # The agent starts no program, so not update-rc.d: it writes the links update-rc.d would.
        items += [InstallItem("/etc/rc%d.d/S20isconf" % level, None, None, "../init.d/isconf")
                  for level in SYSV_RUNLEVELS]
    if "cron" in kinds:
        items.append(InstallItem("/etc/cron.d/isconf", (CRON_ENTRY % values).encode(), 0o644, None))
    return items


def install_item(rootpath, item):
    """Write one item inside the root unless it is already so; whether it was written."""
    dfd, name = rootpath.parent(item.path, create=True)
    try:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise misplaced(item.path, file_kind(st.st_mode), "file")
        if item.link is not None:
            if st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dfd) == item.link:
                return False
            replace_at(dfd, name, lambda tmp: os.symlink(item.link, tmp, dir_fd=dfd))
            return True
        if st is not None and stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == item.mode:
            if st.st_size == len(item.data) and read_file(item.path, len(item.data), dfd) == item.data:
                return False
        atomic_write(item.path, item.data, item.mode, dir_fd=dfd)
        return True
    finally:
        os.close(dfd)


def installed_as(rootpath, path, want):
    """Whether path inside the root is still exactly what install wrote there (want: its manifest record)."""
    try:
        st = rootpath.lstat(path)
    except FileNotFoundError:
        return None
    if "link" in want:
        return stat.S_ISLNK(st.st_mode) and rootpath.readlink(path) == want["link"]
    if not stat.S_ISREG(st.st_mode) or st.st_size != want["size"]:
        return False
    with rootpath.open_file(path) as f:
        return sha256_hex(f.read(want["size"] + 1)) == want["sha256"]


def manifest_record(item):
    if item.link is not None:
        return {"link": item.link}
    return {"sha256": sha256_hex(item.data), "size": len(item.data)}


def manifest_shape(path, want):
    """Whether (path, want) is a record manifest_record writes: an absolute path, and a link's target or
    a file's hash and size."""
    try:
        validate_path(path)
    except Refused:
        return False
    if not isinstance(want, dict):
        return False
    if set(want) == {"link"}:
        return isinstance(want["link"], str)
    return (set(want) == {"sha256", "size"} and isinstance(want["sha256"], str) and HEX64_RE.match(want["sha256"])
            and type(want["size"]) is int and 0 <= want["size"] <= INT_MAX)


def read_manifest(host):
    """What install wrote, by path: kept in the state directory so uninstall removes that and nothing else.
    Damage is a state error (exit 7), whatever its shape: not JSON, not canonical, a field of another type."""
    try:
        data = host.state.read("installed", RECORD_MAX)
    except FileNotFoundError:
        return {}
    try:
        records, why = parse_canonical(data, "its text").get("installed"), "not the records 'install' writes"
    except Refused as e:
        records, why = None, str(e).split(";")[0]
    if not (isinstance(records, dict) and all(manifest_shape(path, want) for path, want in records.items())):
        raise StateError("%s is damaged (%s); remove it and the files 'install' wrote by hand"
                         % (host.path("installed"), why))
    return records


def stale_units(host, config):
    """The units 'install' wrote here (as its record says) that config changes, a boot_wait or the
    file-share mirrors they wait for: 'install' again rewrites them.  A damaged record: none said."""
    try:
        manifest = read_manifest(host)
    except StateError:
        return []
    items = install_items(("systemd", "timer", "sysv", "cron"), int(config.boot_wait), b"", mirror_mounts(config))
    return [item.path for item in items if item.data is not None and item.path != INSTALL_PATH
            and item.path in manifest and manifest[item.path] != manifest_record(item)]


def cmd_install(args):
    host = Host(args.root, args.config)
    host.check_agent_file()
    kinds = args.kinds or default_install_kinds(host.rootpath)
    config = host.config if host.has_config() else None
    boot_wait = int(config.boot_wait) if config else DEFAULT_BOOT_WAIT
    items = install_items(kinds, boot_wait, running_agent(), mirror_mounts(config))
    host.make_state()
    with host.lock():
        ensure_state(host)
        manifest = read_manifest(host)
        changed = 0
        for item in items:
            if install_item(host.rootpath, item):
                changed += 1
                say("wrote %s" % os.path.join(host.root, item.path[1:]))
            manifest[item.path] = manifest_record(item)
        data = canonical({"installed": manifest})
        if host.state.stat("installed") is None or host.state.read("installed", RECORD_MAX) != data:
            host.state.write("installed", data, 0o600)
    say("installed %s (%s) in %s: %s" % (INSTALL_PATH, ", ".join(kinds), host.root,
                                         plural(changed, "file") + " written" if changed else "nothing changed"))


def cmd_uninstall(args):
    host = Host(args.root, args.config)
    if not os.path.lexists(host.state_path):
        say("nothing installed in %s (no %s)" % (host.root, host.state_path))
        return EXIT_OK
    with host.lock():
        manifest = read_manifest(host)
        kept = {}  # still recorded, so that a later uninstall warns again
        for path, want in sorted(manifest.items(), key=lambda item: "link" not in item[1]):  # links first
            found = installed_as(host.rootpath, path, want)
            if found is None:
                continue
            if not found:
                kept[path] = want
                warn("%s changed since 'isconf install' wrote it; left in place"
                     % os.path.join(host.root, path[1:]))
                continue
            dfd, name = host.rootpath.parent(path)
            try:
                os.unlink(name, dir_fd=dfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
            say("removed %s" % os.path.join(host.root, path[1:]))
        if kept:
            host.state.write("installed", canonical({"installed": kept}), 0o600)
        elif manifest:
            host.state.unlink("installed")
    say("uninstalled from %s%s" % (host.root, " (%s kept)" % plural(len(kept), "changed file") if kept else ""))


# ---------------------------------------------------------------------------
# The author's side: a repository directory, the branch lock, staging, ci.
# ---------------------------------------------------------------------------


class StallGuard(object):
    """A deadline on every wait of an author verb, whose repository may sit on a network file system.

    A read(2), open(2) or stat(2) on a hung mount blocks in the kernel, where no timeout of ours
    reaches it, and an author verb reaches its repository through dozens of them.  So a thread
    watches the verb's (the main thread): once it has neither run nor made a read or write call
    (its counters in /proc) for `seconds`, the file system under it hangs, and the verb ends, saying
    so, with exit 3.  Ending the process is the only way out of a wait the kernel holds (NFS and
    FUSE waits end for a dying process).  Nothing is torn by it: repository files are replaced by a
    rename, a line appended without its end is ignored, and a publication cut short is finished by
    the next verb on the branch.
    The guard pauses while the verb waits on purpose: the command of an author's exec, and
    ssh-keygen asking for a passphrase.  Without /proc it cannot tell, and does nothing."""

    def __init__(self, seconds):
        self.seconds, self.paused_at, self.lock = seconds, 0, threading.Lock()
        pid = os.getpid()   # the main thread's id is the process's
        self.io, self.cpu = "/proc/%d/task/%d/io" % (pid, pid), "/proc/%d/task/%d/stat" % (pid, pid)

    @classmethod
    def start(cls):
        """The guard of this process's repository, running (ISCONF_REPO_TIMEOUT seconds; 0 turns it off)."""
        global STALL_GUARD
        if STALL_GUARD is None:
            text = os.environ.get("ISCONF_REPO_TIMEOUT", "%d" % REPOSITORY_STALL)
            try:
                seconds = 0 if text.strip() == "0" else parse_positive(text, float, "ISCONF_REPO_TIMEOUT",
                                                                        MAX_DEADLINE)
            except ValueError as e:
                raise UsageError("%s (seconds the repository may not answer; 0 for no limit)" % e)
            STALL_GUARD = cls(seconds)
            if seconds and STALL_GUARD.progress() is not None:
                thread = threading.Thread(target=STALL_GUARD._watch, name="isconf-stall")
                thread.daemon = True
                held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)   # Ctrl-C is for the verb
                try:
                    thread.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return STALL_GUARD

    def progress(self):
        """What the verb's thread has done so far: read and write calls and bytes, CPU time."""
        try:
            with open(self.io, "rb") as f:
                io_counts = f.read()
            with open(self.cpu, "rb") as f:
                times = f.read().rsplit(b")", 1)[-1].split()[11:13]   # utime, stime
        except OSError:
            return None
        return io_counts, times

    @contextlib.contextmanager
    def paused(self):
        """Around a wait that is meant (a command, a passphrase): no limit while it lasts."""
        with self.lock:
            self.paused_at += 1
        try:
            yield
        finally:
            with self.lock:
                self.paused_at -= 1

    def _watch(self):
        last, since = self.progress(), time.monotonic()
        step = min(1.0, self.seconds / 4.0)
        while True:
            time.sleep(step)
            now, seen = time.monotonic(), self.progress()
            with self.lock:
                paused = self.paused_at > 0
            if paused or seen != last:
                last, since = seen, now
            elif now - since >= self.seconds:
                break
        REPORTER.error("the repository's file system has not answered for %g s (a hung network mount?); "
                       "nothing half-written is used: check the mount, then run the command again (ISCONF_REPO_TIMEOUT "
                       "sets the limit)" % self.seconds, EXIT_UNREACHABLE)
        REPORTER.flush()
        os._exit(EXIT_UNREACHABLE)


STALL_GUARD = None   # StallGuard.start() makes it when an author verb first opens its repository


def author_name():
    """Who is authoring: ISCONF_AUTHOR, else the human behind sudo, at this host."""
    who = os.environ.get("ISCONF_AUTHOR")
    if who:
        if CONTROL_RE.search(who) or len(who) > 256 or not utf8(who):
            raise UsageError("ISCONF_AUTHOR must be printable text of at most 256 characters, valid UTF-8, like "
                             "alice@admin1")
        return who
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return "%s@%s" % (user, socket.gethostname())


def check_branch(branch):
    if not branch or not BRANCH_RE.match(branch):
        raise UsageError("branch name %r must be letters, digits, '.', '_' or '-' (at most 64), starting "
                         "with a letter or digit" % branch)
    return branch


def new_head_time(previous, expires):
    """The time of a new head: now, but never before the head it follows.  Hosts never take
    the time earlier than the last head they verified, so one head dated by a fast clock
    must not make every later head (and its expiry) look old to them."""
    now = time.time()
    if previous is None:
        return now
    before = parse_time(previous.time)
    if before > now + 60:
        warn("the branch's last head is dated %s, ahead of this machine's clock (%s); the new "
             "head is dated %s too, so that hosts accept it: check both clocks"
             % (previous.time, format_time(now), previous.time))
    if previous.expires and not expires:
        warn("the last head %s at %s; this one never expires (give --expires to keep one)"
             % ("expired" if parse_time(previous.expires) <= now else "expires", previous.expires))
    return max(now, before)


def sign_head(data, key):
    """Sign a head with the author's SSH key via ssh-keygen (authoring may use it; hosts never do)."""
    if not os.path.isfile(key):
        raise UsageError("signing key %s is not a file; give the private key (or the public key of one held by "
                         "ssh-agent)" % key)
    with tempfile.TemporaryDirectory(prefix="isconf-sign-") as tmp:
        path = os.path.join(tmp, "head")
        with open(path, "wb") as f:
            f.write(data)
        try:
            with StallGuard.start().paused():   # it may ask for a passphrase
                proc = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", key, "-n", SIGNATURE_NAMESPACE,
                                       path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        except OSError as e:
            raise StateError("cannot run ssh-keygen to sign the head: %s; install openssh-client" % e)
        if proc.returncode != 0:
            reason = proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no reason given"]
            raise StateError("ssh-keygen could not sign with %s: %s" % (key, reason[-1]))
        return read_file(path + ".sig", SIGNATURE_MAX)


def author_state_dir():
    """The author's own state, outside every repository: $XDG_STATE_HOME/isconf, else
    ~/.local/state/isconf; 0700, made when first needed."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    path = os.path.join(base, "isconf")
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise StateError("cannot make the author's state directory %s: %s" % (path, e.strerror))
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise StateError("the author's state directory %s must be a directory of yours, mode 0700; fix it (chmod "
                         "700) and run again" % path)
    return StateDir.at(path)


class Session(object):
    """The secret of one author's lock of one branch, kept in the author's state directory (never in the
    repository): every staged line carries a MAC under it, chained to the line before it and to the staged
    file's generation, so what someone else adds to the staged file, changes, reorders, or puts back from an
    older copy of it (a line unstaged, or cut off and staged after) is refused at ci.  A new lock makes a new
    secret; each 'unstage' a new generation."""

    def __init__(self, repo, branch):
        self.name, self.branch = repo.author_file("lock", branch), branch

    def create(self):
        self.store((binascii.hexlify(os.urandom(32)), 0))

    def store(self, key):
        state = author_state_dir()
        try:
            state.write(self.name, b"%s %d\n" % key, 0o600)
        finally:
            state.close()

    def key(self):
        """(the secret, the staged file's generation)."""
        state = author_state_dir()
        try:
            words = state.read(self.name, 256).split()
        except FileNotFoundError:
            raise Busy("branch %s is locked in your name, but not from here: this machine holds no secret of that "
                       "lock (in %s); stage from where you took it, or 'isconf unlock' and lock again"
                       % (self.branch, state.path))
        finally:
            state.close()
        if not 1 <= len(words) <= 2 or not words[-1].isdigit():
            raise StateError("the secret of your lock of branch %s (%s) is damaged; 'isconf unlock' and lock again"
                             % (self.branch, os.path.join(state.path, self.name)))
        return words[0], int(words[1]) if len(words) == 2 else 0

    def forget(self):
        state = author_state_dir()
        try:
            with contextlib.suppress(FileNotFoundError):
                state.unlink(self.name)
        finally:
            state.close()

    def mac(self, key, number, previous, fields):
        """The MAC of staged line number (from 1) after the line whose MAC is previous, fields as canonical
        JSON: a line moved, or put back after others, is a line changed."""
        return hmac.new(key[0], b"%d %d %s\n" % (key[1], number, previous.encode("ascii")) + canonical(fields),
                        hashlib.sha256).hexdigest()

    def lines(self, key, staged, number=1, previous=""):
        """The staged file's lines for the fields in staged, numbered from number, chained on from previous."""
        lines = []
        for number, fields in enumerate(staged, number):
            previous = self.mac(key, number, previous, fields)
            lines.append(canonical(dict(fields, mac=previous)) + b"\n")
        return b"".join(lines)

    def first_forged(self, key, records, macs):
        """The number of the first record whose MAC is not the one its place in the chain gives, or None."""
        previous = ""
        for number, (record, mac) in enumerate(zip(records, macs), 1):
            if not isinstance(mac, str) or not hmac.compare_digest(mac, self.mac(key, number, previous, record)):
                return number
            previous = mac
        return None


class Repository(object):
    """A repository directory: what a web server publishes, plus the authors' work area.

    Its files are reached as a host reaches its own state (StateDir): never through a link,
    regular files and directories only, no open that can block on a FIFO or act on a device.
    And write access to it yields no signed entry: every verb that writes a head first verifies
    the branch as a host would (verified), staged work carries a MAC under its lock's secret, and
    every object a new entry names is checked by its hash."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise StateError("%s is not an isconf repository (no such directory); create one with 'isconf "
                             "init-repo DIR'" % self.path)
        self.top = StateDir.at(self.path)
        try:
            fields = parse_json(self.top.read(REPO_MARKER, HEAD_MAX))
        except FileNotFoundError:
            raise StateError("%s is not an isconf repository (no %s); create one with 'isconf init-repo DIR'"
                             % (self.path, REPO_MARKER))
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            raise StateError("%s is damaged: it should hold {\"format\":%d}" % (self.top.file(REPO_MARKER), FORMAT))
        if fields.get("format") != FORMAT:
            raise StateError("%s has format %r; this isconf.py writes format %d" % (self.path, fields.get("format"),
                                                                                    FORMAT))

    @staticmethod
    def create(path):
        if os.path.lexists(path) and not os.path.isdir(path):
            raise UsageError("%s is not a directory: give the directory to make the repository in (made if missing)"
                             % path)
        makedirs(path)
        if os.path.lexists(os.path.join(path, REPO_MARKER)):
            raise StateError("%s is already an isconf repository" % path)
        top = StateDir.at(path)
        try:
            for sub in ("branches", "objects", "authoring"):
                top.subdir(sub, create=True, mode=0o700 if sub == "authoring" else 0o755)
            top.write(REPO_MARKER, canonical({"format": FORMAT}) + b"\n")
        finally:
            top.close()
        return Repository(path)

    # Where things are: the published branches and objects, the authors' work area (never published).

    def branches(self):
        return self.top.subdir("branches")

    def branch_dir(self, branch, create=False):
        """branches/BRANCH (a StateDir), or None if the branch was never published."""
        check_branch(branch)
        if not create and not _lexists(branch, self.branches().fd):
            return None
        return self.branches().subdir(branch, create=create, mode=0o755)

    def work_dir(self, branch):
        return self.top.subdir("authoring", create=True).subdir(check_branch(branch), create=True)

    def objects(self):
        return self.top.subdir("objects", create=True, mode=0o755)

    def exists(self, branch):
        """Whether the branch was ever published (it has a head, whatever the head holds)."""
        directory = self.branch_dir(branch)
        return directory is not None and directory.stat("head") is not None

    def branch_names(self):
        return sorted(name for name in self.branches().listdir() if BRANCH_RE.match(name) and self.exists(name))

    def head(self, branch):
        directory = self.branch_dir(branch)
        if directory is None:
            return None
        try:
            data = directory.read("head", HEAD_MAX)
        except FileNotFoundError:
            return None
        return Head.parse(data, "head of branch %s" % branch)

    def journal_bytes(self, branch, head):
        if head is None:
            return b""
        try:
            with os.fdopen(self.branch_dir(branch).open("journal"), "rb") as f:
                size = os.fstat(f.fileno()).st_size   # one shorter than the head says is refused unread
                data = f.read(head.length) if size >= head.length else b""
        except FileNotFoundError:
            size, data = 0, b""
        if len(data) != head.length:
            raise Refused("the journal of branch %s is %d bytes, shorter than the %d its head says; the repository "
                          "is damaged" % (branch, len(data) if data else size, head.length))
        return data

    def verified(self, branch, signers, adopt=None, unsigned=False):
        """(head, entries, journal bytes) of a branch, verified as a host verifies it (verified_head), and
        like a host, never older than the last signed head this author verified or published of it: an old
        head put back (rollback) or another entry at its seq (fork) is Refused, for a head written on it
        would fork the journal its hosts applied.  A signed head that verified is remembered."""
        head, entries, data, signed = self.verified_head(branch, signers, adopt, unsigned)
        self.check_seen(branch, head)
        if signed:
            self.remember(branch, head)
        return head, entries, data

    def verified_head(self, branch, signers, adopt=None, unsigned=False):
        """(head, entries, journal bytes, whether its signature verified) of a branch, verified exactly as a
        host verifies it, in its order: the head, its signature over the head's bytes by a key of signers
        (before the journal is read), the journal's length and hash chain up to
        the entry the head names.  (None, [], b"") for a branch never published.  An unsigned head
        (published with --unsigned) is taken as an --insecure host takes it (chain only) for a publication
        that is unsigned too (unsigned), and is signed only through adopt, the seq up to which a human read
        its entries (sign --adopt); else Refused (exit 4) saying what failed and the last entry that verified."""
        head = self.head(branch)
        if head is None:
            return None, [], b"", False
        if head.branch != branch:
            raise Refused("the head of branch %s names branch %s; the repository was tampered with"
                          % (branch, head.branch))
        try:
            signature = self.branch_dir(branch).read("head.sig", SIGNATURE_MAX)
        except FileNotFoundError:
            signature = None
        if signature is not None:  # first, as a host does: only a signed head's length bounds the journal read
            if signers is None:
                raise UsageError("to check branch %s as its hosts do, isconf needs the keys they trust: give "
                                 "--signers FILE (or set ISCONF_SIGNERS), or author on a host of the branch" % branch)
            try:
                verify_signature(head.data, signature, signers, now=parse_time(head.time))
            except Refused as e:
                raise Refused("the head of branch %s (seq %d) does not verify with the keys its hosts trust: %s; "
                              "nothing of it is vouched for: nothing written" % (branch, head.seq, e))
        data = self.journal_bytes(branch, head)
        entries, verified_seq = [], 0
        try:
            for entry in verify_chain(data, 0, ZERO_ID, "journal of branch %s" % branch):
                entries.append(entry)
                verified_seq = entry.seq
        except Refused as e:
            raise Refused("%s; the last entry that verified is seq %d: nothing written" % (e, verified_seq))
        if (entries[-1].id if entries else ZERO_ID) != head.id or len(entries) != head.seq:
            # Each entry names the one before it: only the last can change without breaking the chain.
            last = min(len(entries), head.seq)
            raise Refused("the journal of branch %s does not end at the entry its head names (seq %d): entry %d "
                          "was altered, or entries added without a new head; the last entry that verified is seq "
                          "%d: nothing written" % (branch, head.seq, last, max(0, last - 1)))
        if signature is None:
            if unsigned:
                return head, entries, data, False
            if adopt is None or adopt != head.seq:
                raise Refused("the head of branch %s (seq %d) is unsigned: nobody vouches for its entries. Read "
                              "them ('isconf log' on a host, or the journal), then 'isconf sign --adopt %d' signs "
                              "exactly those" % (branch, head.seq, head.seq))
            return head, entries, data, False
        return head, entries, data, True

    # What this author last saw of a branch: its own state, as a host keeps the last head it verified.

    def author_file(self, what, branch):
        """The name, in the author's state directory, of what is kept there about branch of this repository."""
        return "%s-%s" % (what, sha256_hex(("%s\0%s" % (self.path, branch)).encode("utf-8", "surrogateescape"))[:32])

    def seen_head(self, branch):
        state = author_state_dir()
        try:
            return Head.parse(state.read(self.author_file("head", branch), HEAD_MAX), "the head last seen")
        except FileNotFoundError:
            return None
        except Refused:
            raise StateError("%s is damaged; remove it (what you last saw of branch %s is forgotten)"
                             % (state.file(self.author_file("head", branch)), branch))
        finally:
            state.close()

    def remember(self, branch, head):
        state = author_state_dir()
        try:
            state.write(self.author_file("head", branch), head.data, 0o600)
        finally:
            state.close()

    def check_seen(self, branch, head):
        """Refused if head (None: no head at all) is older than, or forks from, the last signed head of the
        branch this author verified or published."""
        seen = self.seen_head(branch)
        if seen is None:
            return
        forked = head is not None and head.seq == seen.seq and head.id != seen.id
        if head is not None and head.seq >= seen.seq and not forked:
            return
        state = author_state_dir()
        state.close()
        now = "missing" if head is None else "at seq %d" % head.seq
        raise Refused("the head of branch %s is %s, %s the signed seq %d you last saw there (%s): someone put an "
                      "old head back, or rewrote the journal; nothing written. Put the newest head and journal back "
                      "(and find out who can write %s), or, if the branch was rewritten on purpose, remove %s"
                      % (branch, now, "naming another entry than" if forked else "older than", seen.seq,
                         "fork" if forked else "rollback", self.path, state.file(self.author_file("head", branch))))

    # The author lock: who holds the branch, why and since when.

    def lock_holder(self, branch):
        work = self.work_dir(branch)
        try:
            holder = parse_json(work.read("lock", HEAD_MAX))
        except FileNotFoundError:
            return None
        except ValueError:
            holder = None
        if not (isinstance(holder, dict) and all(isinstance(holder.get(k), str) for k in ("who", "why", "time"))):
            raise StateError("lock %s is damaged; 'isconf unlock --force' clears it" % work.file("lock"))
        return holder

    def lock(self, branch, why, signers=None):
        with self.branch_mutex(branch, signers):
            me = author_name()
            holder = self.lock_holder(branch)
            if holder and holder.get("who") != me:
                raise Busy("branch %s is locked by %s since %s: %s; ask them, or 'isconf unlock --force'"
                           % (branch, holder.get("who"), holder.get("time"), holder.get("why")))
            session = Session(self, branch)
            if holder is None:
                session.create()
                work = self.work_dir(branch)
                with contextlib.suppress(FileNotFoundError):
                    work.unlink("staged")  # left by a lock that was broken: never this lock's work
            else:
                # Said, not silently adopted: a lock someone broke and then put back, with its staged work,
                # looks just like this author's own (attack: a stale staged file replayed after 'unlock --force').
                count = len(self.work_dir(branch).read_records("staged", "staged work", limit=STAGED_MAX))
                if count:
                    warn("you already held the lock of branch %s (since %s): its %d staged entr%s stay staged for "
                         "the next ci; 'isconf staged' lists them, 'isconf unlock' discards them"
                         % (branch, holder.get("time"), count, "y" if count == 1 else "ies"))
            self.work_dir(branch).write("lock", canonical({"who": me, "why": why,
                                                           "time": format_time(time.time())}) + b"\n")

    def require_lock(self, branch):
        holder = self.lock_holder(branch)
        if holder is None:
            raise UsageError("branch %s is not locked; run 'isconf lock -m WHY' first" % branch)
        if holder.get("who") != author_name():
            raise Busy("branch %s is locked by %s: %s" % (branch, holder.get("who"), holder.get("why")))
        return holder

    def unlock(self, branch, force=False):
        """Release our lock; with force, anyone's, even a damaged one (said loudly)."""
        try:
            holder = self.lock_holder(branch)
        except StateError:
            if not force:
                raise
            holder = {"who": "nobody known (the lock file is damaged)", "why": "?"}
        if holder is None:
            raise UsageError("branch %s is not locked" % branch)
        work = self.work_dir(branch)
        try:
            count = "%d" % len(work.read_records("staged", "staged work", limit=STAGED_MAX))
        except StateError:
            count = "all (damaged)"
        if holder.get("who") != author_name():
            if not force:
                raise Busy("branch %s is locked by %s; use 'isconf unlock --force' to break the lock and "
                           "discard their staged work" % (branch, holder.get("who")))
            warn("breaking %s's lock on branch %s (%s) and DISCARDING %s staged transaction(s)"
                 % (holder.get("who"), branch, holder.get("why"), count))
        elif count != "0":
            warn("discarding %s staged transaction(s)" % count)
        self.release(branch)

    def release(self, branch):
        work = self.work_dir(branch)
        for name in ("staged", "lock"):
            with contextlib.suppress(FileNotFoundError):
                work.unlink(name)
        work.fsync()
        Session(self, branch).forget()

    # Staging: entries waiting for ci, one canonical JSON object per line, each with its MAC.

    def staged(self, branch):
        """The staged entries' fields, in order, each line's MAC checked under this lock's secret:
        Refused (exit 4) for a line someone else wrote, changed, moved or put back."""
        return self.staged_chain(branch)[0]

    def staged_chain(self, branch):
        """(the staged entries' fields, the session's key, the last line's MAC): staged, and what the next
        line chains on."""
        records = self.work_dir(branch).read_records("staged", "staged work", limit=STAGED_MAX)
        session = Session(self, branch)
        key = session.key() if records else None
        macs = [record.pop("mac", None) for record in records]
        number = session.first_forged(key, records, macs) if records else None
        if number is not None:
            newer = (key[0], key[1] + 1)
            if session.first_forged(newer, records, macs) is not None:
                raise Refused("staged line %d of branch %s (%s) was not staged under this lock: someone wrote to "
                              "the repository's work area; nothing written. 'isconf unlock' discards the staged "
                              "work; find out who can write %s"
                              % (number, branch, self.work_dir(branch).file("staged"), self.path))
            session.store(newer)   # an unstage wrote the file, then stopped before its generation was kept
            key = newer
        return records, key, macs[-1] if macs else ""

    def stage(self, branch, fields, took_effect=None):
        """Stage an entry, checked now as ci will check it, so a bad one fails at once.  took_effect: the
        root it is already in effect on (a snap of it, an exec that ran there), kept beside the entry."""
        self.require_lock(branch)
        entry = self.check_staged(fields, "entry")
        fields = dict(fields, applied=took_effect) if took_effect else fields
        with self.branch_mutex(branch):
            session = Session(self, branch)
            staged, key, previous = self.staged_chain(branch)
            work = self.work_dir(branch)
            line = session.lines(key or session.key(), [fields], len(staged) + 1, previous)
            if len(line) > STAGED_MAX:
                raise UsageError("%s is %d MiB staged, over the %d MiB one entry holds: stage it in parts (snap "
                                 "fewer paths at once, or use --exclude)" % (entry.summary()[:60] + "...",
                                                                             len(line) >> 20, STAGED_MAX >> 20))
            fd = work.open_records("staged")
            try:
                durable_append(fd, line)
            finally:
                os.close(fd)
        return entry

    def unstage(self, branch, number):
        """Drop staged entry number (from 1); the others keep their order."""
        self.require_lock(branch)
        with self.branch_mutex(branch):
            staged, key, _ = self.staged_chain(branch)
            if not 1 <= number <= len(staged):
                raise UsageError("nothing is staged as number %d on branch %s (%s); see 'isconf staged'"
                                 % (number, branch, "%d staged" % len(staged) if staged else "nothing staged"))
            self.rewrite_staged(branch, staged[:number - 1] + staged[number:], key)
            return self.check_staged(staged[number - 1], "entry")

    def rewrite_staged(self, branch, staged, key):
        """Write the staged file anew, in the generation after key's (then kept): no line of an older copy of the
        file verifies any more.  A crash between the two leaves a file the next reader finds in the next
        generation, and keeps."""
        session = Session(self, branch)
        newer = (key[0], key[1] + 1)
        self.work_dir(branch).write("staged", session.lines(newer, staged))
        session.store(newer)

    @staticmethod
    def check_staged(fields, what):
        fields = dict((k, v) for k, v in fields.items() if k != "applied")  # where it took effect, not the entry's
        try:
            return Entry.parse(canonical(dict(fields, seq=1, prev=ZERO_ID, time=format_time(0), author="-",
                                              message="")), what).check(what)
        except UnicodeEncodeError:
            raise UsageError("a path or argument is not valid UTF-8; isconf journals UTF-8 text only")
        except Refused as e:
            raise UsageError(str(e))

    def checkin(self, branch, message, signers, sign_key=None, expires=None, dry_run=False):
        """Verify the branch, then append the staged entries to the journal, write and sign the head,
        unlock; returns (new head, the new entries).

        The branch mutex keeps two authors' ci apart.  The head is signed, and its signature checked
        with the keys the branch's hosts trust, before anything is written, so a signing failure
        changes nothing; then the journal grows, then the head is published (see publish_head).  A
        crash leaves the old head (and bytes past its length, which readers never read and the next
        ci cuts off) or the new."""
        holder = self.require_lock(branch)
        with self.branch_mutex(branch, signers):
            staged = self.staged(branch)
            if not staged:
                raise UsageError("nothing staged on branch %s; use exec, snap or reboot first" % branch)
            head, entries, data = self.verified(branch, signers, unsigned=sign_key is None)
            seq, prev = (entries[-1].seq, entries[-1].id) if entries else (0, ZERO_ID)
            now = new_head_time(head, expires)
            new_entries, took_effect, shipped_signers = [], [], None
            for number, fields in enumerate(staged, 1):
                took_effect.append(fields.pop("applied", None))
                fields = dict(fields, seq=seq + 1, prev=prev, time=format_time(now), author=holder["who"],
                              message=fields.get("message") or message or holder.get("why", ""))
                try:
                    entry = Entry.parse(canonical(fields), "staged entry %d" % number).check("staged entry %d"
                                                                                             % number)
                except (Refused, ValueError, TypeError) as e:
                    raise StateError("staged work of branch %s is damaged (%s); 'isconf unlock' discards it, "
                                     "then stage again" % (branch, e))
                self.check_objects(entry)
                shipped_signers = self.check_host_files(entry) or shipped_signers
                self.check_retraction(entry, entries + new_entries)
                new_entries.append(entry)
                seq, prev = entry.seq, entry.id
            lines = [entry.line + b"\n" for entry in new_entries]
            new = Head.build(branch, seq, prev, len(data) + sum(len(l) for l in lines), now,
                             now + expires if expires else None)
            signature = self.sign(new, sign_key, signers) if sign_key else None
            if signature is not None and shipped_signers is not None:
                try:
                    verify_signature(new.data, signature, shipped_signers, now=parse_time(new.time))
                except Refused as e:
                    warn("the allowed_signers this check-in ships does not trust %s (%s): hosts that apply it will "
                         "refuse the next head signed with it; sign the next one with a key it lists" % (sign_key, e))
            in_effect = list(zip(new_entries, took_effect))
            if dry_run:
                return new, new_entries, in_effect
            journal = self.branch_dir(branch, create=True)
            journal.append_at("journal", len(data), b"".join(lines))
            self.publish_head(branch, new, signature, checkin=True)
        return new, new_entries, in_effect

    def check_host_files(self, entry):
        """A new entry's trusted keys or host config, parsed again from its object (a hard link's: its file's)
        with the agent's own parser (as at snap time: a file every host would refuse never ships); the keys it
        ships, or None."""
        shipped = None
        records = dict((record["path"], record) for record in entry.installs())
        for path in (SIGNERS_PATH, CONFIG_PATH):
            record = records.get(path)
            sha = FILE_TYPES[record["type"]].content_object(record, records) if record is not None else None
            if sha is None:
                continue
            data = self.objects().read(sha, max(SIGNERS_MAX, CONFIG_MAX))
            try:
                if path == SIGNERS_PATH:
                    shipped = load_signers(SIGNERS_PATH, lambda: data)
                else:
                    Config(CONFIG_PATH, data)
            except StateError as e:
                raise UsageError("%s in entry %d would be refused by every host that applies it: %s; nothing "
                                 "written" % (path, entry.seq, e))
        return shipped

    @staticmethod
    def check_retraction(entry, before):
        """A retract must name, by its id, an entry before it that is not itself a retract."""
        target = entry.retracts()
        if target is None:
            return
        seq, entry_id = target
        named = entry_at(before, seq)
        if named is None or named.id != entry_id:
            raise UsageError("the retract of seq %d names an entry the journal does not have there (%s); stage it "
                             "again" % (seq, entry_id[:16]))
        if named.retracts() is not None:
            raise UsageError("seq %d is itself a retract; a retract cannot be retracted: fix forward with a new "
                             "entry" % seq)

    def sign(self, head, key, signers):
        """head's signature by key, checked as the branch's hosts will check it (UsageError if they would
        refuse it: a key they do not list, an ECDSA key, a namespace or validity it lacks at the head's time)."""
        signature = sign_head(head.data, key)
        if signers is None:
            raise UsageError("to sign, isconf checks that the branch's hosts will accept the key: give --signers "
                             "FILE (or set ISCONF_SIGNERS), the keys they trust, or author on a host of the branch")
        try:
            verify_signature(head.data, signature, signers, now=parse_time(head.time))
        except Refused as e:
            raise UsageError("the branch's hosts would refuse a head signed with %s: %s; sign with a key they "
                             "trust" % (key, e))
        return signature

    def check_objects(self, entry):
        """Every object a new entry names is in the repository, whole and with the bytes its hash says:
        hosts would otherwise find the signed journal naming a file no mirror has (or a swapped one)."""
        objects = self.objects()
        for sha, size in entry.objects():
            where = entry.object_path(sha) or entry.summary()
            try:
                with os.fdopen(objects.open(sha), "rb") as f:
                    digest, length = hashlib.sha256(), 0
                    for chunk in iter(lambda: f.read(CHUNK), b""):
                        digest.update(chunk)
                        length += len(chunk)
                        if length > size:
                            break
                problem = None if (length, digest.hexdigest()) == (size, sha) else "not what it was snapped as"
            except FileNotFoundError:
                problem = "missing"
            if problem:
                raise Refused("object %s for %s is %s in %s; snap the file again ('isconf unstage' or 'isconf "
                              "unlock' drops this staged work); nothing written"
                              % (sha[:16], where, problem, objects.path))

    @contextlib.contextmanager
    def branch_mutex(self, branch, signers=None):
        """Held while a branch's files change; with signers, finishes a publication a crash interrupted."""
        work = self.work_dir(branch)
        with work.lock("ci.lock", "branch " + branch):
            if work.stat("publishing") is not None:
                self.finish_publication(branch, signers)
            yield

    def publish_head(self, branch, head, signature, checkin=False):
        """Replace head.sig and head, which cannot change in one rename.

        The pair is recorded first under authoring/, so that if we die between the two
        renames (hosts would see a head and a signature that disagree, and refuse), the
        next author command on the branch finishes the job.  For a ci, the record also
        says the staged work and the lock are spent: once it exists, a retried ci cannot
        append the same entries twice."""
        record = {"head": head.data.decode("utf-8"), "checkin": checkin,
                  "sig": signature.decode("ascii") if signature else None}
        self.work_dir(branch).write("publishing", canonical(record) + b"\n")
        self.finish_publication(branch, None, written=record)

    def finish_publication(self, branch, signers, written=None):
        """Publish the head a record in authoring/ names: the one publish_head just wrote (written, used as
        it is, never read back: the file could be swapped in between), or after a crash the one found
        there, only once the head verifies over the journal with the keys the branch's hosts trust: the
        record lies in the repository, where anyone who can write it could have put a head of their own."""
        work, trusted, pending = self.work_dir(branch), written is not None, written
        try:
            if not trusted:
                pending = parse_json(work.read("publishing", HEAD_MAX + SIGNATURE_MAX))
        except FileNotFoundError:
            return
        except ValueError:
            pending = None
        if not (isinstance(pending, dict) and isinstance(pending.get("head"), str)
                and isinstance(pending.get("sig"), (str, type(None)))
                and isinstance(pending.get("checkin", False), bool)):
            raise StateError("publication record %s is damaged; check that branch %s's head and head.sig agree "
                             "('isconf verify-sig'), re-sign with 'isconf sign' if not, then remove the record"
                             % (work.file("publishing"), branch))
        data, signature = pending["head"].encode("utf-8"), pending["sig"]
        if not trusted:
            head = Head.parse(data, "the head of an interrupted publication of branch %s" % branch)
            if signature is not None:  # first: only a signed head's length bounds the journal read
                if signers is None:
                    raise UsageError("a publication of branch %s was interrupted; to finish it, isconf checks its "
                                     "head as the branch's hosts do: give --signers FILE (or set ISCONF_SIGNERS)"
                                     % branch)
                try:
                    verify_signature(data, signature.encode("ascii"), signers, now=parse_time(head.time))
                except Refused as e:
                    raise Refused("the interrupted publication of branch %s (%s) does not verify: %s; nothing "
                                  "written: remove the record" % (branch, work.file("publishing"), e))
            journal = self.journal_bytes(branch, head)
            entries = verify_chain(journal, 0, ZERO_ID, "journal of branch %s" % branch)
            if head.branch != branch or (entries[-1].id if entries else ZERO_ID) != head.id:
                raise Refused("the interrupted publication of branch %s (%s) names a head its journal does not "
                              "end at; nothing written: remove the record" % (branch, work.file("publishing")))
            self.check_seen(branch, head)
        directory = self.branch_dir(branch, create=True)
        if signature is not None:
            directory.write("head.sig", signature.encode("ascii"))
        else:
            with contextlib.suppress(FileNotFoundError):
                directory.unlink("head.sig")
        directory.write("head", data)
        if signature is not None:
            self.remember(branch, Head.parse(data, "the head published"))
        if pending.get("checkin"):
            self.release(branch)
        work.unlink("publishing")
        work.fsync()

    def fork(self, branch, new_branch, signers, sign_key=None, expires=None):
        if self.head(new_branch) is not None:
            raise UsageError("branch %s already exists" % new_branch)
        if self.head(branch) is None:
            raise UsageError("branch %s does not exist (nothing was ever checked in there)" % branch)
        with self.branch_mutex(branch, signers):
            head, entries, data = self.verified(branch, signers, unsigned=sign_key is None)
            now = new_head_time(head, expires)
            new = Head.build(new_branch, head.seq, head.id, len(data), now, now + expires if expires else None)
            signature = self.sign(new, sign_key, signers) if sign_key else None
            self.branch_dir(new_branch, create=True).write("journal", data)
            self.publish_head(new_branch, new, signature)
        return new

    def promote(self, branch, source, signers, sign_key, expires=None):
        """Fast-forward branch to branch source's journal, which must extend it (both verified), under a new
        signed head: branch's hosts then apply exactly the entries, ids and order source's hosts applied.
        Returns (the new head, the entries it adds)."""
        holder = self.lock_holder(branch)
        if holder and holder.get("who") != author_name():
            raise Busy("branch %s is locked by %s: %s; promote when they are done" % (branch, holder.get("who"),
                                                                                      holder.get("why")))
        with self.branch_mutex(branch, signers):
            head, entries, data = self.verified(branch, signers, unsigned=sign_key is None)
            if head is None:
                raise UsageError("branch %s does not exist; 'isconf fork' starts one from %s" % (branch, source))
            source_head, source_entries, source_data = self.verified(source, signers, unsigned=sign_key is None)
            if source_head is None:
                raise UsageError("branch %s does not exist; the branches are %s" % (source, ", ".join(
                    self.branch_names())))
            if not source_data.startswith(data):
                common = 0
                for ours, theirs in zip(entries, source_entries):
                    if ours.id != theirs.id:
                        break
                    common = ours.seq
                raise Refused("branch %s has entries %s does not (they agree up to seq %d, then differ): it cannot "
                              "be fast-forwarded; nothing written" % (branch, source, common))
            added = source_entries[len(entries):]
            if not added:
                return head, []
            now = new_head_time(head, expires)
            new = Head.build(branch, source_head.seq, source_head.id, len(source_data), now,
                             now + expires if expires else None)
            signature = self.sign(new, sign_key, signers) if sign_key else None
            self.branch_dir(branch).append_at("journal", len(data), source_data[len(data):])
            self.publish_head(branch, new, signature)
        return new, added

    def resign(self, branch, signers, sign_key, expires=None, adopt=None):
        """Sign the branch's current head again, with a new time and expiry and no new entry: to renew an
        expiry, or (adopt) to vouch for the entries of a head published unsigned."""
        with self.branch_mutex(branch, signers):
            if self.head(branch) is None:
                raise UsageError("branch %s does not exist (nothing was ever checked in there)" % branch)
            head, entries, data = self.verified(branch, signers, adopt)
            now = new_head_time(head, expires)
            new = Head.build(branch, head.seq, head.id, head.length, now, now + expires if expires else None)
            self.publish_head(branch, new, self.sign(new, sign_key, signers))
        return new, entries

    def store_object(self, f, extents, path):
        """Copy the data extents of an open file into the objects directory, named by its SHA-256,
        durably (a signed head may name it the moment ci ends); streamed and hashed on the way,
        so a large file never sits in memory.  Returns its SHA-256."""
        def fill(fd):
            copy_extents(f, fd, extents, sink, into_holes=False,
                         short="%s changed while it was being snapped; snap it again" % path)

        def make(tmp):
            write_new(objects.fd, tmp, fill, 0o644)
            return sink.hexdigest()
        sink, objects = hashlib.sha256(), self.objects()
        return replace_at(objects.fd, path.replace("/", "_"), make)


# ---------------------------------------------------------------------------
# The server: a small threaded static server for trying it out and for tests.
# ---------------------------------------------------------------------------


def parse_range(header, size):
    """A single 'bytes=' range -> (start, stop), or None if it cannot be satisfied."""
    m = re.match(r"^bytes=([0-9]{0,18})-([0-9]{0,18})\Z", header.strip())
    if not m or m.group(1) == m.group(2) == "":
        return None
    if m.group(1) == "":
        length = int(m.group(2))
        return (max(0, size - length), size) if length else None
    start = int(m.group(1))
    stop = min(int(m.group(2)) + 1, size) if m.group(2) else size
    if start >= size or stop <= start:
        return None
    return start, stop


class StaticHandler(object):
    """GET and HEAD of plain files with Range, ETag and Last-Modified; nothing else.  Mixed into
    http.server's request handler by static_server."""

    protocol_version = "HTTP/1.1"   # keep-alive
    # Headers and body leave in two writes: with Nagle's algorithm the body would wait for the client's
    # delayed ACK of the headers, 40 ms per request on a kept-alive connection.
    disable_nagle_algorithm = True
    server_version = "isconf/" + __version__
    directory = "."

    def do_GET(self):
        self.serve(body=True)

    def do_HEAD(self):
        self.serve(body=False)

    def resolve(self):
        """The file for the request path, or None: no listing, no escaping the directory,
        nothing of the authors' work area or the marker, however the path is spelled
        ('/./authoring', '/%2e/isconf-repo', a link): judged by where it really leads."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if "\0" in path or not path.startswith("/") or ".." in path.split("/"):
            return None
        full = os.path.realpath(os.path.join(self.directory, path.lstrip("/")))
        return full if self.servable(full) and os.path.isfile(full) else None

    def servable(self, full):
        """Whether a real path (no link in it) is one to serve: inside the directory, not the authors' work
        area (their locks and staged work) nor the marker, which are not for hosts."""
        top = os.path.realpath(self.directory)
        return full.startswith(top + os.sep) and full[len(top) + 1:].split(os.sep)[0] not in ("authoring",
                                                                                          REPO_MARKER)

    def opened(self, path):
        """path opened for reading, judged again as the file it is: a name swapped for a link, a FIFO or a
        device after resolve judged it must not lead out of the directory, nor hold up this thread."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            try:
                where = os.readlink("/proc/self/fd/%d" % fd)
            except OSError:
                where = path  # without /proc: as resolve judged it
            if not (stat.S_ISREG(os.fstat(fd).st_mode) and self.servable(where)):
                raise OSError(errno.ENOENT, "not a file to serve", path)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def serve(self, body):
        path = self.resolve()
        if path is None:
            return self.send_status(404, "Not Found")
        try:
            f = self.opened(path)
        except OSError:
            return self.send_status(404, "Not Found")
        with f:
            st = os.fstat(f.fileno())
            etag = '"%x-%x"' % (st.st_mtime_ns, st.st_size)
            if etag in [t.strip() for t in (self.headers.get("If-None-Match") or "").split(",")]:
                return self.send_status(304, "Not Modified", etag=etag)
            start, stop, status = 0, st.st_size, 200
            wanted = self.headers.get("Range")
            if wanted:
                span = parse_range(wanted, st.st_size)
                if span is None:
                    return self.send_status(416, "Range Not Satisfiable", extra={
                        "Content-Range": "bytes */%d" % st.st_size})
                start, stop, status = span[0], span[1], 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(stop - start))
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, stop - 1, st.st_size))
            self.end_headers()
            if body:
                f.seek(start)
                left = stop - start
                while left:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def send_status(self, code, reason, etag=None, extra=None):
        self.send_response(code, reason)
        if etag:
            self.send_header("ETag", etag)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_request(self, code="-", size="-"):
        headers = getattr(self, "headers", None)   # none yet when the request line itself is refused
        wanted = headers.get("Range") if headers else None
        self.log_message('"%s" %s%s', self.requestline, code, " range=" + wanted if wanted else "")

    def log_message(self, fmt, *args):
        # The request line and headers are the client's text: escaped, one line each.
        REPORTER.log("%s - [%s] %s" % (self.client_address[0], self.log_date_time_string(), fmt % args))


def holds_repository(directory):
    """Whether directory looks like a repository: its marker, or a branch's head."""
    if os.path.isfile(os.path.join(directory, REPO_MARKER)):
        return True
    try:
        names = os.listdir(os.path.join(directory, "branches"))
    except OSError:
        return False
    return any(os.path.isfile(os.path.join(directory, "branches", name, "head")) for name in names)


def static_server(address, handler):
    """A threaded HTTP server on address, each request answered by handler (StaticHandler or a
    subclass) mixed into http.server's request handler: only serving imports http.server."""
    import_late("http.server", "socketserver")
    server = type("ThreadingServer", (socketserver.ThreadingMixIn, http.server.HTTPServer),
                  {"daemon_threads": True, "allow_reuse_address": True})
    return server(address, type(handler.__name__, (handler, http.server.BaseHTTPRequestHandler), {}))


def serve(directory, bind, port):
    handler = type("Handler", (StaticHandler,), {"directory": os.path.abspath(directory)})
    try:
        server = static_server((bind, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError("port %d on %s is in use; pick another with --port N (0 picks a free one)"
                             % (port, bind))
        raise UsageError("cannot listen on %s port %d: %s" % (bind, port, e.strerror or e))
    try:
        REPORTER.log("isconf: serving %s on http://%s:%d/" % (directory, bind, server.server_address[1]))
        if not holds_repository(directory):
            warn("%s holds no repository (no %s, no branches/NAME/head): every request will be answered 404; "
                 "serve the directory 'isconf init-repo' made" % (directory, REPO_MARKER))
        server.serve_forever()
    except KeyboardInterrupt as e:  # the way a server is stopped: nothing to carry on
        signum = getattr(e, "signum", signal.SIGINT)
        REPORTER.log("isconf: stopped serving %s (%s)" % (directory, signal.Signals(signum).name))
        return EXIT_SIGNAL + signum
    finally:
        server.server_close()
    return EXIT_OK


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


# Verbs of the host's own, which follow the branch its config names: a --branch naming another is refused.
HOST_BRANCH_VERBS = ("up", "status", "log", "verify", "skip", "disable", "enable", "install", "uninstall")


def check_host_branch(args):
    """--branch given to a verb of HOST_BRANCH_VERBS: the branch the host follows, or a usage error (an
    admin's 'isconf --branch web-canary up' must not quietly apply web)."""
    host = Host(args.root, args.config)
    if os.path.exists(host.config_path) and host.config.branch != args.branch:
        raise UsageError("this host follows branch %s, not %s: --branch is for init and author verbs; to follow "
                         "%s, 'isconf migrate %s'" % (host.config.branch, args.branch, args.branch, args.branch))


def author_branch(args):
    """--branch, else ISCONF_BRANCH, else the branch this host follows."""
    if args.branch or os.environ.get("ISCONF_BRANCH"):
        return check_branch(args.branch or os.environ.get("ISCONF_BRANCH"))
    host = Host(args.root, args.config)
    if os.path.exists(host.config_path):
        try:
            return host.config.branch
        except StateError as e:
            raise UsageError("no branch given, and the host's own cannot be read (%s): use --branch NAME or set "
                             "ISCONF_BRANCH" % e)
    raise UsageError("no branch given: use --branch NAME or set ISCONF_BRANCH")


def open_repository(args):
    """The repository an author verb works on (--repo), its waits under the StallGuard."""
    if not args.repo:
        raise UsageError("no repository given: use --repo DIR or set ISCONF_REPO")
    StallGuard.start()
    return Repository(args.repo)


def author_context(args, lock=False):
    """(Repository, branch) for an author verb; the branch name is checked first.  A branch that was never
    published is refused, naming those that were (a typo must not start a branch), unless this is the
    'lock --new' that starts it."""
    branch = author_branch(args)
    repo = open_repository(args)
    if not repo.exists(branch) and not (lock and getattr(args, "new", False)):
        holder = repo.lock_holder(branch) if not lock else None
        if holder is None:
            names = repo.branch_names()
            raise UsageError("branch %s does not exist (%s); 'isconf lock --new -m WHY' starts it, 'isconf fork' "
                             "starts one from another" % (branch, "the branches are " + ", ".join(names) if names
                                                          else "the repository has none yet"))
    return repo, branch


def author_signers(args, branch):
    """The keys the branch's hosts trust, from outside the repository: --signers FILE or $ISCONF_SIGNERS,
    else, authoring on a host of the branch, the keys that host trusts; None when there are none."""
    path = getattr(args, "signers", None) or os.environ.get("ISCONF_SIGNERS")
    if path:
        try:
            return load_signers(path, missing="give the allowed_signers file of the branch's hosts")
        except StateError as e:
            raise UsageError("--signers: %s" % e)
    host = Host(args.root, args.config)
    try:
        if host.has_config() and host.config.branch == branch and not host.config.insecure:
            return load_signers(host.signers_path, host.read_signers)
    except StateError:  # not a host this author can read as one: no keys from it
        return None
    return None


def reference_host(args, branch):
    """The Host at --root when it follows a branch (the author is on a reference host of it), else None."""
    host = Host(args.root, args.config)
    try:
        return host if host.has_config() and host.config.branch else None
    except StateError:  # a config this author cannot read: not authoring as that host
        return None


def require_at_head(args, repo, branch):
    """Authoring on a host of the branch: it must follow this branch and be at its head, so that what the
    author runs there is what its hosts will have run before it (DESIGN rule 15)."""
    host = reference_host(args, branch)
    if host is None:
        return
    if host.config.branch != branch:
        raise UsageError("the root %s follows branch %s, not %s: author a branch on one of its own hosts"
                         % (host.root, host.config.branch, branch))
    head = repo.head(branch)
    applied = host.history(recent=True).applied()[0] if os.path.isdir(host.state_path) else 0
    if applied > (head.seq if head else 0):
        raise Refused("this host applied seq %d, but the head of branch %s in %s is at seq %d: the repository lost "
                      "what its hosts ran (an old head put back, or entries removed); restore the newest head and "
                      "journal, then lock" % (applied, branch, repo.path, head.seq if head else 0))
    if applied != (head.seq if head else 0):
        raise Busy("this host is at seq %d, the branch at %d: run 'isconf up' first, then lock"
                   % (applied, head.seq if head else 0))


def record_authored(args, repo, branch, entries):
    """On the reference host, record as applied (event 'authored') the new entries that took effect on it
    at author time: its next 'up' runs none of them again, and its history stays a prefix of the journal.
    Its verified copy of the journal then takes them in, fetched from the repository as from a mirror and
    checked with its own keys: verify, repair, log and status must not judge the disk by the journal before."""
    host = reference_host(args, branch)
    if host is None or host.config.branch != branch:
        return
    took = [root == host.root for _, root in entries] + [False]
    entries = [entry for entry, _ in entries[:took.index(False)]]  # up to the first not in effect here
    if not entries:
        return
    with host.lock():
        history = host.history()
        if history.applied()[0] != entries[0].seq - 1:
            warn("this host is no longer at seq %d: entries %d to %d were not recorded as applied here; its next "
                 "'up' runs them" % (entries[0].seq - 1, entries[0].seq, entries[-1].seq))
            return
        for entry in entries:
            history.record("authored", entry)
        mirror = Mirror(repo.path)
        try:
            Sync(Run(host))._sync_from(mirror, False, branch).commit(host)
        except (IsconfError, OSError) as e:  # the branch is published: what fails here is this host's copy alone
            warn("this host's copy of the journal stays at its last 'up' (%s): its next 'up' fetches the rest" % e)
        finally:
            mirror.close()
    say("recorded as applied on this host: seq %d to %d" % (entries[0].seq, entries[-1].seq))


def required_message(text, what):
    """A -m that was given must say something: it is what whoever looks next reads."""
    if text is not None and not text.strip():
        raise UsageError("%s: -m WHY is empty; say why, for whoever reads the journal next" % what)
    if text is not None and not utf8(text):
        raise UsageError("%s: -m WHY is not valid UTF-8 (%s); the journal holds UTF-8 text only: say it in UTF-8"
                         % (what, ascii(text)[1:-1]))
    return text


def cmd_init_repo(args):
    StallGuard.start()
    Repository.create(args.dir)
    say("created an empty repository in %s" % args.dir)


def cmd_lock(args):
    required_message(args.message, "lock")
    repo, branch = author_context(args, lock=True)
    if args.new and repo.exists(branch):  # a name taken by mistake would put this work on another role's hosts
        raise UsageError("branch %s already exists: 'isconf lock -m WHY' changes it; a new branch needs a name not "
                         "taken (the branches are %s)" % (branch, ", ".join(repo.branch_names())))
    require_at_head(args, repo, branch)
    repo.lock(branch, args.message, author_signers(args, branch))
    say("locked branch %s%s: %s" % (branch, "" if repo.exists(branch) else " (new)", args.message))


def cmd_unlock(args):
    repo, branch = author_context(args)
    repo.unlock(branch, args.force)
    say("unlocked branch %s" % branch)


def validate_path_arg(path, what):
    try:
        return validate_path(path, what)
    except Refused as e:
        raise UsageError(str(e))


def cmd_exec(args):
    required_message(args.message, "exec")
    repo, branch = author_context(args)
    repo.require_lock(branch)
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise UsageError("exec needs a command: isconf exec -- CMD [ARG...]")
    cwd = validate_path_arg(args.cwd, "--cwd")
    if not args.no_run:
        host = Host(args.root, args.config)
        variables, umask = {}, DEFAULT_EXEC_UMASK
        if os.path.exists(host.config_path):
            try:
                variables, umask = host.config.env, host.config.exec_umask
            except StateError as e:  # the config is 0600: an author who is not root cannot read it
                warn("the command runs without the host's [env] variables and exec_umask: %s" % e)
        with tempfile.NamedTemporaryFile(prefix="isconf-exec-", suffix=".log") as log, StallGuard.start().paused():
            status = run_command(args.root, argv, cwd, exec_environment(branch, 0, "", variables), log.fileno(),
                                 mounts=not args.no_mounts, umask=umask)
        if status != 0:
            raise TransactionFailed("%s exited with status %d; nothing staged" % (argv[0], status))
    staged = repo.stage(branch, {"kind": "exec", "argv": argv, "cwd": cwd, "message": args.message or ""},
                        took_effect=None if args.no_run else os.path.abspath(args.root))
    say("staged " + staged.summary())


def check_host_file(rootpath, record):
    """A snap of this root's own trusted keys or config is parsed now with the parser the agent runs:
    a file every host would refuse never ships (UsageError: the line and what is wrong)."""
    checks = {SIGNERS_PATH: lambda data: load_signers(SIGNERS_PATH, lambda: data),
              CONFIG_PATH: lambda data: Config(CONFIG_PATH, data)}
    check = checks.get(record.get("path")) if record.get("type") in (RegularFile.name, HardLink.name) else None
    if check is not None:
        try:
            check(rootpath.read_file(record["path"], max(SIGNERS_MAX, CONFIG_MAX)))
        except (StateError, OSError) as e:
            raise UsageError("%s would be refused by every host that applies it: %s; fix it, then snap it again"
                             % (record["path"], e))


def snap_paths(rootpath, path, recursive, exclude):
    """path, and with recursive, everything under it, in an order that puts each directory before what it
    holds: the paths inside the root to snap.  exclude: shell patterns, matched against a path and its name."""
    yield path
    if not recursive:
        return
    try:
        top = rootpath.resolve(path)
    except OSError:
        return
    if not os.path.isdir(top) or os.path.islink(top):
        return

    def excluded(inside):
        return any(fnmatch.fnmatchcase(inside, p) or fnmatch.fnmatchcase(posixpath.basename(inside), p)
                   for p in exclude)
    # A stack of the directories still to list, not os.walk, which recurses once per level: a tree 1,100
    # directories deep ended in a RecursionError.  Each directory's names, sorted, then its subdirectories
    # (never a link to one) in that order, each whole before the next.
    stack = [(top, path)]
    while stack:
        directory, base = stack.pop()
        try:
            with os.scandir(directory) as listing:
                names = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in listing)
        except OSError as e:
            raise UsageError("cannot snap %s: %s" % (base, e.strerror or e))
        subdirs = []
        for name, is_dir in names:
            inside = posixpath.join(base, name)
            if excluded(inside):
                continue
            yield inside
            if is_dir:
                subdirs.append((os.path.join(directory, name), inside))
        stack.extend(reversed(subdirs))


def cmd_snap(args):
    required_message(args.message, "snap")
    repo, branch = author_context(args)
    repo.require_lock(branch)
    rootpath, links, records = RootPath(args.root), {}, []
    owners, reference = Owners(rootpath), Host(args.root)
    for given in args.paths:
        given = validate_path_arg(given.rstrip("/") or "/", "snap path")
        for path in snap_paths(rootpath, given, args.recursive, args.exclude):
            if reference.writes_state(path):
                raise UsageError("%s leads into the agent's state directory (%s), which no journal entry may "
                                 "write; leave it out%s" % (path, STATE_PATH, " (--exclude %s)" % shlex.quote(path)
                                                            if path != given else ""))
            try:
                record = FileType.capture_path(rootpath, validate_path_arg(path, "snap path"), links, owners,
                                               repo.store_object)
            except OSError as e:
                raise UsageError("cannot snap %s: %s" % (path, e.strerror or e))
            check_host_file(rootpath, record)
            if record["type"] == Directory.name and not args.recursive:
                warn("%s is a directory: the snap records it alone (its mode and owner), not what it holds; "
                     "'isconf snap -r %s' records the tree" % (path, path))
            records.append(record)
    staged = repo.stage(branch, {"kind": "snap", "files": records, "message": args.message or ""},
                        took_effect=os.path.abspath(args.root))
    say("staged " + staged.summary())


def cmd_reboot(args):
    required_message(args.message, "reboot")
    repo, branch = author_context(args)
    staged = repo.stage(branch, {"kind": "reboot", "message": args.message or ""})
    say("staged " + staged.summary())


def cmd_retract(args):
    required_message(args.message, "retract")
    repo, branch = author_context(args)
    repo.require_lock(branch)
    # Unsigned, the head is read as an --insecure host reads it; ci judges the publication as a whole.
    head, entries, _ = repo.verified(branch, author_signers(args, branch), unsigned=True)
    named = entry_at(entries, args.seq)
    if named is None:
        raise UsageError("branch %s has no entry %d (its head is at seq %d)" % (branch, args.seq, head.seq))
    fields = {"kind": "retract", "retracted_seq": named.seq, "retracted_id": named.id, "message": args.message}
    Repository.check_retraction(repo.check_staged(dict(fields), "entry"), entries)
    staged = repo.stage(branch, fields)
    say("staged %s: %s" % (staged.summary(), named.summary()))


def cmd_staged(args):
    repo, branch = author_context(args)
    repo.require_lock(branch)
    items = [{"number": n, "kind": fields.get("kind"), "summary": repo.check_staged(fields, "staged entry %d" % n)
              .summary(), "message": fields.get("message", "")} for n, fields in enumerate(repo.staged(branch), 1)]
    if args.json:
        emit(json.dumps(items, indent=2, sort_keys=True) + "\n")
        return
    for item in items:
        show("%3d  %s%s" % (item["number"], item["summary"], "  # " + item["message"] if item["message"] else ""))
    show("isconf: %d staged on branch %s" % (len(items), branch))


def cmd_unstage(args):
    repo, branch = author_context(args)
    dropped = repo.unstage(branch, args.number)
    say("unstaged %d: %s" % (args.number, dropped.summary()))


def signing_key(args):
    """The key a publication is signed with; publishing unsigned takes an explicit --unsigned,
    since every host that checks signatures refuses an unsigned head."""
    key = args.sign or os.environ.get("ISCONF_SIGN_KEY") or None
    if getattr(args, "unsigned", False):
        if key:
            raise UsageError("--unsigned and a signing key (--sign or ISCONF_SIGN_KEY) contradict each other; "
                             "give one")
        return None
    if not key:
        raise UsageError("%s needs a signing key: --sign KEY or ISCONF_SIGN_KEY (hosts that check signatures "
                         "refuse an unsigned head)%s" % (args.verb, "; --unsigned publishes one for --insecure hosts "
                                                         "only" if hasattr(args, "unsigned") else ""))
    return key


def cmd_ci(args):
    required_message(args.message, "ci")
    key = signing_key(args)
    expires = parse_duration(args.expires) if args.expires else None
    repo, branch = author_context(args)
    head, entries, in_effect = repo.checkin(branch, args.message, author_signers(args, branch), key, expires,
                                            args.dry_run)
    for entry in entries:
        say("%s %d %s" % ("would append" if args.dry_run else "appended", entry.seq, entry.summary()))
    if args.dry_run:
        say("dry run: branch %s would be at seq %d (%d new); nothing written" % (branch, head.seq, len(entries)))
        return
    say("branch %s now at seq %d (%d new), head %s%s" % (
        branch, head.seq, len(entries), head.id[:16], "" if key else " (UNSIGNED)"))
    record_authored(args, repo, branch, in_effect)


def cmd_fork(args):
    check_branch(args.new)
    key = signing_key(args)
    expires = parse_duration(args.expires) if args.expires else None
    repo, branch = author_context(args)
    head = repo.fork(branch, args.new, author_signers(args, branch), key, expires)
    say("branch %s forked from %s at seq %d%s" % (args.new, branch, head.seq, "" if key else " (UNSIGNED)"))


def cmd_sign(args):
    key = signing_key(args)
    expires = parse_duration(args.expires) if args.expires else None
    repo, branch = author_context(args)
    head, entries = repo.resign(branch, author_signers(args, branch), key, expires, args.adopt)
    if args.adopt is not None:
        for entry in entries:
            say("vouched for %d %s" % (entry.seq, entry.summary()))
    say("head of branch %s at seq %d signed again%s" % (
        branch, head.seq, ", expires " + head.expires if head.expires else ""))


def cmd_promote(args):
    check_branch(args.source)
    key = signing_key(args)
    expires = parse_duration(args.expires) if args.expires else None
    repo, branch = author_context(args)
    head, added = repo.promote(branch, args.source, author_signers(args, branch), key, expires)
    if not added:
        say("branch %s already holds every entry of %s (seq %d); nothing written" % (branch, args.source, head.seq))
        return
    for entry in added:
        say("promoted %d %s" % (entry.seq, entry.summary()))
    say("branch %s fast-forwarded to %s: now at seq %d (%d new)%s" % (branch, args.source, head.seq, len(added),
                                                                      "" if key else " (UNSIGNED)"))


def signature_key(signature):
    """The fingerprint of the key that made an SSH signature, or None if it is not one."""
    try:
        blob = _dearmour(signature)
        wire = _Wire(blob[len(_SSHSIG_MAGIC):], "signature")
        wire.uint32()
        return key_fingerprint(wire.string())
    except Refused:
        return None


def cmd_branches(args):
    repo, rows = open_repository(args), []
    for name in repo.branch_names():
        head = repo.head(name)
        try:
            signature = repo.branch_dir(name).read("head.sig", SIGNATURE_MAX)
        except FileNotFoundError:
            signature = None
        holder = repo.lock_holder(name)
        rows.append({"branch": name, "seq": head.seq, "time": head.time, "expires": head.expires,
                     "signed_by": signature_key(signature) if signature else None,
                     "lock": dict(holder, age=int(time.time() - parse_time(holder["time"])))
                     if holder and TIME_RE.match(holder["time"]) else holder})
    if args.json:
        emit(json.dumps(rows, indent=2, sort_keys=True) + "\n")
        return
    for row in rows:
        lock = row["lock"]
        show("%-20s seq %-6d %s%s  %s%s" % (row["branch"], row["seq"], row["time"],
                                            ", expires " + row["expires"] if row["expires"] else "",
                                            row["signed_by"] or "UNSIGNED",
                                            "  locked by %s %s ago: %s" % (lock["who"], age(lock.get("age", 0)),
                                                                           lock["why"]) if lock else ""))


def signer_names(signers):
    """Each trusted key as a warning names it: its principals, fingerprint and type."""
    return ", ".join("%s %s" % (",".join(signer.principals), _key_name(signer.key_blob)) for signer in signers)


def signers_change(host, text):
    """The warning for allowed_signers replaced by text: the keys it adds and removes (None if the same)."""
    try:
        old = parse_allowed_signers(host.read_signers(), host.signers_path)
    except FileNotFoundError:
        old = []
    except (OSError, Refused, StateError) as e:
        return "%s, which could not be read (%s), replaced by --signers" % (host.signers_path, e)
    new = parse_allowed_signers(text)
    added = [s for s in new if s.key_blob not in set(o.key_blob for o in old)]
    removed = [o for o in old if o.key_blob not in set(s.key_blob for s in new)]
    if not added and not removed:
        return None
    return "trusted keys in %s replaced by --signers: added %s; removed %s" % (
        host.signers_path, signer_names(added) or "none", signer_names(removed) or "none")


def reset_drops(host, values, variables):
    """What init --reset drops from the config it replaces, as one warning (None if nothing)."""
    try:
        old = host.config
    except StateError as e:
        return "--reset replaces a config that could not be read: %s" % e
    dropped = ["variable %s" % name for name in sorted(old.env) if name not in variables]
    dropped += ["option %s = %s" % (name, text) for name, text in old.texts.items()
                if name not in ("branch", "urls", "insecure") and name not in values]
    dropped += ["mirror %s" % redact_url(url) for url in old.urls if url not in values["urls"].split()]
    if old.insecure and values["insecure"] != "yes":
        dropped.append("insecure = yes")
    return "--reset drops from %s: %s" % (old.path, "; ".join(dropped)) if dropped else None


def check_branch_move(host, previous, branch):
    """A host that fetched or applied anything changes branch through migrate alone, which checks that
    the new branch extends what it applied; else status and the next run would speak of the other
    branch's journal ('up to date', 'rewritten')."""
    local = host.local_head()
    followed = previous or (local.branch if local is not None else None)
    if followed is None or followed == branch:
        return
    applied_seq = host.history().applied()[0]
    if local is not None or applied_seq:
        raise UsageError("this host follows branch %s and has %s; init --force does not change its branch: run "
                         "'isconf migrate %s', which checks that %s extends what this host applied"
                         % (followed, "applied through seq %d" % applied_seq if applied_seq else
                            "fetched its journal", branch, branch))


def cmd_init(args):
    if args.branch:
        # Not taken from ISCONF_BRANCH: an author's shell setting must not pick a host's branch.
        check_branch(args.branch)
    host = Host(args.root, args.config)
    for url in args.urls:
        check_no_credentials(url)
        check_config_value(url, "URL %s" % printable(redact_url(url)))
        if len(url.split()) > 1:  # white space separates the mirrors in the config
            raise UsageError("URL %s holds white space, which separates mirrors in the config; write it "
                             "percent-encoded (%%20), a directory as a file:// URL" % redact_url(url))
        Mirror(url)
    if args.signers and args.insecure:
        raise UsageError("--insecure and --signers contradict each other: give --signers FILE alone to check "
                         "signatures, or --insecure alone not to")
    variables = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("not NAME=VALUE")
            check_variable(name, value)
        except ValueError:
            raise UsageError("--var %r is not NAME=VALUE with a shell-style NAME (ISCONF_* are reserved)" % item)
        check_config_value(value, "--var %s" % printable(item))
        variables[name] = value
    exists = host.has_config()
    # --force starts from the config there (a damaged one is exit 7, unless --reset); --reset from nothing.
    keep = exists and args.force and not args.reset
    if not keep:
        if not args.branch:
            raise UsageError("init needs --branch NAME, the branch this host follows")
        if not args.urls:
            raise UsageError("init needs at least one URL, a mirror of the repository")
        if not args.signers and not args.insecure:
            raise UsageError("init needs --signers FILE (the authors' keys, allowed_signers format) or an "
                             "explicit --insecure")
    if exists and not args.force:
        raise UsageError("%s exists; use --force to change it (what is not given is kept, the applied history "
                         "too)" % host.config_path)
    old = host.config if keep else None
    if args.baseline is not None and args.baseline < 1:
        raise UsageError("--baseline %d is not a seq: give the seq of the last transaction the image holds (1 or "
                         "more)" % args.baseline)
    values = collections.OrderedDict(old.texts if old else ())
    values["branch"] = args.branch or old.branch
    if args.urls:
        values["urls"] = "\n".join(args.urls)
    if args.signers or args.insecure:
        values["insecure"] = "yes" if args.insecure else "no"
    try:
        for key in CONFIG_KEYS.values():
            text = getattr(args, key.name, None) if key.metavar else None
            if text is not None:
                check_config_value(text, "%s %s" % (key.option, printable(text)))
                key.value(text, key.option)
                values[key.name] = text
    except ValueError as e:
        raise UsageError(str(e))
    if args.signers:
        try:
            text = read_file(args.signers, SIGNERS_MAX)
            load_signers(args.signers)  # the very checks every 'up' makes
        except OSError as e:
            raise UsageError("--signers %s: %s" % (args.signers, e.strerror))
        except StateError as e:
            raise UsageError("--signers: %s" % e)
    env = dict(old.env) if old else {}
    env.update(variables)
    config = Config.render(values, env)
    host.make_state()
    with host.lock():  # not while an up runs: the state upgrade and the config are its too
        ensure_state(host)
        previous = old.branch if old else None
        if old is not None:
            now = host.reread_config()   # under the lock: a migrate may have moved the host meanwhile
            if now.texts != old.texts or now.env != old.env:
                raise Busy("%s changed while init read it (a migrate, or an edit); run init again"
                           % host.config_path)
        if exists and args.reset:
            try:
                previous = host.config.branch
            except StateError:
                pass
            dropped = reset_drops(host, values, variables)
            if dropped:
                warn(dropped)
        if exists:
            check_branch_move(host, previous, values["branch"])
        if args.baseline is not None:
            declare_baseline(host, args.baseline)
        if args.signers:
            change = signers_change(host, text) if exists else None
            if change:
                warn(change)
            host.etc(create=True).write(posixpath.basename(SIGNERS_PATH), text, 0o644)
        host.write_config(config)
        stale = stale_units(host, Config(host.config_path, config)) if exists else []
    urls = values["urls"].split()
    say("%s follows branch %s from %s" % (host.root, values["branch"], ", ".join(redact_url(u) for u in urls)))
    if stale:  # the boot unit's TimeoutStartSec would cut a longer boot_wait short, a new share go unmounted
        warn("%s differ from what 'isconf install' writes for this config (boot_wait, file-share mirrors): run "
             "'isconf install' again"
             % ", ".join(os.path.join(host.root, path[1:]) for path in stale))


def cmd_up(args):
    if args.json and not args.dry_run:
        raise UsageError("--json goes with --dry-run; for the state of this host, run 'isconf status --json'")
    if args.diff and not args.dry_run:
        raise UsageError("--diff goes with --dry-run: 'isconf up --dry-run --diff'")
    try:
        return recorded_up(args, Host(args.root, args.config))
    except (Busy, Disabled) as e:
        if not args.periodic:
            raise
        say(str(e))  # a state, recorded as any run's result: the next run comes anyway
        return e.exit_code


def cmd_status(args):
    host = Host(args.root, args.config)
    report = status_report(host)
    # monitoring: non-zero while the host is halted
    code = EXIT_FAILED if report["failed"] else EXIT_NEWER if report["needs_newer"] else EXIT_OK
    if args.json:
        emit(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return code
    for line in status_text(report, host.config.interrupted_max,
                            reboot_advice(host.root, host.config.reboot_command)):
        show(line)
    return code


def cmd_log(args):
    host = Host(args.root, args.config)
    host.config  # an uninitialised host is told to run init
    if args.n is not None and args.n < 0:
        raise UsageError("-n %d: give the number of newest entries to show, 0 or more" % args.n)
    history = host.history()
    head, rows, _, _ = host_report(host, history)
    rows = list(reversed(rows))[:args.n] if args.n is not None else list(reversed(rows))
    repairs = {}  # by id, as every event: 'verify --repair' put back paths this entry snapped
    for event in history.events:
        if event["event"] == "repaired":
            repairs.setdefault(event["id"], []).append({key: event.get(key) for key in ("time", "who", "count",
                                                                                       "paths")})
    if args.json:
        emit(json.dumps([entry.as_json(state=mark, run_by=run_by(event), repaired=repairs.get(entry.id, []))
                         for entry, mark, event in rows], indent=2, sort_keys=True) + "\n")
        return
    if head is None:  # an empty report would read as an empty journal
        say("no journal verified on %s yet: run 'isconf up'" % host.root)
    for entry, mark, event in rows:
        show("%-7s %4d %s %s %s" % (mark, entry.seq, entry.id[:12], entry.time, entry.author))
        show("             %s" % entry.summary())
        if entry.message:
            show("             # %s" % entry.message)
        if mark == "skipped":
            show("             skipped by %s: %s" % (event.get("who"), event.get("why")))
        if mark == "retracted":
            show("             retracted by seq %s: %s" % (event.get("by_seq"), event.get("why")))
        for repair in repairs.get(entry.id, []):
            show("             repaired %s by %s: %s" % (repair["time"], repair["who"], repaired_text(repair)))


def verify_repair(args, host):
    """verify --repair: Repair, then one line per path it put back or could not, the drift left, and
    exit 0 only when every path asked (every drifted one, without PATH) no longer drifts."""
    asked = None
    if args.paths:
        asked = list(collections.OrderedDict((validate_path_arg(p, "PATH"), None) for p in args.paths))
    repair = Repair(host, asked, args.quick, author_name()).run()
    refresh_metrics(host)
    for path in repair.repaired:
        show("repaired: %s" % path)
    for path, why in repair.left:
        show("not repaired: %s: %s" % (path, why))
    wanted = set(asked) if asked is not None else None
    remaining = [d for d in repair.still if wanted is None or d["path"] in wanted or d["path"] in repair.repaired]
    for drift in remaining:
        show("drift: %s: %s" % (drift["path"], drift_text(drift["what"], drift["expected"], drift["found"])))
    left = len(set(d["path"] for d in repair.still))
    show("isconf: %d repaired, %d not repaired; %s in %s (applied up to seq %d)"
         % (len(repair.repaired), len(repair.left), "%d drifted" % left if left else "no drift",
            plural(len(repair.files), "journaled path"), repair.applied_seq))
    return EXIT_DRIFT if repair.left or remaining else EXIT_OK


def cmd_verify(args):
    host = Host(args.root, args.config)
    host.config  # an uninitialised host is told to run init
    if args.paths and not args.repair:
        raise UsageError("PATH names what --repair puts back; 'isconf verify' alone checks every journaled path")
    if args.repair and args.json:
        raise UsageError("--json is for 'verify' alone; --repair says what it did one line per path")
    if args.repair:
        return verify_repair(args, host)
    _, rows, applied_seq, _ = host_report(host)
    files = journaled_files(rows)
    drifts = disk_drifts(host.rootpath, files, args.quick)
    try:  # for status and the metrics (isconf_drift_paths); verify itself takes no lock and needs none
        host.record_verify(len(set(d["path"] for d in drifts)), len(files), args.quick)
    except (IsconfError, OSError) as e:
        warn("the result of this verify was not recorded: %s" % e)
    refresh_metrics(host)
    if args.json:
        emit(json.dumps(drifts, indent=2, sort_keys=True) + "\n")
    else:
        for drift in drifts:
            show("drift: %s: %s" % (drift["path"], drift_text(drift["what"], drift["expected"], drift["found"])))
        show("isconf: %s in %s (applied up to seq %d)"
             % (plural(len(drifts), "drift") if drifts else "no drift", plural(len(files), "journaled path"),
                applied_seq))
        if drifts:
            show("isconf: 'isconf verify --repair [PATH...]' puts them back as the journal last made them")
    return EXIT_DRIFT if drifts else EXIT_OK


def cmd_migrate(args):
    host = Host(args.root, args.config)
    check_branch(args.new_branch)
    with host.lock():
        config = host.config
        if args.new_branch == config.branch:
            raise UsageError("this host already follows branch %s" % config.branch)
        plan = Sync(Run(host, parse_now(args.now))).sync(stage=True, branch=args.new_branch)
        # The config first: if we die before the commit, the next 'up' sees a local copy
        # of the old branch and finishes the move.  One line changes, so comments survive.
        directory, name = host.config_dir()
        text, found = re.subn(r"(?m)^branch\s*[=:].*$", "branch = " + args.new_branch,
                              directory.read(name, CONFIG_MAX).decode("utf-8"), count=1)
        if not found:
            raise StateError("cannot find the 'branch =' line in %s; set it to %s by hand" % (config.path,
                                                                                              args.new_branch))
        host.write_config(text.encode("utf-8"))
        plan.commit(host)
    say("now following branch %s (%d pending); run 'isconf up'" % (args.new_branch, len(plan.pending)))


def host_reason(text, verb):
    """A -m WHY an admin gives a host (skip, disable): said, and short enough for its one record."""
    if not text.strip():
        raise UsageError("%s needs a reason: -m WHY is kept for whoever looks next" % verb)
    if len(text) > ERROR_MAX:
        raise UsageError("%s: -m WHY is %d characters; say it in at most %d (a ticket number can point to the "
                         "rest)" % (verb, len(text), ERROR_MAX))
    return text


def cmd_skip(args):
    host_reason(args.message, "skip")
    host = Host(args.root, args.config)
    with host.lock():
        head = host.local_head()
        history = host.history(recent=True)  # as a run reads them: the cost of what is pending
        applied_seq = history.applied()[0]
        entry = {e.seq: e for e in host.local_journal(head, applied_seq)}.get(args.seq)
        if args.seq != applied_seq + 1 or entry is None:
            raise UsageError("only the next transaction (seq %d) can be skipped, and only after it failed"
                             % (applied_seq + 1))
        last = history.last(entry)  # by id: the same seq on another branch is not this entry
        if not last or last["event"] != "failed":
            raise UsageError("transaction %d has not failed here; only a failed transaction can be skipped"
                             % args.seq)
        history.record("skipped", entry, why=args.message, who=author_name())
        drop_left_copies(host.rootpath, entry)
    refresh_metrics(host)
    say("transaction %d marked skipped on this host: %s" % (args.seq, args.message))


def cmd_disable(args):
    host_reason(args.message, "disable")
    host = Host(args.root, args.config)
    host.config  # an uninitialised host is told to run init
    host.make_state()
    with host.lock(args.wait):  # not in the middle of an up: it is paused between runs, never within one
        ensure_state(host)
        record = {"who": author_name(), "why": args.message, "time": format_time(time.time())}
        paused = host.disabled()
        if paused is not None:
            if not args.force:  # another admin's pause is not silently taken over
                raise Disabled("this host is already disabled by %s; 'isconf disable --force -m WHY' adds your "
                               "reason to theirs, 'isconf enable' lifts it" % disabled_text(paused))
            record["earlier"] = (paused.pop("earlier") + [paused])[-DISABLED_KEPT:]
        host.state.write("disabled", canonical(record) + b"\n", 0o644)
    refresh_metrics(host)
    say("%s disabled: 'isconf up' does nothing (exit %d) until 'isconf enable'" % (host.root, EXIT_DISABLED))


def cmd_enable(args):
    host = Host(args.root, args.config)
    host.config
    with host.lock(args.wait):
        try:
            paused = host.disabled()
        except StateError as e:   # too damaged to read: it still pauses the host, and enable still lifts it
            warn("%s; removing it" % e)
            paused = {"who": "someone", "time": "?", "why": "(the record is damaged)"}
        if paused is None:
            say("%s was not disabled" % host.root)
            return
        host.state.unlink("disabled")
        host.state.fsync()
    refresh_metrics(host)
    say("%s enabled (it was disabled by %s)" % (host.root, disabled_text(paused)))


def cmd_verify_sig(args):
    try:
        text = read_file(args.signers, SIGNERS_MAX)
        signers = parse_allowed_signers(text, args.signers)
        data = read_file(args.file, VERIFY_MAX)
        signature = read_file(args.signature, SIGNATURE_MAX)
    except OSError as e:
        raise UsageError("cannot read %s: %s" % (e.filename, e.strerror))
    except (Refused, StateError) as e:
        raise UsageError(str(e))
    if not signers:
        raise UsageError("--signers %s lists no keys" % args.signers)
    signer = verify_signature(data, signature, signers, namespace=args.namespace, now=parse_now(args.now))
    say("good signature by %s (%s)" % (",".join(signer.principals), key_fingerprint(signer.key_blob)))


def cmd_serve(args):
    if not os.path.isdir(args.dir):
        raise UsageError("%s is not a directory" % args.dir)
    if not 0 <= args.port <= 65535:
        raise UsageError("--port %d is not a TCP port (0 to 65535; 0 picks a free one)" % args.port)
    return serve(args.dir, args.bind, args.port)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written: their line breaks are part of what they teach.  Its width
    found as argparse finds it (COLUMNS, the terminal, else 80), but without shutil, which argparse
    would import in every run for it, help or not."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            try:
                width = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                width = 0
            if width <= 0:
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    width = 0
            width = (width if width > 0 else 80) - 2
        super(HelpFormatter, self).__init__(prog, indent_increment, max_help_position, width)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as every other error is."""

    verb = None  # the verb of the command line, for an option argparse finds only at the end (unrecognized)

    def error(self, message):
        prog = self.prog
        if message.startswith("unrecognized arguments") and self.verb:
            prog = "%s %s" % (prog, self.verb)  # the verb's options, not isconf's, are what was mistyped
        raise UsageError("%s (see '%s --help')" % (message, prog))

    def _print_message(self, message, file=None):
        # --help and --version: through the one owner of output, like everything else.
        if message:
            emit(message)


HELP = """\
isconf keeps hosts identical by replaying one signed, ordered journal.

On every host (the agent):
  isconf init http://repo.example/isconf/ --branch web --signers keys.txt
  isconf up            fetch, verify and apply pending transactions
  isconf status        where this host stands; isconf log: the journal
  isconf verify        which journaled files changed on disk since they were applied
  isconf install       the agent and its units, at boot (up -r --boot) and periodic

As an author (working on a repository directory, --repo or ISCONF_REPO):
  isconf lock -m 'upgrade nginx'
  isconf exec -- apt-get install -y nginx
  isconf snap /etc/nginx/nginx.conf
  isconf ci --sign ~/.ssh/id_ed25519
  isconf sign --sign ~/.ssh/id_ed25519 --expires 30d   renew the head's expiry
"""
VERIFY_ABOUT = """\
Each path's last applied snap is the reference (a file an exec removed since is still
drift): content, type, mode, owner, group, link target.  It reads the verified local
journal and the host state only, never the network.  One line per drift:
  drift: /etc/motd: content differs
  drift: /etc/ssh/sshd_config: mode 0644, journal says 0600

--repair puts each drifted path (or each PATH, as the journal names it) back as its
last applied snap made it: content, type, mode, owner, group, link target, hard links,
through the install a snap uses, under the host lock, from staged objects or, pruned
since, fetched from the mirrors and verified by hash (nothing installed unless all
verify).  Out of its reach, said one line each: a path no applied snap records (an
exec's work), one an exec applied after its snap names.  Recorded in the history
('repaired', shown by log and status).  Refused while the host is disabled.

exit codes: 0 no drift (--repair: every path asked for repaired), 8 drift found
(--repair: drift remains, or a path out of its reach), 2 usage, 3 a pruned object
reached no mirror, 4 a mirror's object failed its hash (nothing installed), 6 busy,
7 local state problem, 9 disabled (--repair).
"""


def global_options(suppress):
    """--root, --config, --repo, --branch: accepted before or after the verb.  suppress: the verb's copy,
    out of its --help (which points to 'isconf --help' for them) and without defaults of its own."""
    options = argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter)

    def option(*names, **kw):
        if suppress:
            kw.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        options.add_argument(*names, **kw)
    option("--root", default=os.environ.get("ISCONF_ROOT", "/"),
           help="the host's root directory, e.g. a mounted target disk (default /)")
    option("--config", help="host config file (default ROOT%s)" % CONFIG_PATH)
    option("--repo", default=os.environ.get("ISCONF_REPO"),
           help="repository directory, for author verbs (default: $ISCONF_REPO)")
    option("--no-mounts", action="store_true",
           help="inside a --root other than /, do not mount /proc, /sys, /dev and /run for execs, and at boot do "
           "not put isconf's systemctl over the root's (execs then find it by PATH only) (default: mount them)")
    option("-q", "--quiet", action="store_true",
           help="print nothing unless something goes wrong: warnings and errors only, for cron (default: off)")
    option("--debug", action="store_true",
           help="show the traceback of an internal error (default: keep it in the state directory)")
    option("--branch", help="branch: for 'init', the one this host follows (required; with --force, kept unless "
           "given); for author verbs, the one to work on (default: $ISCONF_BRANCH, else the host's branch)")
    return options


def exit_codes_help(codes):
    """The 'exit codes' block of a --help: each of codes with its meaning, from EXIT_CODES."""
    return "exit codes:\n" + "\n".join("%5s %s: %s" % ("128+N" if code == EXIT_SIGNAL else code, result, meaning)
                                         for code, result, meaning in EXIT_CODES if code in codes)


def whole_number(text):
    """An integer argument in ASCII digits (int() also takes other scripts' digits)."""
    if not re.match(r"^-?[0-9]{1,18}\Z", text):
        raise argparse.ArgumentTypeError("invalid int value: %r (ASCII digits only)" % text)
    return int(text)


def real_number(text):
    """A number argument in ASCII digits (float() also takes other scripts' digits)."""
    if not NUMBER_RE.match(text.lstrip("-")):
        raise argparse.ArgumentTypeError("invalid float value: %r (ASCII digits only)" % text)
    return float(text)


def wait_seconds(text):
    try:
        return parse_positive(text, float, "--wait", MAX_DEADLINE)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def wait_option(p, what):
    p.add_argument("--wait", nargs="?", type=wait_seconds, const=float(DEFAULT_WAIT), metavar="SECONDS",
                   help="if the host is busy, wait up to SECONDS (default %d) for %s instead of exiting 6"
                   % (DEFAULT_WAIT, what))


class UnbuiltParser(object):
    """Stands for the parser of a verb this run does not parse: what is added to it is dropped."""

    def add_argument(self, *args, **kw):
        pass

    def set_defaults(self, **kw):
        pass


def named_verb(argv):
    """The verb argv names, so that only its parser is built; None to build them all (no verb, or
    before it an option spelled other than in full, which argparse may read otherwise)."""
    i = 0
    while i < len(argv):
        option = argv[i].split("=", 1)[0]
        if argv[i] in ("--root", "--config", "--repo", "--branch"):
            i += 2
        elif option in ("--root", "--config", "--repo", "--branch", "--no-mounts", "--debug", "--quiet", "-q"):
            i += 1
        elif argv[i].startswith("-"):
            return None
        else:
            return argv[i]
    return None


def build_parser(only=None):
    """The command line.  With only (a verb), the other verbs are listed but their options are
    not built: argparse takes several milliseconds for twenty verbs, a tenth of what an
    up-to-date run adds to starting the interpreter."""
    common = global_options(suppress=True)
    parser = Parser(prog="isconf", description=HELP, formatter_class=HelpFormatter,
                    parents=[global_options(suppress=False)],
                    epilog=exit_codes_help([code for code, _, _ in EXIT_CODES]))
    parser.verb = only
    parser.add_argument("--version", action="version", version="isconf " + __version__)
    parser.add_argument("--self-test", action="store_true", help="check this file can run here (it loads, "
                        "imports every module it uses, verifies a built-in signature, reads --root's state) and "
                        "print its version; an agent "
                        "runs it on a new agent before installing it")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")

    pointer = "global options (%s): see 'isconf --help'" % ", ".join(
        action.option_strings[0] for action in common._actions)
    every = (EXIT_OK, EXIT_USAGE, EXIT_STATE, EXIT_SOFTWARE, EXIT_SIGNAL)  # what any verb may return

    def verb(name, func, help_text, example, about=None, codes=()):
        """A command; its --help lists its own options, points to 'isconf --help' for the global ones, and
        ends with its exit codes (codes: those beyond every verb's) and an example, as a man page's do."""
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            return UnbuiltParser()
        p = sub.add_parser(name, parents=[common], help=help_text,
                           description=help_text + ("\n\n" + about if about else ""),
                           epilog="%s\n\n%s\n\nexample:\n%s" % (
                               pointer, exit_codes_help(every + tuple(codes)),
                               "\n".join("  " + line for line in example.splitlines())),
                           formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    def signing_options(p, unsigned=True):
        p.add_argument("--sign", metavar="KEY", help="SSH private key, or public key held by ssh-agent "
                       "(default: $ISCONF_SIGN_KEY; this%s is required)" % (" or --unsigned" if unsigned else ""))
        p.add_argument("--expires", metavar="DURATION", help="the new head expires after DURATION, e.g. 30d or 12h "
                       "(default: never)")
        if unsigned:
            p.add_argument("--unsigned", action="store_true", help="publish an unsigned head, for --insecure hosts "
                           "only (default: off)")
        signers_option(p, "to verify the branch as they do before anything is written")

    def signers_option(p, what):
        p.add_argument("--signers", metavar="FILE", help="the keys the branch's hosts trust (allowed_signers "
                       "format), %s (default: $ISCONF_SIGNERS, else, on a host of the branch, the keys it trusts)"
                       % what)

    def now_option(p):
        p.add_argument("--now", metavar="TIME", help="judge expiry and key validity as if the UTC time were TIME, "
                       "e.g. 2026-11-25T06:30:00Z, for a miniroot with no clock (default: this machine's clock, "
                       "never earlier than the last verified head)")

    # The agent's verbs, in the order a host meets them.
    p = verb("init", cmd_init, "configure this host to follow a branch",
             "isconf init http://repo.example/isconf/ http://10.1.0.5/isconf/ --branch web \\\n"
             "    --signers /root/isconf-signers --var ROLE=web\n"
             "isconf init --force --retries 5     # one option changed, the rest of the config kept",
             codes=(EXIT_BUSY,))
    p.add_argument("urls", nargs="*", metavar="URL", help="repository mirrors, tried in order (http(s)://, "
                   "file://, or a directory); with --force, the URLs given replace the config's, none keeps them")
    p.add_argument("--signers", help="trusted authors' keys, OpenSSH allowed_signers format (this or --insecure "
                   "is required, but with --force: then it replaces the trusted keys, warning which it adds and "
                   "removes; without it they are kept)")
    p.add_argument("--insecure", action="store_true", help="accept unsigned heads (warned about on every run; "
                   "default: off; with --force, kept as it was unless this or --signers is given)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="per-host variable for every exec (repeatable; with --force, sets NAME and keeps the "
                   "others; default: none)")
    for key in CONFIG_KEYS.values():
        if key.metavar:
            p.add_argument(key.option, dest=key.name, metavar=key.metavar, help=key.help)
    p.add_argument("--force", action="store_true", help="change an existing config: what is given replaces its "
                   "value (--var sets one variable), what is not given is kept; a new --branch only before the "
                   "first fetch (then 'isconf migrate BRANCH') (default: refuse)")
    p.add_argument("--reset", action="store_true", help="with --force, start from nothing instead, warning what "
                   "it drops (default: off)")
    p.add_argument("--baseline", type=whole_number, metavar="SEQ", help="the image already holds every "
                   "transaction up to SEQ (built without isconf): the first fetch checks SEQ exists, 'up' applies "
                   "what follows (default: none, replay from seq 1)")
    p = verb("up", cmd_up, "fetch, verify and apply every pending transaction",
             "isconf up                     # by hand: one line per transaction\n"
             "isconf up --dry-run --json    # what would run, and what it would fetch\n"
             "isconf up --dry-run --diff    # what each snap would change on this host's disk\n"
             "isconf up -q --splay 600      # from cron: quiet unless something is wrong\n"
             "isconf up -r --boot           # at boot: wait for a mirror, reboot at a reboot entry",
             codes=(EXIT_FAILED, EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_REBOOT, EXIT_BUSY, EXIT_DISABLED, EXIT_NEWER,
                    EXIT_PENDING))
    wait_option(p, "a running 'up' (or skip, migrate, init) to finish")
    p.add_argument("-r", "--reboot", action="store_true", help="at a reboot entry, record it and run the "
                   "config's reboot_command, on the machine running isconf, even for a --root (default: stop there "
                   "with exit 5)")
    p.add_argument("--boot", action="store_true", help="run from init: wait for a mirror (backing off) up to "
                   "the boot wait, and log to syslog too (default: off)")
    p.add_argument("--boot-wait", type=real_number, metavar="SECONDS", help="with --boot, wait this long instead of "
                   "the config's boot_wait (default %d)" % DEFAULT_BOOT_WAIT)
    p.add_argument("--splay", type=real_number, metavar="SECONDS", help="first sleep a part of SECONDS fixed by this "
                   "host's machine-id, plus a little jitter, so a fleet on one cron minute does not knock at once "
                   "(default: no sleep)")
    p.add_argument("--syslog", action="store_true", help="log to syslog (ROOT/dev/log) as well as the console "
                   "(default: only with --boot)")
    p.add_argument("--periodic", action="store_true", help="a scheduled run (the timer and cron pass it): a host "
                   "busy (exit %d) or disabled (exit %d) is said as a message on stdout, not as an error on "
                   "stderr, so cron mails nothing; the exit code stays (default: off)" % (EXIT_BUSY, EXIT_DISABLED))
    p.add_argument("--dry-run", action="store_true", help="fetch and verify, show what would run and the objects "
                   "to fetch, apply nothing; exit %d if something would run, 0 if nothing (default: off)"
                   % EXIT_PENDING)
    p.add_argument("--json", action="store_true", help="with --dry-run, print the plan as JSON (default: text)")
    p.add_argument("--diff", action="store_true", help="with --dry-run, show what each snap would change on the "
                   "disk: a diff of each text file (a file others may not read, as 0600 or 0640, on disk or in the "
                   "snap, only as changing), one line for each other change (default: off)")
    now_option(p)
    p = verb("status", cmd_status, "show branch, applied position, pending work and any failure",
             "isconf status\nisconf status --json | jq .pending", codes=(EXIT_FAILED, EXIT_NEWER))
    p.add_argument("--json", action="store_true", help="one JSON object, for monitoring (default: text)")
    p = verb("log", cmd_log, "show the journal, newest first, with each entry's state here",
             "isconf log -n 5\nisconf log --json")
    p.add_argument("--json", action="store_true", help="a JSON list, newest first (default: text)")
    p.add_argument("-n", type=whole_number, metavar="N", help="show only the newest N entries (default: all)")
    p = verb("verify", cmd_verify, "compare the files the journal last snapped with the disk; exit %d on any "
             "drift, or --repair it" % EXIT_DRIFT, "isconf verify\nisconf verify --quick --json\n"
             "isconf verify --repair /etc/motd", about=VERIFY_ABOUT,
             codes=(EXIT_DRIFT, EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_BUSY, EXIT_DISABLED))
    p.add_argument("--json", action="store_true", help="print the drifts as a JSON list of {path, what, expected, "
                   "found} (default: one line each)")
    p.add_argument("--quick", action="store_true", help="take a file whose size and mtime are the journal's to "
                   "hold its content, without reading it (default: read and hash every file)")
    p.add_argument("--repair", action="store_true", help="put each drifted path back as the journal last made it "
                   "(default: only report drift)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="with --repair, only these journaled paths, absolute "
                   "inside the root (default: every drifted path)")
    p = verb("skip", cmd_skip, "mark the failed transaction SEQ as skipped on this host, for good",
             "isconf skip 3 -m 'site.conf not used on this host'", codes=(EXIT_BUSY,))
    p.add_argument("seq", type=whole_number, metavar="SEQ", help="the failed transaction's seq (as status shows it)")
    p.add_argument("-m", dest="message", required=True, metavar="WHY", help="why, kept in the history (required)")
    p = verb("migrate", cmd_migrate, "follow another branch that extends what this host applied",
             "isconf migrate web2 && isconf up", codes=(EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_BUSY))
    p.add_argument("new_branch", metavar="BRANCH", help="the branch to follow from now on")
    now_option(p)
    p = verb("disable", cmd_disable, "pause this host: 'up' applies nothing until 'enable'",
             "isconf disable -m 'disk swap, ticket 4242'", codes=(EXIT_BUSY, EXIT_DISABLED))
    p.add_argument("-m", dest="message", required=True, metavar="WHY", help="why, shown by status and up "
                   "(required)")
    p.add_argument("--force", action="store_true", help="on a host already disabled, add this reason to the "
                   "earlier ones, all shown by status (default: refuse, exit %d)" % EXIT_DISABLED)
    wait_option(p, "a running 'up' to finish")
    p = verb("enable", cmd_enable, "lift a 'disable'", "isconf enable", codes=(EXIT_BUSY,))
    wait_option(p, "a running 'up' to finish")
    p = verb("install", cmd_install, "put this agent at ROOT%s and write the units that run it at boot and "
             "periodically (default: --systemd --timer where ROOT has systemd, else --sysv --cron)" % INSTALL_PATH,
             "isconf --root /mnt/target install --systemd --timer", codes=(EXIT_BUSY,))
    for kind, what in INSTALL_KINDS:
        p.add_argument("--" + kind, dest="kinds", action="append_const", const=kind, help=what)
    verb("uninstall", cmd_uninstall, "remove what install wrote, unless it was changed since",
         "isconf uninstall", codes=(EXIT_BUSY,))
    p = verb("verify-sig", cmd_verify_sig, "check an SSH signature of FILE the way hosts check heads",
             "isconf verify-sig head --signature head.sig --signers /etc/isconf/allowed_signers",
             codes=(EXIT_REFUSED,))
    p.add_argument("file", metavar="FILE", help="the signed file")
    p.add_argument("--signature", required=True, metavar="SIG", help="its signature, as ssh-keygen -Y sign "
                   "writes it (required)")
    p.add_argument("--signers", required=True, metavar="ALLOWED_SIGNERS", help="trusted keys (required)")
    p.add_argument("--namespace", default=SIGNATURE_NAMESPACE, help="signature namespace (default %s)"
                   % SIGNATURE_NAMESPACE)
    now_option(p)

    # The author's verbs, in the order of a change.

    def author_verb(name, func, help_text, example, codes=(), **kw):
        # Each may end with exit 3: its repository's file system stopped answering (StallGuard).
        return verb(name, func, help_text, example, codes=tuple(codes) + (EXIT_UNREACHABLE,), **kw)
    p = author_verb("init-repo", cmd_init_repo, "create an empty repository directory", "isconf init-repo /srv/isconf")
    p.add_argument("dir", metavar="DIR", help="the directory to create (or an empty one)")
    p = author_verb("lock", cmd_lock, "take the branch's author lock", "isconf --branch web lock -m 'upgrade nginx'\n"
             "isconf --branch web-canary lock --new -m 'a canary ring for web'", codes=(EXIT_REFUSED, EXIT_BUSY))
    p.add_argument("-m", dest="message", required=True, metavar="WHY", help="what you are about to change "
                   "(required)")
    p.add_argument("--new", action="store_true", help="start a branch that does not exist yet, refusing one that "
                   "does (default: refuse a branch never published, naming those that were)")
    signers_option(p, "to finish a publication a crash interrupted")
    p = author_verb("exec", cmd_exec, "run a command now (inside --root) and stage it if it exits 0",
             "isconf exec -m 'web server' -- apt-get install -y nginx", codes=(EXIT_FAILED, EXIT_BUSY))
    p.add_argument("--no-run", action="store_true", help="stage without running (default: run first)")
    p.add_argument("--cwd", default="/", help="working directory inside the root (default /)")
    p.add_argument("-m", dest="message", metavar="WHY", help="why, kept in the journal (default: none)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]", help="the command and its "
                   "arguments, after --")
    p = author_verb("snap", cmd_snap, "stage the current content and metadata of files",
             "isconf snap -m 'banner' /etc/motd /etc/nginx/nginx.conf", codes=(EXIT_BUSY,))
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, symlinks or directories, inside --root")
    p.add_argument("-r", "--recursive", action="store_true", help="a directory with everything under it: "
                   "directories, files, symbolic links and hard links (default: the directory alone)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="with -r, leave out paths "
                   "whose full path or name matches the shell PATTERN (repeatable; default: none)")
    p.add_argument("-m", dest="message", metavar="WHY", help="why, kept in the journal (default: none)")
    p = author_verb("reboot", cmd_reboot, "stage a reboot", "isconf reboot -m 'new kernel'", codes=(EXIT_BUSY,))
    p.add_argument("-m", dest="message", metavar="WHY", help="why, kept in the journal (default: none)")
    p = author_verb("ci", cmd_ci, "append staged entries to the journal, sign the head, unlock",
             "isconf ci --sign ~/.ssh/id_ed25519 --expires 30d", codes=(EXIT_REFUSED, EXIT_BUSY))
    p.add_argument("-m", dest="message", metavar="WHY", help="check-in message (default: none)")
    p.add_argument("--dry-run", action="store_true", help="verify the branch and the staged work, sign, and show "
                   "what would be published; write nothing (default: off)")
    signing_options(p)
    p = author_verb("retract", cmd_retract, "stage a retract of entry SEQ: every host that has not applied it skips "
             "it, a host halted at it carries on", "isconf retract 41 -m 'wrong package name; fixed in 42'",
             codes=(EXIT_REFUSED, EXIT_BUSY))
    p.add_argument("seq", type=whole_number, metavar="SEQ", help="the entry to retract")
    p.add_argument("-m", dest="message", required=True, metavar="WHY", help="why, shown by every host's status "
                   "and log (required)")
    signers_option(p, "to verify the entry it names")
    p = author_verb("staged", cmd_staged, "list what is staged on the branch, numbered from 1",
             "isconf staged\nisconf staged --json", codes=(EXIT_REFUSED, EXIT_BUSY))
    p.add_argument("--json", action="store_true", help="a JSON list (default: text)")
    p = author_verb("unstage", cmd_unstage, "drop staged entry N (as 'staged' numbers it)", "isconf unstage 2",
             codes=(EXIT_BUSY,))
    p.add_argument("number", type=whole_number, metavar="N", help="the staged entry's number")
    p = author_verb("unlock", cmd_unlock, "release your lock (--force: break another's, discarding their work)",
             "isconf unlock", codes=(EXIT_BUSY,))
    p.add_argument("--force", action="store_true", help="break another author's lock and discard their staged "
                   "work (default: off)")
    p = author_verb("fork", cmd_fork, "create branch NEW starting as a copy of this branch",
             "isconf --branch web fork web2 --sign ~/.ssh/id_ed25519", codes=(EXIT_REFUSED, EXIT_BUSY))
    p.add_argument("new", metavar="NEW", help="the new branch's name")
    signing_options(p)
    p = author_verb("promote", cmd_promote, "fast-forward this branch to branch FROM's journal (a ring after its "
             "canary), under a new signed head", "isconf --branch web promote web-canary --sign ~/.ssh/id_ed25519",
             codes=(EXIT_REFUSED, EXIT_BUSY))
    p.add_argument("source", metavar="FROM", help="the branch whose journal extends this one's")
    signing_options(p)
    p = author_verb("sign", cmd_sign, "sign the branch's current head again (renew its expiry, or sign an unsigned one)",
             "isconf sign --sign ~/.ssh/id_ed25519 --expires 30d\n"
             "isconf sign --sign ~/.ssh/id_ed25519 --adopt 12   # vouch for an unsigned head's entries",
             codes=(EXIT_REFUSED, EXIT_BUSY))
    signing_options(p, unsigned=False)
    p.add_argument("--adopt", type=whole_number, metavar="SEQ", help="the head is unsigned, at seq SEQ: list its "
                   "entries and sign it, vouching for exactly those (default: refuse an unsigned head)")
    p = author_verb("branches", cmd_branches, "list the repository's branches: seq, head time, expiry, signing key, lock",
             "isconf branches\nisconf branches --json")
    p.add_argument("--json", action="store_true", help="a JSON list (default: text)")

    p = verb("serve", cmd_serve, "serve a repository directory over HTTP (for trying out and tests)",
             "isconf serve /srv/isconf --bind 0.0.0.0 --port 8000")
    p.add_argument("dir", metavar="DIR", help="the repository directory")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=whole_number, default=8000, help="port to listen on; 0 picks a free one "
                   "(default 8000)")
    return parser


def save_crash_report(root, report):
    """Keep the traceback of an internal error in the host's state directory, if there is one."""
    state = Host(root).state  # with every check a run makes: never a directory that is not ours
    state.write("internal-error.log", report.encode("utf-8", "replace"), 0o600)
    return state.file("internal-error.log")


def internal_error(error, argv, args):
    """One line for the user, the whole traceback for whoever fixes it: shown with --debug,
    else kept in the host's state directory when there is one."""
    import_late("traceback")
    report = "isconf %s on Python %s, argv %r\n%s" % (__version__, sys.version.split()[0],
                                                      sys.argv[1:] if argv is None else argv,
                                                      traceback.format_exc())
    where = "run again with --debug to see the traceback"
    if getattr(args, "debug", False):
        REPORTER.trace(report)
        where = "traceback above"
    else:
        try:
            where = "traceback in %s" % save_crash_report(getattr(args, "root", None) or "/", report)
        except (OSError, IsconfError):
            pass
    REPORTER.error("%s: %s (%s); please report it" % (type(error).__name__, str(error)[:300], where), EXIT_SOFTWARE,
                   label="internal error")
    return EXIT_SOFTWARE


def main(argv=None):
    args = None
    try:
        os.umask(AGENT_UMASK)  # the modes of what isconf makes never depend on who started it
        # Started with SIGCHLD ignored (some daemons' children are): children are reaped by the kernel and
        # no exit status is ever seen (Popen said 0 for every command; the Launcher's wait fails).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, stop_on_signal)
        only = named_verb(sys.argv[1:] if argv is None else argv)
        parser = build_parser(only)
        args = parser.parse_args(argv)
        if only is not None and args.verb != only:  # not the verb it seemed to be: parse again with them all
            parser = build_parser()
            args = parser.parse_args(argv)
        # What a re-exec runs again; None when called from Python (main(argv)): that never re-executes.
        args.argv = sys.argv[1:] if argv is None else None
        REPORTER.quiet = args.quiet
        if args.self_test:
            return cmd_self_test(args)
        if not getattr(args, "func", None):
            emit(parser.format_help())
            return EXIT_USAGE
        if args.branch and args.verb in HOST_BRANCH_VERBS:
            check_host_branch(args)
        if args.verb not in LIGHT_VERBS:
            import_late()
        code = args.func(args)
        return EXIT_OK if code is None else code
    except IsconfError as e:
        REPORTER.error(str(e), e.exit_code)
        return e.exit_code
    except BrokenPipeError:  # 'isconf log | head' is not an error
        REPORTER.closed_pipe()
        return EXIT_OK
    except OSError as e:
        # The last net for a system call no step above expected to fail (a full disk, a
        # read-only root): still one line, and the local-state exit code.
        where = " (%s)" % e.filename if e.filename else ""
        REPORTER.error("%s%s%s" % (e.strerror or e, where, denied_advice(e) or
                                   "; check the disk and permissions, then run again"), EXIT_STATE)
        return EXIT_STATE
    except KeyboardInterrupt as e:
        # Every record is written whole or not at all: an interrupted transaction runs again next time.
        signum = getattr(e, "signum", signal.SIGINT)
        REPORTER.error("interrupted by %s; nothing is left half-recorded: run the command again to carry on"
                       % signal.Signals(signum).name, EXIT_SIGNAL + signum, label=None)
        return 128 + signum
    except Exception as e:  # noqa: B902 -- a bug: never reported as a failed transaction
        return internal_error(e, argv, args)
    finally:
        REPORTER.flush()  # here, not at exit, where a failure would turn into exit 120


if __name__ == "__main__":
    sys.exit(main())
