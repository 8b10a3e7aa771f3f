"""make demo: author a small journal, serve it on 127.0.0.1, replay it on a throwaway root.

Everything happens under one temporary directory, removed at the end; nothing on this
machine outside it is touched.  Run as root (exec transactions are chrooted).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISCONF = os.path.join(TOP, "isconf.py")
TOOLS = ["sh", "cat", "mkdir", "echo", "date", "id"]


def step(title):
    sys.stdout.write("\n\033[1m== %s\033[0m\n" % title)
    sys.stdout.flush()


def isconf(*args, **kw):
    cmd = [sys.executable, ISCONF] + list(args)
    sys.stdout.write("$ isconf %s\n" % " ".join(args).replace(kw.pop("tmp", "\0"), "$DEMO"))
    sys.stdout.flush()
    code = subprocess.call(cmd, env=dict(os.environ, ISCONF_AUTHOR="demo@example", **kw.pop("env", {})))
    if code not in kw.get("ok", (0,)):
        sys.exit("demo: isconf %s exited %d" % (args[0], code))
    return code


def make_chroot(root):
    """Give a throwaway root a shell: Debian's static busybox, else /bin/sh and friends with their libraries."""
    bindir = os.path.join(root, "bin")
    os.makedirs(bindir, exist_ok=True)
    busybox = shutil.which("busybox")
    if busybox and "not a dynamic" in subprocess.run(["ldd", busybox], stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT).stdout.decode():
        shutil.copy2(busybox, os.path.join(bindir, "busybox"))
        for tool in TOOLS:
            os.symlink("busybox", os.path.join(bindir, tool))
        return
    for tool in TOOLS:
        path = shutil.which(tool)
        shutil.copy2(path, os.path.join(bindir, tool))
        libs = subprocess.run(["ldd", path], stdout=subprocess.PIPE).stdout.decode()
        for lib in re.findall(r"(/\S+) \(0x", libs):
            target = os.path.join(root, lib.lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                shutil.copy2(os.path.realpath(lib), target)


def main():
    if os.geteuid() != 0:
        sys.exit("demo: run as root (exec transactions are chrooted into the throwaway root)")
    tmp = tempfile.mkdtemp(prefix="isconf-demo-")
    repo, src, root = (os.path.join(tmp, d) for d in ("repo", "src", "root"))
    server = None
    try:
        step("An author builds a repository and a key")
        isconf("init-repo", repo, tmp=tmp)
        key = os.path.join(tmp, "id_ed25519")
        subprocess.check_call(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "demo@example", "-f", key])
        signers = os.path.join(tmp, "allowed_signers")
        with open(key + ".pub") as f, open(signers, "w") as out:
            out.write("demo@example namespaces=\"isconf\" " + " ".join(f.read().split()[:2]) + "\n")
        env = {"ISCONF_REPO": repo, "ISCONF_BRANCH": "web"}

        step("Change 1: the message of the day, a web page and its directory")
        make_chroot(src)
        os.makedirs(os.path.join(src, "etc/web"))
        with open(os.path.join(src, "etc/motd"), "w") as f:
            f.write("This host is managed by isconf: change it through the journal.\n")
        with open(os.path.join(src, "etc/web/site.conf"), "w") as f:
            f.write("listen 8080\nroot /srv/www\n")
        os.link(os.path.join(src, "etc/web/site.conf"), os.path.join(src, "etc/web/site.conf.default"))
        isconf("lock", "-m", "base web host", env=env, tmp=tmp)
        isconf("--root", src, "snap", "/etc/motd", "/etc/web", "/etc/web/site.conf", "/etc/web/site.conf.default",
               env=env, tmp=tmp)
        isconf("exec", "--no-run", "--", "/bin/sh", "-c",
               'mkdir -p /srv/www && echo "<h1>hello from $ROLE</h1>" > /srv/www/index.html', env=env, tmp=tmp)
        isconf("ci", "--sign", key, "--expires", "30d", env=env, tmp=tmp)

        step("Change 2: a command that records when the host was built")
        isconf("lock", "-m", "build stamp", env=env, tmp=tmp)
        isconf("exec", "--no-run", "--", "/bin/sh", "-c", "echo built seq $ISCONF_SEQ on branch $ISCONF_BRANCH > /etc/built",
               env=env, tmp=tmp)
        isconf("ci", "--sign", key, "--expires", "30d", env=env, tmp=tmp)

        step("Serve the repository on 127.0.0.1")
        log = open(os.path.join(tmp, "access.log"), "wb")
        server = subprocess.Popen([sys.executable, ISCONF, "serve", repo, "--port", "0"], stderr=log)
        url = None
        for _ in range(200):
            with open(os.path.join(tmp, "access.log")) as f:
                m = re.search(r"on (http://\S+)", f.read())
            if m:
                url = m.group(1)
                break
            time.sleep(0.05)
        if not url:
            sys.exit("demo: the server did not start")
        print(url)

        step("A new host follows branch web")
        make_chroot(root)
        isconf("--root", root, "init", url, "--branch", "web", "--signers", signers, "--var", "ROLE=demo-web", tmp=tmp)
        isconf("--root", root, "up", tmp=tmp)
        print("$ cat $DEMO/root/srv/www/index.html $DEMO/root/etc/built")
        sys.stdout.write(open(os.path.join(root, "srv/www/index.html")).read() + open(os.path.join(root, "etc/built")).read())
        isconf("--root", root, "status", tmp=tmp)
        isconf("--root", root, "log", tmp=tmp)

        step("Nothing new: one small request for the head, nothing applied")
        isconf("--root", root, "up", tmp=tmp)
        log.flush()
        with open(os.path.join(tmp, "access.log")) as f:
            print("server log:\n" + "".join("  " + l for l in f.readlines()[1:]))
    finally:
        if server:
            server.terminate()
            server.wait()
        shutil.rmtree(tmp)
    print("demo: done")


if __name__ == "__main__":
    main()
