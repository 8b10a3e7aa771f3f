"""make bench: figures measured side by side in one run (machines are shared: compare ratios).

Prints: the cost of verifying a signed head (Ed25519 and RSA) under the default and the
oldest interpreter; the cost of checking a long hash chain; the wall time of an
up-to-date `up` against a catch-up `up`, with the requests each made; and an up-to-date
`up` on a host that has applied 100 entries against one that has applied 5000.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import isconf  # noqa: E402
from conftest import PYTHONS, Author, Host, Keys, Server, install_busybox  # noqa: E402

VERIFY = """
import sys, time
sys.path.insert(0, sys.argv[1])
import isconf
head, sig, signers = open(sys.argv[2], 'rb').read(), open(sys.argv[3], 'rb').read(), open(sys.argv[4]).read()
signers = isconf.parse_allowed_signers(signers)
runs = int(sys.argv[5])
start = time.perf_counter()
for _ in range(runs):
    isconf.verify_signature(head, sig, signers)
    isconf.Head.parse(head)
print((time.perf_counter() - start) / runs * 1000)
"""


def row(label, value, unit=""):
    print("  %-58s %10s %s" % (label, value, unit))


def sign(keys, path):
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", keys.private, "-n", "isconf", path], check=True)
    return path + ".sig"


def bench_head_verification(tmp):
    print("Verifying a signed head (signature + parse), ms per head:")
    head = isconf.Head.build("web", 1234, "ab" * 32, 987654, time.time()).data
    for kind in ("ed25519", "rsa"):
        keys = Keys(os.path.join(tmp, kind), kind=kind)
        path = os.path.join(tmp, kind, "head")
        with open(path, "wb") as f:
            f.write(head)
        sig = sign(keys, path)
        for python in (sys.executable, PYTHONS[0]):
            out = subprocess.run([python, "-c", VERIFY, os.path.dirname(HERE), path, sig, keys.signers, "50"],
                                 stdout=subprocess.PIPE, check=True).stdout.decode()
            name = "python " + ".".join(map(str, subprocess.run(
                [python, "-c", "import sys; print(sys.version.split()[0])"], stdout=subprocess.PIPE)
                .stdout.decode().split()))
            row("%s, %s" % (kind, name), "%.2f" % float(out), "ms")


def bench_chain(count):
    print("Checking a hash chain of %d entries:" % count)
    lines, prev = [], isconf.ZERO_ID
    for seq in range(1, count + 1):
        fields = {"seq": seq, "prev": prev, "time": "2026-01-01T00:00:00Z", "author": "a@b", "message": "m",
                  "kind": "exec", "argv": ["/bin/true", str(seq)], "cwd": "/"}
        line = isconf.canonical(fields)
        prev = isconf.sha256_hex(line)
        lines.append(line + b"\n")
    data = b"".join(lines)
    start = time.perf_counter()
    isconf.verify_chain(data, 0, isconf.ZERO_ID)
    elapsed = time.perf_counter() - start
    row("%d entries, %d KiB" % (count, len(data) // 1024), "%.1f" % (elapsed * 1000), "ms")
    row("per entry", "%.1f" % (elapsed / count * 1e6), "us")


def timed(host, *args):
    start = time.perf_counter()
    host(*args, expect="ok")
    return time.perf_counter() - start


def bench_up(tmp, count, more):
    print("Replaying: %d exec transactions, then %d more, then nothing new:" % (count, more))
    keys = Keys(os.path.join(tmp, "agent-keys"))
    author = Author(os.path.join(tmp, "repo"), keys=keys)
    author("lock", "-m", "bench")
    for i in range(count):
        author("exec", "--no-run", "--", "/bin/true", str(i))
    author.ci()
    server = Server(author.repo, os.path.join(tmp, "access.log"))
    try:
        host = Host(os.path.join(tmp, "host"))
        install_busybox(host.root)
        host.init(server.url, keys)
        catch_up = timed(host, "up")
        mark = server.mark()
        noop = timed(host, "up")
        noop_requests = server.requests()[mark:]
        author("lock", "-m", "bench more")
        for i in range(more):
            author("exec", "--no-run", "--", "/bin/true", "more", str(i))
        author.ci()
        mark = server.mark()
        increment = timed(host, "up")
        ranged = [l for l in server.requests()[mark:] if "range=" in l]
    finally:
        server.stop()
    row("catch-up of %d transactions" % count, "%.0f" % (catch_up * 1000), "ms")
    row("  per transaction", "%.1f" % (catch_up / count * 1000), "ms")
    row("catch-up of %d more (journal tail by Range)" % more, "%.0f" % (increment * 1000), "ms")
    row("up-to-date up", "%.0f" % (noop * 1000), "ms")
    row("  requests made by the up-to-date up", len(noop_requests))
    row("  ratio up-to-date / catch-up of %d" % count, "%.3f" % (noop / catch_up))
    row("  journal request for the %d more" % more, re.sub(r".*\"GET (\S+).*range=", r"\1 ", ranged[0])
        if ranged else "none")
    row("journal size on the server", os.path.getsize(author.path("journal")), "bytes")


def build_journal(repo, count, keys):
    """A signed branch of `count` snap entries (each re-stating the root directory), written directly."""
    os.makedirs(os.path.join(repo, "branches", "web"))
    os.makedirs(os.path.join(repo, "objects"))
    with open(os.path.join(repo, "isconf-repo"), "wb") as f:
        f.write(isconf.canonical({"format": 1}) + b"\n")
    lines, prev = [], isconf.ZERO_ID
    for seq in range(1, count + 1):
        fields = {"seq": seq, "prev": prev, "time": "2026-01-01T00:00:00Z", "author": "a@b", "message": "m",
                  "kind": "snap", "files": [{"path": "/srv", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0,
                                             "user": "root", "group": "root"}]}
        line = isconf.canonical(fields)
        prev = isconf.sha256_hex(line)
        lines.append(line + b"\n")
    data = b"".join(lines)
    with open(os.path.join(repo, "branches/web/journal"), "wb") as f:
        f.write(data)
    head = isconf.Head.build("web", count, prev, len(data), time.time())
    path = os.path.join(repo, "branches/web/head")
    with open(path, "wb") as f:
        f.write(head.data)
    sign(keys, path)


def bench_journal_length(tmp, sizes):
    print("An up-to-date up against the length of the journal already applied:")
    keys = Keys(os.path.join(tmp, "length-keys"))
    times = {}
    for count in sizes:
        repo = os.path.join(tmp, "repo-%d" % count)
        build_journal(repo, count, keys)
        server = Server(repo, os.path.join(tmp, "access-%d.log" % count))
        try:
            host = Host(os.path.join(tmp, "host-%d" % count))
            host.init(server.url, keys)
            catch_up = timed(host, "up")
            times[count] = min(timed(host, "up") for _ in range(3))
        finally:
            server.stop()
        row("catch-up of %d snap transactions" % count, "%.0f" % (catch_up * 1000), "ms")
        row("up-to-date up, %d applied (best of 3)" % count, "%.0f" % (times[count] * 1000), "ms")
    small, large = min(sizes), max(sizes)
    row("ratio up-to-date %d / %d" % (large, small), "%.2f" % (times[large] / times[small]))


def main():
    if not shutil.which("ssh-keygen"):
        sys.exit("bench: needs ssh-keygen")
    tmp = tempfile.mkdtemp(prefix="isconf-bench-")
    try:
        print("isconf.py %s bench, %s" % (isconf.__version__, time.strftime("%Y-%m-%d %H:%M:%S")))
        bench_head_verification(tmp)
        bench_chain(10000)
        bench_up(tmp, 200, 10)
        bench_journal_length(tmp, (100, 5000))
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
