"""Seeded fuzzing of every parser that reads bytes from a mirror.

The journal tail, the head and its signature are unsigned until checked, so no byte of
them may crash the agent: in process, each parser either returns or raises Refused;
end to end, a mirror serving mutated files gets exit 0 (applied correctly), 3
(unreachable) or 4 (refused), and nothing that did not verify is applied.

ISCONF_FUZZ_INPUTS (default 100000) and ISCONF_FUZZ_RUNS (default 200) set the sizes,
ISCONF_SEED the seed (see conftest.py); a failure prints the seed and the input to replay it.
"""

import json
import os
import random
import shutil
import traceback

from conftest import PYTHONS, Host
from hostile import HEAD, JOURNAL, SIG, HostileMirror, Template, sign

INPUTS = int(os.environ.get("ISCONF_FUZZ_INPUTS", "100000"))
RUNS = int(os.environ.get("ISCONF_FUZZ_RUNS", "200"))
NOW = 1795588200   # 2026-11-25T06:30:00Z: a fixed clock, so a run replays exactly


# --- mutations ------------------------------------------------------------------------

TOKENS = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\\u0000", b"\\ud800", b"\xff", b"\xc3", b"\x00",
          b"\n", b"\r\n", b"null", b"true", b"[]", b"{}", b"-1", b"1e999", b"NaN", b"Infinity", b"0.5",
          b"9" * 30, b"9" * 5000, b"[" * 3000, b"\xe2\x80\xae", b"-----END SSH SIGNATURE-----", b"=", b"+/"]
INTERESTING_INTS = [0, 1, -1, 2, 255, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63,
                    10 ** 30, -10 ** 30, 4294967294, 0o7777, 0o10000]
INTERESTING_STRINGS = ["", "x", "/", "/etc/motd", "../..", "/../x", "\x00", "\u202e", "é", "a" * 300,
                       "2026-11-25T06:30:00Z", "2026-1-5T1:2:3Z", "exec", "snap", "reboot", "file", "dir",
                       "symlink", "hardlink", "0" * 64, "f" * 64, "web", "ssh-ed25519", "9999-12-31T23:59:59Z"]


def random_json(rng, depth=0):
    """Any JSON value: wrong types, edge numbers, floats, odd strings, containers."""
    roll = rng.randrange(10 if depth < 3 else 7)
    if roll == 0:
        return None
    if roll == 1:
        return rng.choice([True, False])
    if roll in (2, 3):
        return rng.choice(INTERESTING_INTS) if rng.random() < 0.7 else rng.randrange(-10 ** 6, 10 ** 20)
    if roll == 4:
        return rng.choice([0.0, -0.0, 1.5, 1.0, 1e308, -1e-300, 3.0])
    if roll in (5, 6):
        return rng.choice(INTERESTING_STRINGS)
    if roll == 7:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if roll == 8:
        return dict((rng.choice(["seq", "kind", "path", "type", "x", "argv", "files", "extents", "id"]),
                     random_json(rng, depth + 1)) for _ in range(rng.randrange(4)))
    return [[[[]]]] if depth else {"kind": []}


def pick_container(rng, obj):
    """A random dict or list inside obj (obj itself included), with which key or index to hit."""
    containers = []

    def walk(value):
        if isinstance(value, dict):
            containers.append(value)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            containers.append(value)
            for v in value:
                walk(v)
    walk(obj)
    return rng.choice(containers)


