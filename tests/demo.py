"""make demo: author a small journal, serve it on 127.0.0.1, replay it on a throwaway root.

Everything happens under one temporary directory, removed at the end; nothing on this
machine outside it is touched.  Run as root (exec transactions are chrooted).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISCONF = os.path.join(TOP, "isconf.py")
TOOLS = ["sh", "cat", "mkdir", "echo", "date", "id"]


def step(title):
    """A title; bold only on a terminal, so that a log or a pipe gets no escape codes."""
    if sys.stdout.isatty():
        sys.stdout.write("\n\033[1m== %s\033[0m\n" % title)
    else:
        sys.stdout.write("\n== %s\n" % title)
    sys.stdout.flush()


class Shell(object):
    """Runs each command the way it is printed: as one line of shell, so the transcript can be pasted.

    The temporary directory is shown as $DEMO (exported once, at the start), the environment as one
    export line, and isconf as a shell function calling this checkout's isconf.py."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.env = dict(os.environ)
        self.preamble = ""
        self.show("export DEMO=%s" % shlex.quote(tmp))
        self.env["DEMO"] = tmp
        self.define("isconf() { %s %s \"$@\"; }" % (shlex.quote(sys.executable), shlex.quote(ISCONF)))

    def quote(self, arg):
        """arg as one shell word; where it holds the temporary directory, double-quoted around $DEMO."""
        if self.tmp not in arg:
            return shlex.quote(arg)
        words = []
        for i, part in enumerate(arg.split(self.tmp)):
            if i:
                words.append("${DEMO}" if re.match(r"[A-Za-z0-9_]", part) else "$DEMO")
            words.append(re.sub(r'(["\\$`])', r"\\\1", part))
        return '"%s"' % "".join(words)

    def line(self, argv):
        return " ".join(self.quote(arg) for arg in argv)

    def show(self, text):
        sys.stdout.write("$ %s\n" % text)
        sys.stdout.flush()

    def export(self, name, value, *more):
        """export NAME=value ... once, for every command after it."""
        pairs = (name, value) + more
        text = "export " + " ".join("%s=%s" % (pairs[i], self.quote(pairs[i + 1])) for i in range(0, len(pairs), 2))
        self.show(text)
        for i in range(0, len(pairs), 2):
            self.env[pairs[i]] = pairs[i + 1]

    def define(self, text):
        self.show(text)
        self.preamble += text + "\n"

    def sh(self, text, ok=(0,)):
        """Print a line of shell and run it with /bin/sh; exit if its status is not in ok."""
        self.show(text)
        code = subprocess.call(["/bin/sh", "-c", self.preamble + text], env=self.env)
        if code not in ok:
            sys.exit("demo: %s exited %d" % (text, code))
        return code

    def run(self, *argv, **kw):
        return self.sh(self.line(argv), **kw)

    def isconf(self, *args, **kw):
        return self.run("isconf", *args, **kw)


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
    key, signers = os.path.join(tmp, "id_ed25519"), os.path.join(tmp, "allowed_signers")
    server = None
    try:
        step("The demo's directory, environment and isconf")
        shell = Shell(tmp)
        shell.export("ISCONF_AUTHOR", "demo@example", "ISCONF_REPO", repo, "ISCONF_BRANCH", "web",
                     "ISCONF_SIGNERS", signers)

        step("An author builds a repository and a key")
        shell.isconf("init-repo", repo)
        shell.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "demo@example", "-f", key)
        shell.sh('echo "demo@example namespaces=\\"isconf\\" $(cut -d" " -f1,2 %s)" > %s'
                 % (shell.quote(key + ".pub"), shell.quote(signers)))

        step("Change 1: the message of the day, a web page and its directory")
        sys.stdout.write("# $DEMO/src: a reference tree with a shell for exec (static busybox, else %s and their "
                         "libraries)\n" % ", ".join(TOOLS))
        make_chroot(src)
        shell.run("mkdir", "-p", os.path.join(src, "etc/web"))
        shell.sh("echo 'This host is managed by isconf: change it through the journal.' > %s"
                 % shell.quote(os.path.join(src, "etc/motd")))
        shell.sh("printf 'listen 8080\\nroot /srv/www\\n' > %s" % shell.quote(os.path.join(src, "etc/web/site.conf")))
        shell.run("ln", os.path.join(src, "etc/web/site.conf"), os.path.join(src, "etc/web/site.conf.default"))
        shell.isconf("lock", "--new", "-m", "base web host")
        shell.isconf("--root", src, "snap", "/etc/motd", "/etc/web", "/etc/web/site.conf", "/etc/web/site.conf.default")
        shell.isconf("exec", "--no-run", "--", "/bin/sh", "-c",
                     'mkdir -p /srv/www && echo "<h1>hello from $ROLE</h1>" > /srv/www/index.html')
        shell.isconf("ci", "--sign", key, "--expires", "30d")

        step("Change 2: a command that records when the host was built")
        shell.isconf("lock", "-m", "build stamp")
        shell.isconf("exec", "--no-run", "--", "/bin/sh", "-c", "echo built seq $ISCONF_SEQ on branch $ISCONF_BRANCH > /etc/built")
        shell.isconf("ci", "--sign", key, "--expires", "30d")

        step("Serve the repository on 127.0.0.1")
        access = os.path.join(tmp, "access.log")
        shell.show("isconf serve %s --port 0 2>%s &" % (shell.quote(repo), shell.quote(access)))
        log = open(access, "wb")
        server = subprocess.Popen([sys.executable, ISCONF, "serve", repo, "--port", "0"], stderr=log, env=shell.env)
        url = None
        for _ in range(200):
            with open(access) as f:
                m = re.search(r"on (http://\S+)", f.read())
            if m:
                url = m.group(1)
                break
            time.sleep(0.05)
        if not url:
            sys.exit("demo: the server did not start")
        print("# serving on " + url)

        step("A new host follows branch web")
        sys.stdout.write("# $DEMO/root: a new host's root, with a shell for exec\n")
        make_chroot(root)
        shell.isconf("--root", root, "init", url, "--branch", "web", "--signers", signers, "--var", "ROLE=demo-web")
        shell.isconf("--root", root, "up")
        shell.run("cat", os.path.join(root, "srv/www/index.html"), os.path.join(root, "etc/built"))
        shell.isconf("--root", root, "status")
        shell.isconf("--root", root, "log")

        step("Nothing new: one small request for the head, nothing applied")
        shell.isconf("--root", root, "up")
        log.flush()
        with open(access) as f:
            print("server log:\n" + "".join("  " + l for l in f.readlines()[1:]))
    finally:
        if server:
            server.terminate()
            server.wait()
        shutil.rmtree(tmp)
    print("demo: done")


if __name__ == "__main__":
    main()
