"""make bench: each figure beside a floor measured in the same run, as the median of a few runs.

The machine may be shared and busy: compare the ratios, not the raw times.  Figures:

  exec      a catch-up of 1,000 `exec /bin/true` in a busybox chroot, against a shell loop running
            the same command 1,000 times in the same chroot
  scale     catch-ups of 100 and of 10,000 `exec /bin/true` side by side: the cost per transaction
            (above a no-op of the same host) of each, and their ratio
  snap      a catch-up of 10,000 snaps of one small file each, against writing and fsyncing the
            same files from Python
  noop      an up-to-date `up` on journals of 10 and of 1,000,000 entries (wall time, requests,
            bytes), against the interpreter importing what the agent imports at start (what an
            up-to-date run needs) and compiling it
  tail      10 new entries on the 1,000,000-entry journal: bytes fetched against their size
  large     a 1 GiB object against `curl -s URL | sha256sum` of the same URL from the same nginx, and
            the agent's whole `up` against `curl -o F && sha256sum F && sync F`
  sparse    a sparse 1 GiB file holding 1 MiB, snapped and applied: its size on the host's disk
  many      1,000 small objects from a server that answers each request after 20 ms, against one
            request after another
  verify    verifying a signed head (Ed25519, RSA) in process, against `ssh-keygen -Y verify`

  peers     the same work for each tool, side by side: 100 commands and 100 small files on a fresh
            host, then a no-op, by isconf and by CFEngine (`cf-agent`), Puppet (`puppet apply`) and
            Ansible (`ansible-pull` of a local git repository) when installed (`apt-get install cfengine3
            puppet-agent ansible git`; a missing one is skipped), each run checked for its work; ratios
            against isconf

Usage: tests/bench.py [--runs N] [FIGURE ...]   (all figures by default)

Journals and host states are written directly (entries made with isconf's own functions), never
by replaying a million transactions.  Everything lives in one temporary directory, removed at
the end.  The agent runs as `python -I isconf.py`, as on a host.
"""

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
ISCONF = os.path.join(TOP, "isconf.py")
sys.path.insert(0, TOP)
sys.path.insert(0, HERE)

import isconf  # noqa: E402
from conftest import PYTHONS, Keys, install_busybox  # noqa: E402

BRANCH = "web"
TIME = "2026-12-01T00:00:00Z"
MiB, GiB = 1 << 20, 1 << 30
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}


# --- output ------------------------------------------------------------------------------------

def median(values):
    return statistics.median(values)


def heading(text):
    print("\n" + text)
    sys.stdout.flush()


def row(label, value, floor=None, unit="", note=""):
    """One figure: its median, the floor's, and their ratio."""
    fmt = (lambda v: str(v) if not isinstance(v, float) else "%.0f" % v if abs(v) >= 100 else "%.3g" % v)
    text = "  %-52s %10s %-5s" % (label, fmt(value), unit)
    if floor is not None:
        text += " floor %10s %-5s ratio %6.2f" % (fmt(floor), unit, value / floor if floor else float("inf"))
    if note:
        text += "  " + note
    print(text.rstrip())
    sys.stdout.flush()


# --- a repository written directly -------------------------------------------------------------

def entry_line(fields):
    return isconf.canonical(dict(fields, author="bench@example", message="bench", time=TIME))


def exec_lines(count, first_seq=1, prev=isconf.ZERO_ID, argv=("/bin/true",)):
    """count canonical exec entries, chained after (first_seq - 1, prev): built by isconf.canonical
    once, then by the same bytes with seq and prev filled in (a million entries take a second)."""
    sample = entry_line({"seq": 123456789, "prev": "p" * 64, "kind": "exec", "argv": list(argv), "cwd": "/"})
    template = sample.replace(b"%", b"%%").replace(b"p" * 64, b"%s").replace(b"123456789", b"%d")
    assert template % (b"p" * 64, 123456789) == sample
    lines, sha256 = [], hashlib.sha256
    prev = prev.encode()
    for seq in range(first_seq, first_seq + count):
        line = template % (prev, seq)
        prev = sha256(line).hexdigest().encode()
        lines.append(line)
    isconf.Entry.parse(lines[0], "bench entry").check("bench entry")  # what a host will accept
    return lines


def snap_lines(records, first_seq=1, prev=isconf.ZERO_ID):
    """One snap entry per list of file records."""
    lines = []
    for seq, files in enumerate(records, first_seq):
        line = entry_line({"seq": seq, "prev": prev, "kind": "snap", "files": files})
        prev = isconf.sha256_hex(line)
        lines.append(line)
    isconf.Entry.parse(lines[0], "bench entry").check("bench entry")
    return lines


def file_record(path, size, sha, extents=None):
    record = {"path": path, "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "user": "root", "group": "root",
              "mtime_ns": 1764547200 * 10 ** 9, "size": size, "object": sha}
    if extents is not None:
        record["extents"] = extents
    return record


def store_object(repo, data):
    sha = isconf.sha256_hex(data)
    with open(os.path.join(repo, "objects", sha), "wb") as f:
        f.write(data)
    return sha


class Repo(object):
    """A repository directory holding one branch, written directly and signed with ssh-keygen."""

    def __init__(self, path, keys):
        self.path, self.keys = path, keys
        self.seq, self.last_id, self.length = 0, isconf.ZERO_ID, 0
        os.makedirs(os.path.join(path, "branches", BRANCH))
        os.makedirs(os.path.join(path, "objects"))
        with open(os.path.join(path, isconf.REPO_MARKER), "wb") as f:
            f.write(isconf.canonical({"format": isconf.FORMAT}) + b"\n")

    def file(self, name):
        return os.path.join(self.path, "branches", BRANCH, name)

    def append(self, lines):
        """Append entries (chained after the last one) and publish a new signed head."""
        data = b"".join(line + b"\n" for line in lines)
        with open(self.file("journal"), "ab") as f:
            f.write(data)
        self.seq += len(lines)
        self.last_id = isconf.sha256_hex(lines[-1])
        self.length += len(data)
        head = isconf.Head.build(BRANCH, self.seq, self.last_id, self.length, time.time())
        with open(self.file("head"), "wb") as f:
            f.write(head.data)
        if os.path.exists(self.file("head.sig")):
            os.unlink(self.file("head.sig"))
        subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", self.keys.private, "-n", "isconf",
                        self.file("head")], check=True)
        return head