def mutate_json(rng, obj):
    """A random change of shape or value somewhere in a parsed entry or head."""
    obj = json.loads(json.dumps(obj))
    for _ in range(rng.randrange(1, 3)):
        target = pick_container(rng, obj)
        roll = rng.randrange(6)
        if isinstance(target, dict):
            keys = sorted(target)
            if roll == 0 and keys:
                del target[rng.choice(keys)]
            elif roll == 1:
                target[rng.choice(["extra", "expires", "extents", "kind", "seq"])] = random_json(rng)
            elif keys:
                key = rng.choice(keys)
                value = target[key]
                if roll == 2 and isinstance(value, int) and not isinstance(value, bool):
                    target[key] = value + rng.choice([-1, 1, 2 ** 63, -2 ** 64]) if rng.random() < 0.5 \
                        else float(value)
                elif roll == 3:
                    target[key] = [value] if rng.random() < 0.5 else {"v": value}
                else:
                    target[key] = random_json(rng)
        elif target:
            i = rng.randrange(len(target))
            if roll == 0:
                del target[i]
            elif roll == 1:
                target.append(random_json(rng))
            else:
                target[i] = random_json(rng)
        else:
            target.append(random_json(rng))
    if rng.random() < 0.05:
        return random_json(rng)   # not an object at all
    return obj


