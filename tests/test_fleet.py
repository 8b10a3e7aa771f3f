"""A fleet: 200 hosts, each with its own root, init-ed to trust the signing key, update at once
from one server (real nginx, and `isconf serve`) and all end with the same tree.

The runs go 20 at a time (the suite shares two cores), but every one of the 200 runs.  What
the server paid per host (requests, bytes) is printed (pytest -s): README's Scaling out."""

import concurrent.futures
import hashlib
import os
import stat

from conftest import Host, Server

FLEET = 200
AT_ONCE = 20
STATE = os.path.join("var", "lib", "isconf")


def publish(author, tmp_path):
    """Two check-ins of snaps: files of several sizes and modes, a directory, a link."""
    src = tmp_path / "src"
    (src / "etc" / "app").mkdir(parents=True)
    paths = []
    for i in range(24):
        path = src / "etc" / "app" / ("conf%02d" % i)
        path.write_bytes(("setting %d\n" % i).encode() * (4 ** (i % 6)))
        os.chmod(str(path), 0o600 if i % 3 else 0o644)
        paths.append("/etc/app/conf%02d" % i)
    os.symlink("app/conf00", str(src / "etc" / "current"))
    author.commit(["--root", str(src), "snap", "/etc/app"] + paths[:12])
    author.commit(["--root", str(src), "snap", "/etc/current"] + paths[12:])
    return src


def init_fleet(isconf, tmp_path, url, keys):
    """FLEET roots, each init-ed by isconf's own init (in this process: 200 interpreters
    starting only to write a config would cost more than the fleet's updates)."""
    hosts, parser = [], isconf.build_parser()
    for i in range(FLEET):
        root = str(tmp_path / "fleet" / ("host%03d" % i))
        os.makedirs(root)
        args = parser.parse_args(["--root", root, "init", url, "--branch", "web",
                                                 "--signers", keys.signers])
        args.argv = None
        assert args.func(args) in (None, 0)
        hosts.append(Host(root))
    return hosts


def up_all(hosts):
    """`isconf up` on every host, AT_ONCE processes at a time; each must succeed."""
    with concurrent.futures.ThreadPoolExecutor(AT_ONCE) as pool:
        return list(pool.map(lambda host: host("up", expect="ok"), hosts))


def tree_digest(root):
    """Every path under root with its type, mode, owner, mtime and content or target; of the
    state, the verified head and journal only (the history holds each host's own times), and
    of isconf's own files not their mtime."""
    digest = hashlib.sha256()
    for top, dirs, files in os.walk(root):
        dirs.sort()
        rel_top = os.path.relpath(top, root)
        if rel_top == STATE:
            files = [f for f in files if f in ("head", "head.sig", "journal")]
            dirs[:] = []
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            digest.update(repr((os.path.relpath(path, root), st.st_mode, st.st_uid, st.st_gid)).encode())
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                if not rel_top.startswith((STATE, os.path.join("etc", "isconf"))):   # isconf's own: written now
                    digest.update(repr(st.st_mtime_ns).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def same_tree(hosts, src):
    """One digest for the whole fleet, and it is the tree that was published."""
    assert len(set(tree_digest(host.root) for host in hosts)) == 1
    for name in sorted(os.listdir(str(src / "etc" / "app"))):
        with open(hosts[0].path("/etc/app/" + name), "rb") as f:
            assert f.read() == (src / "etc" / "app" / name).read_bytes()
    assert os.readlink(hosts[0].path("/etc/current")) == "app/conf00"


def nginx_lines(log, since):
    """(path, bytes sent, bytes received) of each request after the first `since`."""
    out = []
    for line in log.read_text().splitlines()[since:]:
        fields = line.split('"')
        out.append((fields[1].split()[1], int(fields[2].split()[1]), int(line.split()[-1])))
    return out


def report(what, lines, hosts):
    print("%s: %.1f requests and %.0f bytes sent (%.0f received) per host" % (
        what, len(lines) / float(hosts), sum(l[1] for l in lines) / float(hosts),
        sum(l[2] for l in lines) / float(hosts)))


def test_a_fleet_of_200_updates_at_once_from_nginx(isconf, author, keys, nginx, tmp_path):
    url, log = nginx
    src = publish(author, tmp_path)
    hosts = init_fleet(isconf, tmp_path, url, keys)
    before = len(log.read_text().splitlines())
    up_all(hosts)
    catch_up = nginx_lines(log, before)
    assert len(catch_up) >= FLEET * 3   # head, head.sig, journal and objects, from each host
    same_tree(hosts, src)
    report("catch-up", catch_up, FLEET)
    before = len(log.read_text().splitlines())
    up_all(hosts[:AT_ONCE])
    no_op = nginx_lines(log, before)
    assert [path for path, _, _ in no_op] == ["/branches/web/head"] * AT_ONCE
    report("no-op", no_op, AT_ONCE)


def test_a_fleet_of_200_updates_at_once_from_isconf_serve(isconf, author, keys, tmp_path):
    src = publish(author, tmp_path)
    server = Server(author.repo, str(tmp_path / "serve.log"))
    try:
        hosts = init_fleet(isconf, tmp_path, server.url, keys)
        before = server.mark()
        up_all(hosts)
        print("catch-up from isconf serve: %.1f requests per host" % ((server.mark() - before) / float(FLEET)))
    finally:
        server.stop()
    same_tree(hosts, src)