# --- a server that counts ----------------------------------------------------------------------

SERVE = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import isconf
directory, delay, log = sys.argv[2], float(sys.argv[3]), sys.argv[4]
out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class Counted(object):
    def __init__(self, f):
        self.f, self.count = f, 0

    def readline(self, *a):
        line = self.f.readline(*a)
        self.count += len(line)
        return line

    def read(self, *a):
        data = self.f.read(*a)
        self.count += len(data)
        return data

    def write(self, data):
        n = self.f.write(data)
        self.count += len(data)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


class Handler(isconf.StaticHandler):
    def setup(self):
        super(Handler, self).setup()  # http.server.BaseHTTPRequestHandler's, mixed in by static_server
        self.rfile, self.wfile = Counted(self.rfile), Counted(self.wfile)

    def do_GET(self):
        start = time.time()
        if delay:
            time.sleep(delay)   # a distant CDN: each answer comes after a round trip
        self.serve(body=True)
        record = {"path": self.path, "in": self.rfile.count, "out": self.wfile.count, "start": start,
                  "end": time.time()}
        self.rfile.count = self.wfile.count = 0
        os.write(out, (json.dumps(record) + "\n").encode())

    def log_request(self, *a):
        pass


Handler.directory = os.path.abspath(directory)
server = isconf.static_server(("127.0.0.1", 0), Handler)
sys.stdout.write("http://127.0.0.1:%d\n" % server.server_address[1])
sys.stdout.flush()
server.serve_forever()
"""


class Server(object):
    """A static server (isconf's own handler) in a process of its own, logging per request the
    bytes received and sent and when it started and ended; with delay, each answer waits first."""

    def __init__(self, directory, log, delay=0.0):
        self.log = log
        open(log, "wb").close()
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", SERVE, TOP, directory, str(delay), log],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.url = self.proc.stdout.readline().decode().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError("bench server did not start")

    def requests(self):
        with open(self.log) as f:
            return [json.loads(line) for line in f]

    def mark(self):
        return len(self.requests())

    def since(self, mark):
        return self.requests()[mark:]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


NGINX_CONF = """
daemon off;
user root;
pid %(tmp)s/nginx.pid;
error_log %(tmp)s/nginx-error.log;
events {}
http {
    log_format bench '$request_uri $status $request_length $bytes_sent $msec $request_time';
    access_log %(log)s bench;
    sendfile on;
    client_body_temp_path %(tmp)s; proxy_temp_path %(tmp)s; fastcgi_temp_path %(tmp)s;
    uwsgi_temp_path %(tmp)s; scgi_temp_path %(tmp)s;
    server {
        listen 127.0.0.1:%(port)d;
        root %(repo)s;
    }
}
"""


class Nginx(Server):
    """Debian's nginx serving a repository, its access log giving the same fields as Server's."""

    def __init__(self, directory, log):
        self.log, tmp = log, os.path.dirname(log)
        open(log, "wb").close()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = log + ".conf"
        with open(conf, "w") as f:
            f.write(NGINX_CONF % {"tmp": tmp, "log": log, "port": port, "repo": directory})
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([binary, "-c", conf, "-e", os.path.join(tmp, "nginx-error.log")],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.url = "http://127.0.0.1:%d" % port
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError("nginx did not start")
                time.sleep(0.05)

    def requests(self):
        found = []
        with open(self.log) as f:
            for line in f:
                path, _, received, sent, end, took = line.split()
                found.append({"path": path, "in": int(received), "out": int(sent), "end": float(end),
                              "start": float(end) - float(took)})
        return found


# --- hosts --------------------------------------------------------------------------------------

def agent(root, *args, rss=False):
    """Run the agent on root: (seconds, peak RSS in KiB or None, output, CPU seconds).

    The peak RSS is VmHWM of the agent's own address space, read from /proc while it runs (the
    rusage of a child would count this process's size too: the child is a copy of it until exec)."""
    argv = [sys.executable, "-I", ISCONF, "--root", root] + list(args)
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV)
        peak = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if rss else 0)
            if pid:
                break
            try:
                with open("/proc/%d/status" % proc.pid) as f:
                    peak = int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1))
            except (OSError, AttributeError):
                pass
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        proc.returncode = 0
        out.seek(0)
        text = out.read()
    if status:
        raise RuntimeError("isconf %s exited with status %#x:\n%s" % (" ".join(args), status,
                                                                    text.decode("utf-8", "replace")[-3000:]))
    return elapsed, peak, text, usage.ru_utime + usage.ru_stime


def new_host(root, url, keys, busybox=True):
    os.makedirs(root)
    if busybox:
        install_busybox(root)
    agent(root, "init", url, "--branch", BRANCH, "--signers", keys.signers)
    return root


def fake_applied_host(root, url, keys, repo):
    """A host that applied all of repo's journal, its state written directly: the verified copy
    of the journal, the head and its signature, and a history whose last event is the head's
    entry done (a real host would hold two events per transaction before it; only the last
    ones are read)."""
    new_host(root, url, keys)
    host = isconf.Host(root)
    isconf.ensure_state(host)
    shutil.copyfile(repo.file("journal"), host.path("journal"))
    with open(repo.file("head.sig"), "rb") as f:
        host.state.write("head.sig", f.read())
    with open(repo.file("head"), "rb") as f:
        host.state.write("head", f.read())
    host.state.append_record("history", {"event": "done", "seq": repo.seq, "id": repo.last_id, "time": TIME})
    host.state.close()
    return root


def traffic(requests):
    return len(requests), sum(r["in"] for r in requests), sum(r["out"] for r in requests)


# --- figures ------------------------------------------------------------------------------------