def encode(rng, obj):
    """Canonical-looking bytes for obj, so most mutants get past the JSON layer into the checks."""
    if rng.random() < 0.9:
        try:
            return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
                "utf-8", "surrogatepass")
        except (TypeError, ValueError):
            pass
    return json.dumps(obj, sort_keys=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def mutate_bytes(rng, data):
    """Byte flips, insertions, deletions, truncation, duplication and hostile tokens."""
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        roll = rng.randrange(8)
        pos = rng.randrange(len(data) + 1)
        if roll == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif roll == 1 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif roll == 2:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif roll == 3:
            del data[pos:pos + rng.randrange(1, 40)]
        elif roll == 4:
            del data[pos:]
        elif roll == 5:
            end = min(len(data), pos + rng.randrange(1, 60))
            data[pos:pos] = data[pos:end]
        else:
            data[pos:pos] = rng.choice(TOKENS)
    return bytes(data)


def deep(kind_value_depth):
    return b'{"kind":' + b"[" * kind_value_depth + b"]" * kind_value_depth + b"}"


# --- in process: every parser returns or refuses ---------------------------------------

CORPUS_TIME, CORPUS_MTIME = "2026-11-25T06:30:00Z", 1700000000000000000


def without_the_clock(isconf, lines):
    """Journal lines with the session's clock taken out (each entry's time, each file's mtime) and
    chained again: the same bytes in every session, so that a seed replays the same inputs."""
    out = []
    for line in lines:
        fields = json.loads(line)
        fields["time"] = CORPUS_TIME
        for record in fields.get("files", []):
            if "mtime_ns" in record:
                record["mtime_ns"] = CORPUS_MTIME
        fields["prev"] = isconf.sha256_hex(out[-1]) if out else isconf.ZERO_ID
        out.append(isconf.canonical(fields))
    return out


class Corpus(object):
    """Valid inputs: the real template's journal and heads (without the session's clock) and
    signatures (the session's key's), plus entries of every kind and file type that the template
    does not have."""

    def __init__(self, isconf, template, keys):
        self.lines = without_the_clock(isconf, template.lines)
        prev = self.lines[-1]
        for fields in (
                {"kind": "reboot"},
                {"kind": "exec", "argv": ["/bin/sh", "-c", "echo hi"], "cwd": "/tmp"},
                {"kind": "snap", "files": [
                    {"path": "/srv", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "user": "root",
                     "group": "root"},
                    {"path": "/srv/sparse", "type": "file", "mode": 0o600, "uid": 33, "gid": 33, "user": "www",
                     "group": "www", "mtime_ns": 1, "size": 1 << 20, "object": "a" * 64,
                     "extents": [[0, 4096], [65536, 4096]]},
                    {"path": "/srv/again", "type": "hardlink", "target": "/srv/sparse"},
                    {"path": "/srv/link", "type": "symlink", "target": "sparse", "mtime_ns": 2, "uid": 0,
                     "gid": 0, "user": "root", "group": "root"}]}):
            entry = json.loads(prev)
            fields.update(seq=entry["seq"] + 1, prev=isconf.sha256_hex(prev), time=CORPUS_TIME,
                          author="alice@example", message="fuzz corpus")
            prev = isconf.canonical(fields)
            self.lines.append(prev)
        for line in self.lines:   # the corpus itself must be valid
            isconf.Entry.parse(line, "corpus entry")
        self.journal = b"".join(line + b"\n" for line in self.lines)
        self.heads = []
        for seq in sorted(template.versions):
            head = json.loads(template.versions[seq][HEAD])
            head.update(time=CORPUS_TIME, id=isconf.sha256_hex(self.lines[seq - 1]),
                        length=sum(len(line) + 1 for line in self.lines[:seq]))
            self.heads.append(isconf.canonical(head) + b"\n")
            isconf.Head.parse(self.heads[-1], "corpus head")
        isconf.verify_chain(self.journal, 0, isconf.ZERO_ID, "corpus journal")
        self.signed = [(template.versions[seq][HEAD], template.versions[seq][SIG]) for seq in template.versions]
        self.signers = isconf.parse_allowed_signers(open(keys.signers).read())
        expiring = json.loads(self.heads[-1])
        expiring["expires"] = "2027-01-01T00:00:00Z"
        self.heads.append(isconf.canonical(expiring) + b"\n")


def fuzz_targets(isconf, corpus):
    """name -> (weight, make(rng) -> input, call(input)); weights are shares of INPUTS."""

    def entry_input(rng):
        line = rng.choice(corpus.lines)
        roll = rng.random()
        if roll < 0.55:
            return encode(rng, mutate_json(rng, json.loads(line)))
        if roll < 0.98:
            return mutate_bytes(rng, line)
        return deep(rng.choice([100, 1000, 100000]))

    def journal_input(rng):
        lines = list(corpus.lines)
        i = rng.randrange(len(lines))
        lines[i] = entry_input(rng) if rng.random() < 0.7 else rng.choice(corpus.lines)
        data = b"".join(line + b"\n" for line in lines)
        return mutate_bytes(rng, data) if rng.random() < 0.3 else data

    def head_input(rng):
        head = rng.choice(corpus.heads)
        roll = rng.random()
        if roll < 0.5:
            return encode(rng, mutate_json(rng, json.loads(head))) + (b"\n" if rng.random() < 0.95 else b"")
        return mutate_bytes(rng, head)

    def signature_input(rng):
        head, sig = rng.choice(corpus.signed)
        if rng.random() < 0.1:
            return mutate_bytes(rng, head), sig
        return head, mutate_bytes(rng, sig)

    def header_input(rng):
        pieces = ["bytes ", "0", "1", "-", "/", "*", "9" * 19, "\u00b2", "\u0661", " ", "\r\n", "x", "99", "+1"]
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(8))), rng.choice([0, 1, 99, 100])

    def time_input(rng):
        good = "2026-11-25T06:30:00Z"
        return mutate_bytes(rng, good.encode()).decode("latin-1") if rng.random() < 0.8 else random_json(rng)

    def call_content_range(arg):
        header, start = arg
        assert isconf.parse_content_range(header, start, "fuzz") == start

    def call_content_length(arg):
        got = isconf.parse_content_length(arg[0])
        assert got is None or (type(got) is int and got >= 0)

    return {
        "Entry.parse": (30, entry_input, lambda data: isconf.Entry.parse(data, "fuzz entry").interpret()),
        "verify_chain": (10, journal_input, lambda data: isconf.verify_chain(data, 0, isconf.ZERO_ID, "fuzz")),
        "Head.parse": (20, head_input, lambda data: isconf.Head.parse(data, "fuzz head")),
        "parse_canonical": (10, lambda rng: mutate_bytes(rng, rng.choice(corpus.lines + corpus.heads)),
                            lambda data: isconf.parse_canonical(data, "fuzz")),
        "_dearmour": (10, lambda rng: mutate_bytes(rng, rng.choice(corpus.signed)[1]), isconf._dearmour),
        "verify_signature": (3, signature_input,
                             lambda arg: isconf.verify_signature(arg[0], arg[1], corpus.signers, now=NOW)),
        "parse_content_range": (7, header_input, call_content_range),
        "parse_content_length": (5, header_input, call_content_length),
        "parse_time": (5, time_input, lambda text: isconf.parse_time(text, "fuzz time")),
    }


