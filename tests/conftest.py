"""Fixtures: the real script as a subprocess, a real server, real keys, real roots.

Environment variables that tune the suite (each has a default; none is needed):
  ISCONF_SEED         the seed of every randomised test (test_crash's kill times, test_fuzz's inputs and
                      mirrors); default 20261125.  A failed randomised test names its seed in its report
                      ("ISCONF_SEED=N"): set it to replay the same choices.  The in-process fuzz then feeds
                      the same bytes (but for signatures, made with the session's own key), and prints a
                      crashing input whole; the kill harness kills at the same times, but where a kill lands
                      in the agent's work depends on the machine's speed.
  ISCONF_KILLS        how many kills test_crash's random-kill harness lands (default 50; half SIGKILL, the
                      others SIGTERM or SIGINT, which the agent catches)
  ISCONF_FUZZ_INPUTS  how many mutated inputs test_fuzz feeds the parsers in process (default 100000)
  ISCONF_FUZZ_RUNS    how many end-to-end runs test_fuzz makes against a mutating mirror (default 200)
  ISCONF_POWERCUTS    how many times test_power_cut cuts a booted guest's power (default 20)
"""

import atexit
import errno
import glob
import hashlib
import importlib.util
import json
import os
import py_compile
import re
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.register_assert_rewrite("hostile")  # its checks report like a test's own

SEED = int(os.environ.get("ISCONF_SEED", "20261125"))
KILLS = int(os.environ.get("ISCONF_KILLS", "50"))
POWERCUTS = int(os.environ.get("ISCONF_POWERCUTS", "20"))

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISCONF = os.path.join(TOP, "isconf.py")
AUTHOR = "alice@example"
PRINCIPAL = "admin@example"


@pytest.fixture
def seed():
    """ISCONF_SEED: what a randomised test seeds its random.Random with (a failure reports it)."""
    return SEED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The report of a failed test that used the seed says which seed replays it."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "seed" in getattr(item, "fixturenames", ()):
        report.sections.append(("ISCONF_SEED", "ISCONF_SEED=%d; to replay: ISCONF_SEED=%d %s -m pytest -q '%s'"
                                % (SEED, SEED, sys.executable, item.nodeid)))