def bench_exec(tmp, keys, runs, count=1000):
    heading("Catch-up of %d `exec /bin/true` in a busybox chroot (no pseudo-filesystems in it):" % count)
    repo = Repo(os.path.join(tmp, "exec-repo"), keys)
    repo.append(exec_lines(count))
    agent_times, loop_times = [], []
    loop = "i=0; while [ $i -lt %d ]; do /bin/true; i=$((i+1)); done" % count
    with Server(repo.path, os.path.join(tmp, "exec.log")) as server:
        for run in range(runs):
            root = new_host(os.path.join(tmp, "exec-host-%d" % run), server.url, keys)
            agent_times.append(agent(root, "up")[0])
            start = time.perf_counter()
            subprocess.run(["chroot", root, "/bin/sh", "-c", loop], check=True, env=ENV)
            loop_times.append(time.perf_counter() - start)
            shutil.rmtree(root)
    agent_t, loop_t = median(agent_times), median(loop_times)
    row("catch-up, whole run", agent_t * 1000, loop_t * 1000, "ms")
    row("per transaction", agent_t / count * 1000, loop_t / count * 1000, "ms")
    row("per transaction above the loop (target < 1.5 ms)", (agent_t - loop_t) / count * 1000, unit="ms")


def bench_scale(tmp, keys, runs, small=100, large=10000):
    heading("Catch-up of %d and of %d `exec /bin/true` in a busybox chroot: what a transaction costs does not grow"
            " with the journal or the history:" % (small, large))
    times, noops, servers = {small: [], large: []}, {small: [], large: []}, {}
    cpu, noop_cpu = {small: [], large: []}, {small: [], large: []}
    try:
        for count in (small, large):
            repo = Repo(os.path.join(tmp, "scale-repo-%d" % count), keys)
            repo.append(exec_lines(count))
            servers[count] = Server(repo.path, os.path.join(tmp, "scale-%d.log" % count))
        for run in range(runs):  # interleaved, so that a busy moment of the machine weighs on both alike
            for count in (small, large):
                root = new_host(os.path.join(tmp, "scale-host-%d-%d" % (count, run)), servers[count].url, keys)
                seconds, _, _, used = agent(root, "up")
                times[count].append(seconds)
                cpu[count].append(used)
                seconds, _, _, used = agent(root, "up")  # what any run costs, whatever it applies
                noops[count].append(seconds)
                noop_cpu[count].append(used)
                shutil.rmtree(root)
    finally:
        for server in servers.values():
            server.stop()
    per, above, above_cpu = {}, {}, {}
    for count in (small, large):
        per[count] = median(times[count]) / count * 1000
        above[count] = (median(times[count]) - median(noops[count])) / count * 1000
        above_cpu[count] = (median(cpu[count]) - median(noop_cpu[count])) / count * 1000
        row("%d transactions: whole run" % count, median(times[count]), unit="s")
        row("  per transaction (whole run / %d)" % count, per[count], unit="ms")
        row("  per transaction above the no-op of the same host", above[count], unit="ms")
        row("  CPU time (user + system, its commands' too) per transaction above", above_cpu[count], unit="ms")
    row("per transaction above the no-op, %d / %d (target < 1.10)" % (large, small), above[large] / above[small])
    row("  CPU time, %d / %d (the disk's barriers left out)" % (large, small), above_cpu[large] / above_cpu[small])
    row("  whole run / count, %d / %d" % (large, small), per[large] / per[small])