def test_no_mutated_network_input_crashes_a_parser(isconf, template, keys, seed):
    corpus = Corpus(isconf, template, keys)
    targets = fuzz_targets(isconf, corpus)
    total_weight = sum(weight for weight, _, _ in targets.values())
    rng = random.Random(seed)
    counts, crashes, refused = {}, [], dict.fromkeys(targets, 0)
    for name in sorted(targets):
        weight, make, call = targets[name]
        counts[name] = max(1, INPUTS * weight // total_weight)
        for _ in range(counts[name]):
            data = make(rng)
            try:
                call(data)
            except isconf.Refused:
                refused[name] += 1
            except Exception:   # anything else is a crash: keep it to show
                crashes.append("%s(%s):\n%s" % (name, repr(data)[:300], traceback.format_exc(limit=4)))
    print("fuzzed %d inputs (seed %d): %s; refused %s" % (sum(counts.values()), seed, counts, refused))
    # Each parser still refuses mutants (parse_content_length answers None for a header it cannot use: it never
    # refuses); among a hundred inputs or more, a parser that refused none would have stopped checking.
    assert all(refused[name] for name in targets if name != "parse_content_length" and counts[name] >= 100), (
        "a parser refused none of its inputs (seed %d): %s" % (seed, refused))
    assert not crashes, "%d crashes (seed %d); first:\n%s" % (len(crashes), seed, "\n".join(crashes[:3]))


# --- end to end: a mirror serving mutated head, head.sig and journal --------------------

HTTP_BEHAVIOURS = ["truncate", "reset", "short-length", "html", ("status", 500), ("status", 404),
                   ("status", 304), "ignore-range", "range-to-end", ("oversize", 100), "giant-etag",
                   ("content-range", "bytes 0-1/2"), ("content-range", "bytes \u00b2-9/10"),
                   ("content-range", "bytes 5-4/3"), ("redirect", None), ("redirect", "http://[::1/x")]


def genuine_ids(template):
    import hashlib
    return [hashlib.sha256(line).hexdigest() for line in template.lines]


def applied_ids(host):
    """Ids of the transactions the host recorded as done, in order."""
    try:
        with open(host.state("history"), "rb") as f:
            events = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
    return [e["id"] for e in events if e["event"] == "done"]


def copy_host(base, root):
    # The busybox binary is linked, not copied: it is never written, and it is most of the bytes.
    def copy(src, dst):
        (os.link if "/bin/" in src else shutil.copy2)(src, dst)
    shutil.copytree(base, root, symlinks=True, copy_function=copy)
    return Host(root)


class Fleet(object):
    """Base hosts, made once: signed or insecure, fresh or at seq 2, the hostile mirror
    alone or followed by a good one.  Each run works on a copy of one."""

    def __init__(self, top, template, keys, bad, good, busybox_root):
        self.bases = {}
        at_two = HostileMirror(template.repo)
        try:
            at_two.replace.update(template.versions[2])
            for signed in (True, False):
                for start in (0, 2):
                    for urls in ((bad.url,), (bad.url, good.url)):
                        host = Host(os.path.join(top, "base-%d-%d-%d" % (signed, start, len(urls))))
                        busybox_root(host.root)
                        trust = ["--signers", keys.signers] if signed else ["--insecure"]
                        if start:
                            host("init", at_two.url, "--branch", "web", *trust, expect="ok")
                            host("up", expect="ok")
                        host("init", "--force", *(list(urls) + ["--branch", "web"] + trust + [
                            "--timeout", "1", "--deadline", "3", "--retries", "1"]), expect="ok")
                        self.bases[signed, start, len(urls)] = host.root
        finally:
            at_two.stop()


def mutate_mirror(rng, mirror, template, keys, tmp, signed):
    """Serve seq 4 with one to three of head, head.sig and journal mutated, or an HTTP misbehaviour."""
    genuine = template.versions[4]
    mirror.replace.clear()
    mirror.behave.clear()
    mirror.replace.update(genuine)
    what = []
    for path in rng.sample([HEAD, SIG, JOURNAL], rng.randrange(1, 4)):
        roll = rng.random()
        if roll < 0.15:
            mirror.behave[path] = rng.choice(HTTP_BEHAVIOURS)
            what.append("%s %r" % (path, mirror.behave[path]))
            continue
        if path == JOURNAL and roll < 0.55:
            lines = list(template.lines)
            i = rng.randrange(len(lines))
            lines[i] = encode(rng, mutate_json(rng, json.loads(lines[i])))
            mirror.replace[path] = b"".join(line + b"\n" for line in lines)
        elif path == HEAD and roll < 0.55:
            head = encode(rng, mutate_json(rng, json.loads(genuine[HEAD]))) + b"\n"
            mirror.replace[path] = head
            if signed and rng.random() < 0.5:   # a compromised author's key: the checks after it must hold
                mirror.replace[SIG] = sign(head, keys.private, tmp)
        else:
            mirror.replace[path] = mutate_bytes(rng, genuine[path])
        what.append("%s mutated" % path)
    return ", ".join(what)


def test_hostile_mirror_serving_mutated_files_never_gets_anything_unverified_applied(
        template, keys, tmp_path, busybox_root, seed):
    rng = random.Random(seed)
    bad, good = HostileMirror(template.repo), HostileMirror(template.repo)
    ids = genuine_ids(template)
    outcomes = {}
    try:
        fleet = Fleet(str(tmp_path), template, keys, bad, good, busybox_root)
        for run in range(RUNS):
            signed, start, with_good = run % 4 < 2, rng.choice((0, 2)), run % 2 == 0
            host = copy_host(fleet.bases[signed, start, 2 if with_good else 1], str(tmp_path / ("run%d" % run)))
            what = mutate_mirror(rng, bad, template, keys, tmp_path, signed)
            del bad.requests[:], good.requests[:]
            python = PYTHONS[(run // 4) % len(PYTHONS)]
            proc = host("up", python=python, timeout=60)
            about = "run %d (seed %d, %s, %s, start %d, %s): %s\nstdout:\n%s\nstderr:\n%s" % (
                run, seed, os.path.basename(os.path.dirname(os.path.dirname(python))) or python,
                "signed" if signed else "insecure", start, "good second" if with_good else "alone", what,
                proc.out, proc.err)
            assert proc.returncode in (0, 3, 4), about
            assert "Traceback" not in proc.err, about
            done = applied_ids(host)
            assert done == ids[:len(done)], "applied what the genuine journal does not say: " + about
            if proc.returncode == 0 or with_good:
                assert proc.returncode == 0 and done == ids, about
                assert open(host.path("/etc/issue"), "rb").read() == Template.ISSUE, about
            else:
                assert len(done) == start and not os.path.exists(host.path("/etc/issue")), about
            if good.requests:   # the hostile mirror failed, and says so
                assert "isconf: warning: mirror %s: " % bad.url in proc.err, about
            outcomes[proc.returncode] = outcomes.get(proc.returncode, 0) + 1
            shutil.rmtree(host.root)
    finally:
        bad.stop()
        good.stop()
    print("%d end-to-end runs (seed %d): exit codes %s" % (RUNS, seed, outcomes))