# `make test` runs the tests on as many processes as the machine has cores (pytest-xdist). The tests that boot
# a guest share one image and one process, so two guests never compete; the longest start first.
GUESTS = ("test_power_cut.py", "test_real_boot.py")
LONGEST = GUESTS + ("test_crash.py", "test_fuzz.py", "test_fleet.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.fspath.basename in GUESTS:
            item.add_marker(pytest.mark.xdist_group("guests"))
    items.sort(key=lambda item: item.fspath.basename not in LONGEST)


def interpreter_version(path):
    m = re.search(r"/versions/(\d+)\.(\d+)\.(\d+)/", path)
    return tuple(int(x) for x in m.groups()) if m else (0,)


# Every CPython 3.6 to 3.13 on this machine; the default interpreter if there are none.
PYTHONS = sorted((p for p in glob.glob("/root/.pyenv/versions/3.*/bin/python3")
                  if (3, 6) <= interpreter_version(p)[:2] <= (3, 13)), key=interpreter_version) or [sys.executable]
EXIT = {"ok": 0, "failed": 1, "usage": 2, "unreachable": 3, "refused": 4, "reboot": 5, "busy": 6, "state": 7,
        "disabled": 9, "newer": 10, "pending": 11}


STAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", re.M)


def undated(text):
    return STAMP_RE.sub("", text)


# The authors' own state (their locks' secrets), never under the tester's home: removed at the end of the session.
AUTHOR_STATE = tempfile.mkdtemp(prefix="isconf-author-state-")
atexit.register(shutil.rmtree, AUTHOR_STATE, True)


# Most runs start the agent's code from its bytecode: the same file, imported from a checked-hash cache
# that every start checks against the file's bytes, where `python3 isconf.py` compiles the whole file at
# each start (100 ms, thousands of times a session). Whatever concerns how the agent is started (the units,
# cron, a self-upgrade's re-exec, the other interpreters, the tests that start it with Popen) runs it as a
# script, as a host does.
py_compile.compile(ISCONF, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
FROM_BYTECODE = ("import importlib.util as u, sys; sys.argv[0] = %r; "
                 "s = u.spec_from_file_location('isconf', sys.argv[0]); m = u.module_from_spec(s); "
                 "sys.modules['isconf'] = m; s.loader.exec_module(m); sys.exit(m.main())" % ISCONF)


def agent_command(python=None):
    """The command line that starts the agent (before its arguments)."""
    if python in (None, sys.executable):
        return [sys.executable, "-I", "-c", FROM_BYTECODE]
    return [python, "-I", ISCONF]


def run_isconf(*args, python=None, env=None, expect=None, timeout=120, input=None, limits=None):
    """Run isconf.py in isolated mode; check the exit code when `expect` names one.  limits: {resource.RLIMIT_*:
    the soft and hard limit the agent starts with}, as a service manager may set them."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ISCONF_AUTHOR": AUTHOR, "LC_ALL": "C.UTF-8",
            "XDG_STATE_HOME": AUTHOR_STATE}
    base.update(env or {})
    proc = subprocess.run(agent_command(python) + [str(a) for a in args],
                          env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          preexec_fn=(lambda: [resource.setrlimit(r, (n, n)) for r, n in limits.items()]) if limits
                          else None)
    # Off a terminal every message line starts with its UTC time: out and err have it
    # removed, so a test reads the message; stdout and stderr keep the bytes as written.
    proc.out = undated(proc.stdout.decode("utf-8", "replace"))
    proc.err = undated(proc.stderr.decode("utf-8", "replace"))
    if expect is not None:
        assert proc.returncode == EXIT[expect], "isconf %s -> %d, wanted %s\nstdout:\n%s\nstderr:\n%s" % (
            " ".join(map(str, args)), proc.returncode, expect, proc.out, proc.err)
    return proc


def agent_for_nobody(tmp_path):
    """A copy of the agent that uid 65534 can run (the checkout may sit where only root can read: mktemp -d),
    kept apart from pytest's directories, which another pytest session starting meanwhile makes 0700 again;
    those on the way to tmp_path are opened to all, for what the test gives nobody there."""
    for directory in [tmp_path] + list(tmp_path.parents):
        if str(directory) in (tempfile.gettempdir(), "/"):
            break
        os.chmod(str(directory), 0o755)
    directory = tempfile.mkdtemp(prefix="isconf-nobody-")
    atexit.register(shutil.rmtree, directory, True)
    os.chmod(directory, 0o755)
    agent = os.path.join(directory, "isconf.py")
    shutil.copy(ISCONF, agent)
    os.chmod(agent, 0o755)
    return agent


def error_line(proc):
    """The one 'isconf: error:' line of a failed run (and check there is exactly one)."""
    lines = [l for l in proc.err.splitlines() if l.startswith("isconf: error:")]
    assert len(lines) == 1, proc.err
    return lines[0]


class Keys(object):
    """A real ssh-keygen key pair and an allowed_signers file that trusts it."""

    def __init__(self, directory, kind="ed25519", principal=PRINCIPAL, options=""):
        os.makedirs(directory, exist_ok=True)
        self.private = os.path.join(directory, "id_" + kind)
        bits = ["-b", "3072"] if kind == "rsa" else []
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", principal, "-f", self.private] + bits,
                       check=True, stdin=subprocess.DEVNULL)
        self.public = self.private + ".pub"
        with open(self.public) as f:
            self.public_line = f.read().strip()
        self.signers = os.path.join(directory, "allowed_signers_" + kind)
        self.write_signers(principal, options)

    def write_signers(self, principal=PRINCIPAL, options="", path=None):
        key = " ".join(self.public_line.split()[:2])
        with open(path or self.signers, "w") as f:
            f.write("%s %s%s\n" % (principal, options + " " if options else "", key))
        return path or self.signers


def import_isconf():
    """isconf.py imported as a module (once), to call its parsers and helpers in process."""
    if "isconf_in_process" not in sys.modules:
        spec = importlib.util.spec_from_file_location("isconf_in_process", ISCONF)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["isconf_in_process"] = module
    return sys.modules["isconf_in_process"]


@pytest.fixture(scope="session")
def isconf():
    """isconf.py imported as a module, to call its parsers and helpers in process."""
    return import_isconf()


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    return Keys(str(tmp_path_factory.mktemp("keys")))


@pytest.fixture(scope="session")
def rsa_keys(tmp_path_factory):
    return Keys(str(tmp_path_factory.mktemp("rsakeys")), kind="rsa")


class Author(object):
    """An author working on a repository directory, on one branch, with one key."""

    def __init__(self, repo, branch="web", keys=None):
        self.repo, self.branch, self.keys = repo, branch, keys
        self.signers = None  # the hosts' allowed_signers, when it is not keys' own (in a key rotation)
        if not os.path.exists(os.path.join(repo, "isconf-repo")):
            run_isconf("init-repo", repo, expect="ok")

    def __call__(self, *args, **kw):
        kw.setdefault("expect", "ok")
        signers = self.signers or (self.keys.signers if self.keys else None)
        if signers:  # the keys the branch's hosts trust, to verify the branch before a head is written
            kw["env"] = dict({"ISCONF_SIGNERS": signers}, **kw.get("env", {}))
        if args[:1] == ("lock",) and not os.path.exists(self.path("head")):
            args = ("lock", "--new") + args[1:]  # the branch's first change starts it
        return run_isconf("--repo", self.repo, "--branch", self.branch, *args, **kw)

    def ci(self, *args, **kw):
        sign = ["--sign", self.keys.private] if self.keys else ["--unsigned"]
        return self("ci", *(sign + list(args)), **kw)

    def commit(self, *steps, **kw):
        """lock, each step (a list of args), ci: one call per published change."""
        self("lock", "-m", kw.get("why", "test change"))
        for step in steps:
            self(*step)
        return self.ci()

    def journal(self):
        with open(os.path.join(self.repo, "branches", self.branch, "journal"), "rb") as f:
            return f.read()

    def forget_seen_head(self):
        """What an author does after rewriting the branch on purpose: forget the last signed head seen of it
        (else every verb writing a head refuses the rewritten branch as a rollback or a fork)."""
        digest = hashlib.sha256(("%s\0%s" % (os.path.abspath(self.repo), self.branch)).encode()).hexdigest()[:32]
        try:
            os.unlink(os.path.join(AUTHOR_STATE, "isconf", "head-" + digest))
        except FileNotFoundError:
            pass

    def path(self, *parts):
        return os.path.join(self.repo, "branches", self.branch, *parts)


def canary_ahead(author, keys, host):
    """A host that applied branch web's one entry, and branch canary forked from web with one entry more."""
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/base"])
    host("up", expect="ok")
    author("fork", "canary", "--sign", keys.private)
    canary = Author(author.repo, branch="canary", keys=keys)
    canary.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/canary"])
    return canary


def source_tree(tmp_path, path, content):
    """A directory holding one file at path (relative to it as a root), to snap from; returns it."""
    src = os.path.join(str(tmp_path), "src")
    full = os.path.join(src, path.lstrip("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    return src


MTIME = 1700000000123456789


def hard_link_then_its_file_replaced(author, tmp_path):
    """Two commits: /etc/a and its hard link /etc/a.link ("first"), then /etc/a alone as a new file ("second"):
    the link stays the first inode."""
    src = source_tree(tmp_path, "/etc/a", "first\n")
    os.link(os.path.join(src, "etc/a"), os.path.join(src, "etc/a.link"))
    author.commit(["--root", src, "snap", "/etc/a", "/etc/a.link"])
    os.unlink(os.path.join(src, "etc/a"))
    with open(os.path.join(src, "etc/a"), "w") as f:
        f.write("second\n")
    author.commit(["--root", src, "snap", "/etc/a"])


def make_source(src, busybox_root):
    """A source tree holding one of every kind of thing a snap records."""
    busybox_root(src)
    os.makedirs(os.path.join(src, "etc/app"), exist_ok=True)
    os.chmod(os.path.join(src, "etc/app"), 0o750)
    os.chown(os.path.join(src, "etc/app"), 33, 33)
    with open(os.path.join(src, "etc/app/app.conf"), "w") as f:
        f.write("listen 8080\n")
    os.chmod(os.path.join(src, "etc/app/app.conf"), 0o640)
    os.chown(os.path.join(src, "etc/app/app.conf"), 0, 33)
    os.utime(os.path.join(src, "etc/app/app.conf"), ns=(MTIME, MTIME))
    os.link(os.path.join(src, "etc/app/app.conf"), os.path.join(src, "etc/app/app.conf.link"))
    os.symlink("app.conf", os.path.join(src, "etc/app/current"))
    with open(os.path.join(src, "etc/app/sparse.img"), "wb") as f:
        f.truncate(8 * 1024 * 1024)
        f.seek(4 * 1024 * 1024)
        f.write(b"middle")
        f.seek(8 * 1024 * 1024)
        f.write(b"end")


def append_entry(repo_author, **fields):
    """Append an entry to repo_author's branch's journal and rewrite its head to name it, leaving head.sig as it was:
    what anyone who can write the repository directory can do, with or without a key."""
    journal = repo_author.journal()
    last = journal.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    previous = json.loads(last)
    entry = dict({"seq": previous["seq"] + 1, "prev": hashlib.sha256(last).hexdigest(), "time": previous["time"],
                  "author": "alice@example", "message": ""}, **fields)
    line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    with open(repo_author.path("journal"), "ab") as f:
        f.write(line + b"\n")
    head = json.loads(open(repo_author.path("head")).read())
    head.update(seq=entry["seq"], id=hashlib.sha256(line).hexdigest(), length=len(journal) + len(line) + 1)
    with open(repo_author.path("head"), "w") as f:
        f.write(json.dumps(head, sort_keys=True, separators=(",", ":")) + "\n")


def append_unknown_entry(author, keys, **fields):
    """Append, as a newer isconf would, an entry this isconf cannot interpret, and sign the new head."""
    append_entry(author, **dict({"message": "from a newer isconf"}, **fields))
    # Signed by a trusted key, as the newer isconf's ci would (this isconf's sign verifies the branch
    # first, and refuses a head whose old signature does not cover it).
    if os.path.exists(author.path("head.sig")):
        os.unlink(author.path("head.sig"))
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", keys.private, "-n", "isconf", author.path("head")],
                   check=True, stdin=subprocess.DEVNULL)


@pytest.fixture
def author(tmp_path, keys):
    return Author(str(tmp_path / "repo"), keys=keys)


METRICS = "/var/lib/node_exporter/textfile_collector/isconf.prom"  # where a monitored host writes its metrics


def metric(host, name, **labels):
    """One sample's value in the host's metrics file, as the official Prometheus client parses it."""
    from prometheus_client.parser import text_string_to_metric_families
    with open(host.path(METRICS)) as f:
        for family in text_string_to_metric_families(f.read()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
    raise AssertionError("no %s%s in the metrics" % (name, labels or ""))


class Server(object):
    """`isconf serve` as a real process on 127.0.0.1, with its access log."""

    def __init__(self, directory, log):
        self.log_path = log
        self.logf = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-I", ISCONF, "serve", directory, "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=self.logf, stdin=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            m = re.search(r"serving .* on (http://\S+)", self.log_text())
            if m:
                self.url = m.group(1)
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("server did not start: " + self.log_text())

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def requests(self):
        """Access-log lines of requests (not the start-up line)."""
        return [l for l in self.log_text().splitlines() if '"GET ' in l or '"HEAD ' in l]

    def mark(self):
        """Number of requests so far, to count those made after this point."""
        return len(self.requests())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.logf.close()


@pytest.fixture
def server(author, tmp_path):
    s = Server(author.repo, str(tmp_path / "access.log"))
    yield s
    s.stop()


class Host(object):
    """A host root directory driven through the real script."""

    def __init__(self, root, python=None):
        self.root, self.python = root, python
        os.makedirs(root, exist_ok=True)

    def __call__(self, *args, **kw):
        kw.setdefault("python", self.python)
        return run_isconf("--root", self.root, *args, **kw)

    def init(self, urls, keys=None, *extra):
        """isconf init: one URL or a list of mirrors, trusting `keys` (None: --insecure)."""
        urls = [urls] if isinstance(urls, str) else urls
        signers = ["--signers", keys.signers] if keys else ["--insecure"]
        return self("init", *(urls + ["--branch", "web"] + signers + list(extra)), expect="ok")

    def path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def state(self, *parts):
        return os.path.join(self.root, "var/lib/isconf", *parts)

    def status(self):
        """status --json; it exits 1 while the host is halted at a failure, else 0."""
        proc = self("status", "--json")
        report = json.loads(proc.out)
        assert proc.returncode == (1 if report["failed"] else 0), proc.err
        return report

    def snapshot(self):
        """Every file under the root with its bytes and metadata: to prove nothing changed.

        The time of the last successful run and the record of the last run are left out: recording
        them is not applying anything."""
        seen = {}
        for top, dirs, files in os.walk(self.root):
            for name in dirs + files:
                p = os.path.join(top, name)
                if p in (self.state("last-success"), self.state("last-run")):
                    continue
                st = os.lstat(p)
                content = None
                if os.path.isfile(p) and not os.path.islink(p):
                    with open(p, "rb") as f:
                        content = f.read()
                seen[os.path.relpath(p, self.root)] = (st.st_mode, st.st_uid, st.st_gid, content)
        return seen


@pytest.fixture
def host(tmp_path):
    return Host(str(tmp_path / "host"))


@pytest.fixture
def monitored(author, server, keys, host, busybox_root):
    """A host with a metrics file, following the test's repository over HTTP."""
    busybox_root(host.root)
    os.makedirs(host.path(os.path.dirname(METRICS)))
    host.init(server.url, keys, "--metrics", METRICS, "--retries", "1", "--timeout", "5")
    return host


# The agent under test in test_upgrade and test_crash runs from this file inside the host root.
AGENT = "/usr/local/sbin/isconf.py"


def build(version, change=None):
    """isconf.py as version `version`, optionally with one more (old, new) text substitution."""
    with open(ISCONF) as f:
        text = f.read()
    old = '__version__ = "%s"' % text.split('__version__ = "')[1].split('"')[0]
    text = text.replace(old, '__version__ = "%s"' % version, 1)
    if change:
        assert change[0] in text
        text = text.replace(change[0], change[1], 1)
    return text


def put(root, path, text):
    """Write text at path inside root, making its directories."""
    full = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as f:
        f.write(text)
    return full


@pytest.fixture
def systemd_root(host):
    """A root with systemd's own units, so that systemd-analyze can check ours in it."""
    for units in ("/lib/systemd/system", "/usr/lib/systemd/system"):
        if os.path.isdir(units) and not os.path.islink(units):
            shutil.copytree(units, host.path(units), symlinks=True)
            break
    os.makedirs(host.path("/lib/systemd"), exist_ok=True)
    with open(host.path("/lib/systemd/systemd"), "w"):
        pass
    return host


BUSYBOX = shutil.which("busybox") or "/bin/busybox"
# A command that kills the agent running it, as a reboot would: the one holding the host lock (its parent starts
# commands, and is not the agent).
KILL_AGENT = "kill -KILL $(/bin/busybox sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p' /var/lib/isconf/lock)"
APPLETS = ["sh", "cat", "echo", "touch", "mkdir", "rm", "ls", "sleep", "false", "true", "test", "env", "pwd"]


def install_busybox(root):
    """A minimal chroot: Debian's static busybox and a few applet links."""
    bindir = os.path.join(root, "bin")
    os.makedirs(bindir, exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(bindir, "busybox"))
    for applet in APPLETS:
        link = os.path.join(bindir, applet)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
    for p in ("etc/passwd", "etc/group"):
        os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/:/bin/false\nwww:x:33:33:www:/var/www:/bin/false\n")
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write("root:x:0:\ndaemon:x:1:\nwww:x:33:\n")


@pytest.fixture
def busybox_root():
    """A function that makes a directory into a runnable chroot."""
    if not os.path.exists(BUSYBOX):
        pytest.fail("busybox-static is not installed; .ci/run installs it")
    return install_busybox


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nginx(author, tmp_path):
    """Debian's nginx serving the repository as plain static files; yields its URL and access log.

    The log is nginx's combined format with $bytes_sent (headers included) where combined has
    $body_bytes_sent, and $request_length (what the client sent) at the end."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.fail("nginx is not installed; .ci/run installs nginx-light")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text("""
daemon off;
user root;  # the repository lives in a private pytest directory
pid %(tmp)s/nginx.pid;
error_log %(tmp)s/nginx-error.log;
events {}
http {
    log_format sent '$remote_addr - $remote_user [$time_local] "$request" $status $bytes_sent '
                    '"$http_referer" "$http_user_agent" $request_length';
    access_log %(tmp)s/nginx-access.log sent;
    client_body_temp_path %(tmp)s; proxy_temp_path %(tmp)s; fastcgi_temp_path %(tmp)s;
    uwsgi_temp_path %(tmp)s; scgi_temp_path %(tmp)s;
    server {
        listen 127.0.0.1:%(port)d;
        root %(repo)s;
        location /authoring/ { deny all; }
    }
}
""" % {"tmp": tmp_path, "port": port, "repo": author.repo})
    proc = subprocess.Popen([binary, "-c", str(conf), "-e", str(tmp_path / "nginx-error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield "http://127.0.0.1:%d/" % port, tmp_path / "nginx-access.log"
    proc.terminate()
    proc.wait(10)


def access_log(log):
    """(status, path, bytes sent) of each request in the nginx fixture's log."""
    out = []
    for line in log.read_text().splitlines():
        request, rest = line.split('"')[1], line.split('"')[2].split()
        out.append((rest[0], request.split()[1], int(rest[1])))
    return out


# --- a hostile mirror and a crafted repository (tests/hostile.py) -----------------------------

@pytest.fixture(scope="session")
def template(tmp_path_factory, keys):
    """Branch web at seq 1, 2 and 4, and branch canary, made once with the real author verbs."""
    from hostile import Template
    return Template(str(tmp_path_factory.mktemp("hostile")), keys)


@pytest.fixture(scope="session")
def attacker(tmp_path_factory):
    """A key the hosts do not trust."""
    return Keys(str(tmp_path_factory.mktemp("attacker")), principal="mallory@example")


@pytest.fixture
def mirror(template):
    from hostile import HostileMirror
    server = HostileMirror(template.repo)
    yield server
    server.stop()


@pytest.fixture
def world(template, mirror, host, keys, attacker, tmp_path, busybox_root):
    """A busybox host following the hostile mirror, with short network limits."""
    from hostile import SLOW, World
    busybox_root(host.root)
    host.init(mirror.url, keys, *SLOW)
    return World(template, mirror, host, keys, attacker, tmp_path)


class HungMount(object):
    """A real file system that hangs: a FUSE mount served by a thread here that answers nothing
    (files=None: every stat, open and read under it blocks in the kernel, as on an NFS share whose
    server died) or only what it takes to find and open the regular files of one directory
    (files: name -> size), never a READ: then the open works and the first read blocks.
    release() stops the thread and closes the last descriptor of the connection, which the
    kernel then aborts: whatever waits on it fails (ENOTCONN) and returns."""

    def __init__(self, path, files=None):
        self.path, self.files = path, files
        self.names = list(files or ())
        os.makedirs(path, exist_ok=True)
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        subprocess.run(["mount", "-i", "-t", "fuse", "-o", "fd=%d,rootmode=40000,user_id=0,group_id=0" % self.fd,
                        "isconf-hung", path], check=True, pass_fds=(self.fd,), stdin=subprocess.DEVNULL)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="hung-fuse")
        if files is not None:
            self.thread.start()

    @staticmethod
    def _attr(ino, mode, size):   # struct fuse_attr
        return struct.pack("<QQQQQQIIIIIIIIII", ino, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0,
                           4096, 0)

    def _reply(self, unique, payload=b"", error=0):
        os.write(self.fd, struct.pack("<IiQ", 16 + len(payload), -error, unique) + payload)

    def _serve(self):
        # FUSE's wire format (linux/fuse.h): a 40-byte request header, a 16-byte reply header.
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self.stopping.is_set():
            if not poller.poll(100):
                continue
            request = os.read(self.fd, 1 << 20)
            length, opcode, unique, node = struct.unpack_from("<IIQQ", request)
            body = request[40:length]
            if opcode == 26:                                       # INIT: protocol 7.31, no options
                readahead = struct.unpack_from("<III", body)[2]
                self._reply(unique, struct.pack("<IIIIHHIIHH", 7, 31, readahead, 0, 16, 12, 65536, 1, 32, 0)
                            + b"\0" * 32)
            elif opcode == 1:                                      # LOOKUP
                name = body.split(b"\0")[0].decode()
                if name not in self.files:
                    self._reply(unique, error=errno.ENOENT)
                else:
                    ino = 2 + self.names.index(name)
                    self._reply(unique, struct.pack("<QQQQII", ino, 0, 0, 0, 0, 0)
                                + self._attr(ino, stat.S_IFREG | 0o644, self.files[name]))
            elif opcode == 3:                                      # GETATTR
                attr = (self._attr(1, stat.S_IFDIR | 0o755, 0) if node == 1 else
                        self._attr(node, stat.S_IFREG | 0o644, self.files[self.names[node - 2]]))
                self._reply(unique, struct.pack("<QII", 0, 0, 0) + attr)
            elif opcode in (14, 27):                               # OPEN, OPENDIR
                self._reply(unique, struct.pack("<QII", 1, 0, 0))
            elif opcode in (18, 25, 29):                           # RELEASE, FLUSH, RELEASEDIR
                self._reply(unique)
            elif opcode == 36:                                     # INTERRUPT: a reader killed (its process ends)
                self._reply(struct.unpack_from("<Q", body)[0], error=errno.EINTR)   # as NFS's killable waits
            elif opcode not in (2, 15, 42):                        # FORGET, READ (never), BATCH_FORGET
                self._reply(unique, error=errno.ENOSYS)

    def release(self):
        if self.fd is not None:
            self.stopping.set()
            if self.thread.is_alive():
                self.thread.join(10)
            os.close(self.fd)   # the connection's last descriptor: the kernel aborts it
            self.fd = None
            subprocess.run(["umount", "-l", self.path], check=True)


@pytest.fixture
def hung_mount():
    """A function that mounts a HungMount at a path; each is released and unmounted at the end."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: a hung file system cannot be made here")
    mounts = []

    def make(path, files=None):
        mounts.append(HungMount(str(path), files))
        return mounts[-1]
    yield make
    for mount in mounts:
        mount.release()


def strace_calls(trace):
    """(pid, text) of each system call in an strace -f log, one split by another process's call
    (<unfinished ...>, then <... resumed>) joined again."""
    unfinished = {}
    with open(trace) as f:
        lines = f.read().splitlines()
    for line in lines:
        m = re.match(r"^(\d+) +(.*)$", line)
        if not m:
            continue
        pid, text = m.groups()
        if text.endswith("<unfinished ...>"):
            unfinished[pid] = text[:-len("<unfinished ...>")]
            continue
        resumed = re.match(r"^<\.\.\. \w+ resumed>(.*)$", text)
        if resumed:
            text = unfinished.pop(pid, "") + resumed.group(1)
        yield pid, text


def mounts_under(root):
    """Mount points under root in this (the miniroot's) mount namespace."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(root + "/")]


@pytest.fixture
def target(host, busybox_root):
    """A busybox root with the directories the pseudo-filesystems are mounted on (and /mnt)."""
    busybox_root(host.root)
    for name in ("proc", "sys", "dev", "run", "mnt"):
        os.makedirs(host.path("/" + name), exist_ok=True)
    return host


def pid_alive(pid):
    """Whether pid runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between the open and the read
        return False


def wait_gone(pid, seconds=15):
    deadline = time.time() + seconds
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


@pytest.fixture
def daemons():
    """pids a test started, or a killed agent could not stop; killed afterwards whatever happened."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def extents(path):
    """(offset, end) of each data extent of a file: where its holes are."""
    found, fd = [], os.open(path, os.O_RDONLY)
    try:
        end, offset = os.fstat(fd).st_size, 0
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, offset))
    finally:
        os.close(fd)
    return found


def replace_file(root, path, data, mode=0o644, uid=0, gid=0):
    """A new file at path inside root (any old one unlinked first, so a hard link to it keeps its content)
    holding the bytes data, with its mode and owner; its directories made."""
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    if os.path.lexists(full):
        os.unlink(full)
    with open(full, "wb") as f:
        f.write(data)
    os.chmod(full, mode)
    os.chown(full, uid, gid)
    return full