def bench_snap(tmp, keys, runs, count=10000):
    heading("Catch-up of %d snaps of one small file each (object fetches one after another here):" % count)
    repo = Repo(os.path.join(tmp, "snap-repo"), keys)
    contents = [("file %d of the snap bench\n" % i).encode() for i in range(count)]
    records = [[file_record("/srv/f%05d" % i, len(data), store_object(repo.path, data))]
               for i, data in enumerate(contents)]
    repo.append(snap_lines(records))
    agent_times, floor_times = [], []
    with Server(repo.path, os.path.join(tmp, "snap.log")) as server:
        for run in range(runs):
            root = new_host(os.path.join(tmp, "snap-host-%d" % run), server.url, keys)
            agent_times.append(agent(root, "up")[0])
            shutil.rmtree(root)
            floor_dir = os.path.join(tmp, "snap-floor-%d" % run)
            os.makedirs(floor_dir)
            start = time.perf_counter()
            for i, data in enumerate(contents):
                fd = os.open(os.path.join(floor_dir, "f%05d" % i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
            floor_times.append(time.perf_counter() - start)
            shutil.rmtree(floor_dir)
    agent_t, floor_t = median(agent_times), median(floor_times)
    row("catch-up, whole run", agent_t, floor_t, "s", "floor: write+fsync each file")
    row("per transaction", agent_t / count * 1000, floor_t / count * 1000, "ms")


def import_floor_code():
    """Python code that imports what the agent imports at start (its Imports section: what an
    up-to-date run needs; the modules it imports late, before a first transaction, are left out)
    and compiles the agent's file: the floor of any run of the agent (a script is compiled every
    time it runs)."""
    with open(ISCONF) as f:
        top = f.read().split("\n# Constants", 1)[0]
    modules = re.findall(r"^import ([\w.]+)", top, re.M)
    return "import %s\ncompile(open(%r, 'rb').read(), %r, 'exec')" % (", ".join(modules), ISCONF, ISCONF)


def timed(argv):
    """(wall seconds, CPU seconds) of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    if status:
        raise RuntimeError("%s failed" % argv)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def bench_noop(tmp, keys, runs, big=1000000, tail=10):
    heading("An up-to-date `up` (no-op) on journals of 10 and of %d entries:" % big)
    runs = max(runs * 3, 9)  # each run is a fraction of a second: more of them steady the median
    results = {}
    start = time.perf_counter()
    small_repo = Repo(os.path.join(tmp, "noop-repo-10"), keys)
    small_repo.append(exec_lines(10))
    big_repo = Repo(os.path.join(tmp, "noop-repo-big"), keys)
    big_repo.append(exec_lines(big))
    with Server(small_repo.path, os.path.join(tmp, "noop-10.log")) as small_server, \
            Server(big_repo.path, os.path.join(tmp, "noop-big.log")) as big_server:
        small = new_host(os.path.join(tmp, "noop-host-10"), small_server.url, keys)
        agent(small, "up")
        large = fake_applied_host(os.path.join(tmp, "noop-host-big"), big_server.url, keys, big_repo)
        print("  (journal of %d entries, %d MiB, and its host written in %.1f s)"
              % (big, big_repo.length // MiB, time.perf_counter() - start))
        agent(large, "up")  # the page cache holds what the agent reads, as on a host polling every few minutes
        floor_code = import_floor_code()
        times, cpu, floor, floor_cpu = {"10": [], "big": []}, {"10": [], "big": []}, [], []
        for _ in range(runs):  # interleaved, so that a busy moment of the machine weighs on all alike
            seconds, used = timed([sys.executable, "-I", "-c", floor_code])
            floor.append(seconds)
            floor_cpu.append(used)
            for name, root, server in (("10", small, small_server), ("big", large, big_server)):
                mark = server.mark()
                seconds, _, _, used = agent(root, "up")
                times[name].append(seconds)
                cpu[name].append(used)
                results[name] = traffic(server.since(mark))
        for name, label in (("10", "10 entries"), ("big", "%d entries" % big)):
            row("no-op, %s (target < 1.15)" % label, median(times[name]) * 1000, median(floor) * 1000, "ms",
                "floor: start imports + compile")
            row("  CPU time (user + system)", median(cpu[name]) * 1000, median(floor_cpu) * 1000, "ms")
            requests, sent, received = results[name]
            row("  requests, bytes sent, bytes received", "%d, %d, %d" % (requests, sent, received))
        row("no-op %d / no-op 10 (target < 1.10)" % big, median(times["big"]) / median(times["10"]))
        row("  CPU time", median(cpu["big"]) / median(cpu["10"]))
        bench_tail(tmp, keys, runs, big_repo, large, big_server, tail)
    shutil.rmtree(small)
    shutil.rmtree(large)


def bench_tail(tmp, keys, runs, repo, root, server, count):
    """count new entries on the big journal: what is fetched is what is new."""
    host = isconf.Host(root)
    saved = dict((name, host.state.read(name)) for name in ("head", "head.sig", "history"))
    length = repo.length
    host.state.close()
    before = repo.seq
    new = exec_lines(count, repo.seq + 1, repo.last_id)
    repo.append(new)
    new_bytes = repo.length - length
    times, fetched = [], []
    for _ in range(min(runs, 3)):
        mark = server.mark()
        times.append(agent(root, "up")[0])
        seen = server.since(mark)
        fetched.append(traffic(seen))
        host = isconf.Host(root)  # back to the state before the new entries, for the next run
        with open(host.path("journal"), "r+b") as f:
            f.truncate(length)
        for name, data in saved.items():
            host.state.write(name, data)
        host.state.close()
    requests, sent, received = fetched[-1]
    print("\n%d new entries (%d bytes) on the %d-entry journal:" % (count, new_bytes, before))
    row("bytes received (median)", median(f[2] for f in fetched), new_bytes, "B", "floor: the new entries")
    row("  requests, bytes sent", "%d, %d" % (requests, sent))
    row("  wall time of the up", median(times) * 1000, unit="ms")


def bench_large(tmp, keys, runs):
    heading("A 1 GiB object fetched by the agent (a catch-up of one snap) and by curl, from the same nginx:")
    if not shutil.which("curl"):
        print("  SKIPPED: curl is not installed (apt-get install curl): it is this figure's floor")
        return
    repo = Repo(os.path.join(tmp, "large-repo"), keys)
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    tmpname = os.path.join(repo.path, "objects", "large.tmp")
    with open(tmpname, "wb") as f:
        for i in range(GiB // MiB):
            chunk = block[i:] + block[:i]  # every MiB different
            digest.update(chunk)
            f.write(chunk)
    sha = digest.hexdigest()
    os.rename(tmpname, os.path.join(repo.path, "objects", sha))
    repo.append(snap_lines([[file_record("/srv/large", GiB, sha)]]))
    url_path = "/objects/" + sha
    agent_rates, curl_rates, curl_walls, transfer, walls, rss, up_rates, kept_rates = [], [], [], [], [], [], [], []
    with Nginx(repo.path, os.path.join(tmp, "large.log")) as server:
        for run in range(runs):
            root = new_host(os.path.join(tmp, "large-host-%d" % run), server.url, keys)
            mark = server.mark()
            wall, maxrss, _, _ = agent(root, "up", rss=True)
            agent_rates.append(GiB / MiB / span(server.since(mark), [url_path]))
            walls.append(wall)
            up_rates.append(GiB / MiB / wall)
            rss.append(maxrss / 1024.0)
            shutil.rmtree(root)
            # What a script would do to keep the object as a file, on the same file system as the host.
            kept = os.path.join(tmp, "large-kept")
            start = time.perf_counter()
            out = subprocess.run("curl -s -o %s %s%s && sha256sum %s && sync %s" % (kept, server.url, url_path, kept,
                                                                                   kept),
                                 shell=True, check=True, stdout=subprocess.PIPE).stdout.decode()
            kept_rates.append(GiB / MiB / (time.perf_counter() - start))
            assert out.split()[0] == sha, out
            os.unlink(kept)
            mark = server.mark()
            start = time.perf_counter()
            out = subprocess.run("curl -s %s%s | sha256sum" % (server.url, url_path), shell=True, check=True,
                                 stdout=subprocess.PIPE).stdout.decode()
            curl_walls.append(GiB / MiB / (time.perf_counter() - start))
            assert out.split()[0] == sha, out
            curl_rates.append(GiB / MiB / span(server.since(mark), [url_path]))
            mark = server.mark()
            subprocess.run(["curl", "-s", "-o", "/dev/null", server.url + url_path], check=True)
            transfer.append(GiB / MiB / span(server.since(mark), [url_path]))
    row("fetch, MiB/s (target > 0.7)", median(agent_rates), median(curl_rates), "MiB/s",
        "floor: curl | sha256sum; both as nginx saw the request")
    row("  curl | sha256sum, from start to its last byte hashed", median(curl_walls), unit="MiB/s")
    row("  curl -o /dev/null: the transfer alone", median(transfer), unit="MiB/s")
    row("  the agent's whole up (fetch, stage, install)", median(walls), unit="s")
    row("whole up, MiB/s (target >= 1.0)", median(up_rates), median(kept_rates), "MiB/s",
        "floor: curl -o F && sha256sum F && sync F")
    row("  peak RSS of the agent (target < 64 MiB)", median(rss), unit="MiB")
    shutil.rmtree(repo.path)


def bench_sparse(tmp, keys, runs):
    heading("A sparse 1 GiB file holding 1 MiB of data, snapped by the author and applied:")
    data = os.urandom(MiB)
    src = os.path.join(tmp, "sparse-src")
    os.makedirs(os.path.join(src, "srv"))
    with open(os.path.join(src, "srv/sparse"), "wb") as f:
        f.truncate(GiB)
        f.seek(GiB // 2)
        f.write(data)
    author = os.path.join(tmp, "sparse-author")
    subprocess.run([sys.executable, "-I", ISCONF, "init-repo", author], check=True, env=ENV,
                   stdout=subprocess.DEVNULL)
    author_env = dict(ENV, ISCONF_AUTHOR="bench@example", ISCONF_SIGNERS=keys.signers)
    for args in (["lock", "--new", "-m", "sparse"], ["--root", src, "snap", "/srv/sparse"],
                 ["ci", "--sign", keys.private]):
        subprocess.run([sys.executable, "-I", ISCONF, "--repo", author, "--branch", BRANCH] + args, check=True,
                       env=author_env, stdout=subprocess.DEVNULL)
    on_disk, stored = [], []
    with Server(author, os.path.join(tmp, "sparse.log")) as server:
        for run in range(runs):
            root = new_host(os.path.join(tmp, "sparse-host-%d" % run), server.url, keys)
            mark = server.mark()
            agent(root, "up")
            stored.append(sum(r["out"] for r in server.since(mark) if r["path"].startswith("/objects/")))
            st = os.stat(os.path.join(root, "srv/sparse"))
            assert st.st_size == GiB
            on_disk.append(st.st_blocks * 512 / float(MiB))
            shutil.rmtree(root)
    row("on the host's disk, MiB (target < 2)", median(on_disk), 1.0, "MiB", "floor: the data")
    row("  fetched, MiB", median(stored) / float(MiB), unit="MiB")


def bench_many(tmp, keys, runs, count=1000, delay=0.02):
    heading("%d small objects from a server that answers each request after %d ms:" % (count, delay * 1000))
    repo = Repo(os.path.join(tmp, "many-repo"), keys)
    files = []
    for i in range(count):
        data = ("object %d of the many bench\n" % i).encode()
        files.append(file_record("/srv/m%04d" % i, len(data), store_object(repo.path, data)))
    repo.append(snap_lines([files]))
    paths = set("/objects/" + r["object"] for r in files)
    agent_spans, serial_spans, walls = [], [], []
    with Server(repo.path, os.path.join(tmp, "many.log"), delay) as server:
        netloc = urllib.parse.urlsplit(server.url).netloc
        for run in range(runs):
            root = new_host(os.path.join(tmp, "many-host-%d" % run), server.url, keys)
            mark = server.mark()
            walls.append(agent(root, "up")[0])
            agent_spans.append(span(server.since(mark), paths))
            shutil.rmtree(root)
            mark = server.mark()
            conn = http.client.HTTPConnection(netloc, timeout=30)
            for path in sorted(paths):
                conn.request("GET", path)
                conn.getresponse().read()
            conn.close()
            serial_spans.append(span(server.since(mark), paths))
    agent_t, serial_t = median(agent_spans), median(serial_spans)
    row("agent: first object request to last answer", agent_t, serial_t, "s",
        "floor: one request after another")
    row("  speed-up over one after another (target > 4)", serial_t / agent_t)
    row("  the agent's whole up (fetch, install %d files)" % count, median(walls), unit="s")


def span(requests, paths):
    """From the first object request's arrival to the last object answer's end, as the server saw it."""
    objects = [r for r in requests if r["path"] in paths]
    assert len(objects) >= len(paths), (len(objects), len(paths))
    return max(r["end"] for r in objects) - min(r["start"] for r in objects)


VERIFY = """
import sys, time
sys.path.insert(0, sys.argv[1])
import isconf
head, sig, signers = open(sys.argv[2], 'rb').read(), open(sys.argv[3], 'rb').read(), open(sys.argv[4]).read()
signers = isconf.parse_allowed_signers(signers)
times = []
for _ in range(int(sys.argv[5])):
    start = time.perf_counter()
    isconf.verify_signature(head, sig, signers)
    isconf.Head.parse(head)
    times.append(time.perf_counter() - start)
times.sort()
print(times[len(times) // 2] * 1000)
"""


def bench_verify(tmp, runs):
    heading("Verifying a signed head (signature and parse, in process), against ssh-keygen -Y verify:")
    head = isconf.Head.build(BRANCH, 1234, "ab" * 32, 987654, time.time()).data
    for kind in ("ed25519", "rsa"):
        keys = Keys(os.path.join(tmp, "verify-" + kind), kind=kind)
        path = os.path.join(tmp, "verify-" + kind, "head")
        with open(path, "wb") as f:
            f.write(head)
        subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", keys.private, "-n", "isconf", path], check=True)
        floor = []
        for _ in range(max(runs, 5)):
            with open(path, "rb") as f:
                start = time.perf_counter()
                subprocess.run(["ssh-keygen", "-q", "-Y", "verify", "-f", keys.signers, "-I", "admin@example",
                                "-n", "isconf", "-s", path + ".sig"], stdin=f, check=True,
                               stdout=subprocess.DEVNULL)
                floor.append(time.perf_counter() - start)
        for python in (sys.executable, PYTHONS[0]):
            version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                                     stdout=subprocess.PIPE).stdout.decode().strip()
            out = subprocess.run([python, "-I", "-c", VERIFY, TOP, path, path + ".sig", keys.signers,
                                  str(max(runs, 5) * 4)], stdout=subprocess.PIPE, check=True).stdout
            row("%s, python %s" % (kind, version), float(out), median(floor) * 1000, "ms",
                "floor: ssh-keygen -Y verify (a process)")


# --- peers: the same work done by other tools ---------------------------------------------------

class Peer(object):
    """One tool doing the peers' work in a directory of its own: a fresh host per run, a first run,
    then a no-op, each checked for what it did (a row timing a tool that failed would be a lie)."""

    label = binary = package = ""
    tools = ()  # the programs it needs, when more than its binary
    markers = ()  # paths a tool leaves to know a command ran

    def __init__(self, directory, commands, files):
        self.dir, self.commands, self.files = directory, commands, files
        self.root = os.path.join(directory, "tree")
        os.makedirs(directory)

    def fresh(self):
        os.makedirs(self.root)

    def clean(self):
        shutil.rmtree(self.root)

    def close(self):
        pass


class StatefulPeer(Peer):
    """A peer keeping its state (and a HOME) in self.state, made with each fresh host, removed with it."""

    state = ""

    def fresh(self):
        Peer.fresh(self)
        os.makedirs(os.path.join(self.state, "home"))

    def clean(self):
        Peer.clean(self)
        shutil.rmtree(self.state)


def run_tool(name, argv, env, codes=(0,)):
    """(wall seconds, output) of one run of a tool, whose exit status must be one of codes."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        status = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env).returncode
        elapsed = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    if status not in codes:
        raise RuntimeError("%s exited with status %d (expected %s):\n%s" % (name, status, codes, text[-3000:]))
    return elapsed, text


class IsconfPeer(Peer):
    """A repository of one exec entry per command and one snap of all the files, served by the
    bench's server (isconf's own handler), replayed by `up` into a busybox chroot."""

    def __init__(self, directory, commands, files, keys):
        Peer.__init__(self, directory, commands, files)
        self.label, self.keys = "isconf.py %s (`up`, busybox chroot)" % isconf.__version__, keys
        repo = Repo(os.path.join(directory, "repo"), keys)
        lines, prev = [], isconf.ZERO_ID
        for seq, argv in enumerate(commands, 1):
            lines += exec_lines(1, seq, prev, argv)
            prev = isconf.sha256_hex(lines[-1])
        records = [file_record(path, len(data), store_object(repo.path, data)) for path, data in files]
        lines += snap_lines([records], len(commands) + 1, prev)
        repo.append(lines)
        self.entries = len(lines)
        self.server = Server(repo.path, os.path.join(directory, "server.log"))

    def fresh(self):
        new_host(self.root, self.server.url, self.keys)
        self.done = 0

    def run(self, first):
        seconds, _, text, _ = agent(self.root, "up")
        return seconds, text.decode("utf-8", "replace")

    def actions(self, text):
        """Transactions the last run recorded done, from the host's history."""
        with open(isconf.Host(self.root).path("history")) as f:
            done = sum(json.loads(line).get("event") == "done" for line in f if line.strip())
        new, self.done = done - self.done, done
        return new

    def expected(self):
        return self.entries

    def close(self):
        self.server.stop()


CF_POLICY = """body common control
{
  bundlesequence => { "bench" };
}

body classes repaired(class)
{
  promise_repaired => { "$(class)" };
}

body perms mode644
{
  mode => "644";
}

bundle agent bench
{
  files:
%(files)s
%(markers)s
  commands:
%(commands)s
}
"""


class CFEngine(Peer):
    """cf-agent -K -f on a policy of its own, its work directory (-w) and targets in the bench's
    directory: each file a content promise, each command guarded by a marker file that a files
    promise creates once the command's class says it ran."""

    binary, package = "cf-agent", "cfengine3"

    def __init__(self, directory, commands, files):
        Peer.__init__(self, directory, commands, files)
        version = subprocess.run([self.binary, "--version"], stdout=subprocess.PIPE, env=ENV).stdout.decode()
        self.label = "%s (`cf-agent -I -K -f`)" % version.strip().splitlines()[0]
        self.markers = ["/markers/%d" % n for n in range(1, len(commands) + 1)]
        self.template, self.workdir = os.path.join(directory, "template"), os.path.join(directory, "workdir")
        os.makedirs(os.path.join(self.template, "bin"))  # cf-agent validates a policy with its workdir's cf-promises
        os.symlink(os.path.join(os.path.dirname(os.path.realpath(shutil.which(self.binary))), "cf-promises"),
                   os.path.join(self.template, "bin", "cf-promises"))
        subprocess.run(["cf-key"], env=dict(ENV, CFENGINE_TEST_OVERRIDE_WORKDIR=self.template), check=True,
                       stdout=subprocess.DEVNULL)
        text = {"files": "", "markers": "", "commands": ""}
        for path, data in files:
            text["files"] += ('    "%s%s"\n      create => "true",\n      perms => mode644,\n'
                              '      content => "%s$(const.n)";\n' % (self.root, path, data.decode().rstrip("\n")))
        for n, (argv, marker) in enumerate(zip(commands, self.markers), 1):
            text["markers"] += '    "%s%s"\n      create => "true",\n      if => "ran_%d";\n' % (self.root, marker, n)
            text["commands"] += ('    "%s"\n      if => not(fileexists("%s%s")),\n'
                                 '      classes => repaired("ran_%d");\n' % (" ".join(argv), self.root, marker, n))
        self.policy = os.path.join(directory, "policy.cf")
        with open(os.open(self.policy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(CF_POLICY % text)

    def fresh(self):
        Peer.fresh(self)
        shutil.copytree(self.template, self.workdir, symlinks=True)

    def clean(self):
        Peer.clean(self)
        shutil.rmtree(self.workdir)

    def run(self, first):
        seconds, text = run_tool("cf-agent", [self.binary, "-I", "-K", "-w", self.workdir, "-f", self.policy], ENV)
        if re.search(r"^\s*error:|failsafe", text, re.M):  # a policy it refuses is replaced by a failsafe, status 0
            raise RuntimeError("cf-agent reported errors:\n%s" % text[-3000:])
        return seconds, text

    def actions(self, text):
        return (len(re.findall(r"^\s*info: Executing .* '/bin/true \d+'$", text, re.M))
                + len(re.findall(r"^\s*info: Updated file '[^']*/etc/bench/f\d+' with content", text, re.M)))

    def expected(self):
        return len(self.commands) + len(self.files)


class Puppet(StatefulPeer):
    """puppet apply of a manifest of its own, every directory it writes (--confdir, --vardir,
    --codedir, --logdir, --rundir, --publicdir) in the bench's directory: each command an exec with
    `creates` on a marker that a file resource requiring it creates, each file a content resource."""

    binary, package = "puppet", "puppet-agent"

    def __init__(self, directory, commands, files):
        Peer.__init__(self, directory, commands, files)
        version = subprocess.run([self.binary, "--version"], stdout=subprocess.PIPE, env=ENV).stdout.decode()
        self.label = "Puppet %s (`puppet apply`)" % version.strip()
        self.markers = ["/markers/%d" % n for n in range(1, len(commands) + 1)]
        lines = ['file { ["%s/etc", "%s/etc/bench", "%s/markers"]: ensure => directory }' % ((self.root,) * 3)]
        for argv, marker in zip(commands, self.markers):
            lines.append('exec { "%s": creates => "%s%s" }\n-> file { "%s%s": ensure => file }'
                         % (" ".join(argv), self.root, marker, self.root, marker))
        for path, data in files:
            lines.append('file { "%s%s": content => "%s\\n", mode => "0644" }'
                         % (self.root, path, data.decode().rstrip("\n")))
        self.manifest = os.path.join(directory, "site.pp")
        with open(self.manifest, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.state = os.path.join(directory, "state")
        self.argv = [self.binary, "apply", "--detailed-exitcodes", "--color=false"]
        for name in ("confdir", "vardir", "codedir", "logdir", "rundir", "publicdir"):
            self.argv += ["--" + name, os.path.join(self.state, name)]
        self.argv.append(self.manifest)

    def run(self, first):
        # --detailed-exitcodes: 2 when it changed something, 0 when nothing; 4 or 6 when something failed
        return run_tool("puppet apply", self.argv, dict(ENV, HOME=os.path.join(self.state, "home")),
                        (2,) if first else (0,))

    def actions(self, text):
        return (len(re.findall(r"Exec\[/bin/true \d+\]/returns: executed successfully", text))
                + len(re.findall(r"File\[[^\]]*/etc/bench/f\d+\]/ensure: defined content", text)))

    def expected(self):
        return len(self.commands) + len(self.files)


class Ansible(StatefulPeer):
    """ansible-pull of a playbook (local.yml) committed to a git repository of its own, checked out
    by file:// URL into a directory of each fresh host, run with --only-if-changed as its users run
    it from cron: each command a `command` task guarded by `creates` on a marker that a task of its
    own touches once the command changed, each file a `copy` task with its content.  Its no-op is a
    `git` fetch that finds the checkout up to date, after which ansible-pull does not run the
    playbook at all: the cheapest no-op it has, not a run of the playbook finding nothing to do."""

    binary, package = "ansible-pull", "ansible git"
    tools = ("ansible-pull", "git")

    def __init__(self, directory, commands, files):
        Peer.__init__(self, directory, commands, files)
        self.markers = ["/markers/%d" % n for n in range(1, len(commands) + 1)]
        tasks = ['    - name: directories\n      file:\n        path: "{{ item }}"\n        state: directory\n'
                 '      loop: [%s, %s]\n' % (json.dumps(self.root + "/etc/bench"), json.dumps(self.root + "/markers"))]
        for n, (argv, marker) in enumerate(zip(commands, self.markers), 1):
            tasks.append('    - name: %s\n      command: %s\n      args:\n        creates: %s\n      register: ran%d\n'
                         '    - name: marker %d\n      file:\n        path: %s\n        state: touch\n'
                         '      when: ran%d is changed\n'
                         % (" ".join(argv), " ".join(argv), json.dumps(self.root + marker), n, n,
                            json.dumps(self.root + marker), n))
        for path, data in files:
            tasks.append('    - name: %s\n      copy:\n        dest: %s\n        content: %s\n        mode: "0644"\n'
                         % (path, json.dumps(self.root + path), json.dumps(data.decode())))
        self.repo = os.path.join(directory, "repo")
        os.makedirs(self.repo)
        with open(os.path.join(self.repo, "local.yml"), "w") as f:
            f.write("- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n" + "".join(tasks))
        git = ["git", "-C", self.repo, "-c", "user.name=bench", "-c", "user.email=bench@example"]
        for argv in (["init", "-q"], ["add", "local.yml"], ["commit", "-q", "-m", "bench"]):
            subprocess.run(git + argv, env=dict(ENV, HOME=directory), check=True)
        with open(shutil.which(self.binary)) as f:  # the interpreter Ansible is installed for
            words = f.readline()[2:].split()
        self.state = os.path.join(directory, "state")
        self.env = dict(ENV, HOME=os.path.join(self.state, "home"), ANSIBLE_NOCOLOR="1",
                        ANSIBLE_LOCAL_TEMP=os.path.join(self.state, "local-tmp"),
                        ANSIBLE_REMOTE_TEMP=os.path.join(self.state, "remote-tmp"), ANSIBLE_RETRY_FILES_ENABLED="0",
                        ANSIBLE_PYTHON_INTERPRETER=shutil.which(words[1]) if words[0].endswith("/env") else words[0])
        os.makedirs(self.env["HOME"])  # even --version writes in it
        version = subprocess.run([self.binary, "--version"], stdout=subprocess.PIPE, env=self.env).stdout.decode()
        shutil.rmtree(self.state)
        self.label = "%s (`-o`: no-op = git fetch only)" % version.splitlines()[0].replace(" [core", "").rstrip("]")
        self.argv = [self.binary, "-U", "file://" + self.repo, "-d", os.path.join(self.state, "checkout"),
                     "-i", "localhost,", "--only-if-changed"]

    def run(self, first):
        return run_tool("ansible-pull", self.argv, self.env)

    def actions(self, text):
        """Tasks that changed, from the PLAY RECAP (none when the playbook did not run)."""
        return sum(int(n) for n in re.findall(r"^localhost\s*:\s*ok=\d+\s+changed=(\d+)", text, re.M))

    def expected(self):
        # every task changes: the directories (one task), each command and its marker, each file
        return 1 + 2 * len(self.commands) + len(self.files)


def tree_state(root, paths):
    """Per path under root: its content, inode, mtime and ctime; None when it is missing."""
    state = {}
    for path in paths:
        try:
            with open(root + path, "rb") as f:
                st = os.fstat(f.fileno())
                state[path] = (f.read(), st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            state[path] = None
    return state


def measure_peer(peer):
    """(first run, no-op) seconds of a tool on a fresh host; each run checked, failing loudly."""
    peer.fresh()
    paths = [path for path, _ in peer.files] + list(peer.markers)
    first, text = peer.run(first=True)
    state = tree_state(peer.root, paths)
    wrong = [path for path, data in peer.files if not state[path] or state[path][0] != data]
    wrong += [marker for marker in peer.markers if state[marker] is None]
    done = peer.actions(text)
    if wrong or done != peer.expected():
        raise RuntimeError("%s's first run did %d actions (expected %d); wrong or missing: %s\n%s"
                           % (peer.label, done, peer.expected(), " ".join(wrong[:5]), text[-3000:]))
    noop, text = peer.run(first=False)
    after = tree_state(peer.root, paths)
    changed = [path for path in paths if after[path] != state[path]]
    done = peer.actions(text)
    if changed or done:
        raise RuntimeError("%s's no-op did %d actions and changed %s\n%s"
                           % (peer.label, done, " ".join(changed[:5]), text[-3000:]))
    peer.clean()
    return first, noop


def bench_peers(tmp, keys, runs, count=100):
    heading("The same work for each tool, side by side: %d commands (`/bin/true N`) and %d files of 100 bytes"
            " on a fresh host (first run), then a run that finds nothing to do (no-op):" % (count, count))
    commands = [("/bin/true", str(n)) for n in range(1, count + 1)]
    files = [("/etc/bench/f%d" % n, ("file %d of the peers bench " % n).ljust(99, "-").encode() + b"\n")
             for n in range(1, count + 1)]
    base = os.path.join(tmp, "peers")
    peers = [IsconfPeer(os.path.join(base, "isconf"), commands, files, keys)]
    try:
        for cls in (CFEngine, Puppet, Ansible):
            missing = [tool for tool in cls.tools or (cls.binary,) if not shutil.which(tool)]
            if not missing:
                peers.append(cls(os.path.join(base, cls.package.split()[0]), commands, files))
            else:
                print("  SKIPPED %s: %s is not installed (apt-get install %s)" % (cls.__name__, " ".join(missing),
                                                                                 cls.package))
        times = dict((peer, ([], [])) for peer in peers)
        for _ in range(runs):  # interleaved, so that a busy moment of the machine weighs on all alike
            for peer in peers:
                first, noop = measure_peer(peer)
                times[peer][0].append(first)
                times[peer][1].append(noop)
    finally:
        for peer in peers:
            peer.close()
    base_first, base_noop = median(times[peers[0]][0]), median(times[peers[0]][1])
    print("  %-52s %10s %10s %13s %13s" % ("tool (each run checked for its work)", "first run", "no-op",
                                          "first/isconf", "no-op/isconf"))
    for peer in peers:
        first, noop = median(times[peer][0]), median(times[peer][1])
        print("  %-52s %8.3f s %8.3f s %13.2f %13.2f" % (peer.label, first, noop, first / base_first,
                                                        noop / base_noop))
    print("  (ratio: the tool's time / isconf.py's; above 1, isconf.py is faster; below 1, the tool is)")
    sys.stdout.flush()


FIGURES = ("verify", "exec", "scale", "noop", "snap", "large", "sparse", "many", "peers")


def main():
    parser = argparse.ArgumentParser(description="isconf.py figures, each beside a floor measured in the same run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is shown (default 3)")
    parser.add_argument("figures", nargs="*", metavar="FIGURE",
                        help="any of %s (default: all); peers compares with cf-agent, puppet apply and ansible-pull "
                        "when they are installed (apt-get install cfengine3 puppet-agent ansible git)"
                        % ", ".join(FIGURES))
    args = parser.parse_args()
    unknown = set(args.figures) - set(FIGURES + ("tail",))
    if unknown:
        parser.error("no figure %s; the figures are %s" % (", ".join(sorted(unknown)), ", ".join(FIGURES)))
    for tool in ("ssh-keygen", "chroot"):
        if not shutil.which(tool):
            sys.exit("bench: needs %s" % tool)
    tmp = tempfile.mkdtemp(prefix="isconf-bench-")
    keys = Keys(os.path.join(tmp, "keys"))
    started = time.perf_counter()
    try:
        print("isconf.py %s bench, %s, python %s, %d cores, %d run(s) per figure"
              % (isconf.__version__, time.strftime("%Y-%m-%d %H:%M:%S"), sys.version.split()[0],
                 os.cpu_count(), args.runs))
        figures = set(args.figures or FIGURES)
        if "tail" in figures:
            figures.add("noop")
        for name in FIGURES:
            if name in figures:
                {"verify": lambda: bench_verify(tmp, args.runs),
                 "exec": lambda: bench_exec(tmp, keys, args.runs),
                 "scale": lambda: bench_scale(tmp, keys, args.runs),
                 "noop": lambda: bench_noop(tmp, keys, args.runs),
                 "snap": lambda: bench_snap(tmp, keys, args.runs),
                 "large": lambda: bench_large(tmp, keys, args.runs),
                 "sparse": lambda: bench_sparse(tmp, keys, args.runs),
                 "many": lambda: bench_many(tmp, keys, args.runs),
                 "peers": lambda: bench_peers(tmp, keys, args.runs)}[name]()
    finally:
        shutil.rmtree(tmp)
    print("\nbench: %.0f s in all" % (time.perf_counter() - started))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # the temporary directory is removed
    main()
