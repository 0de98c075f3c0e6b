"""
The kernel holds: every attack below is run in the sandbox with the Python-level audit hook switched OFF
(tests/test_execution.py covers the sandbox as shipped, hook on), and checked by its effect, never by
its error message:
the token a started process would print never appears, no marker file or change appears outside, the
host receives no signal and a decoy process outside survives, nothing listens in vain on a socket,
nothing outside is listed or read, and no process outlives the call.

Each attack also runs once WITHOUT the sandbox (a plain `python -c` as the same user), where it must
succeed: so each check here can fail, and fails if the sandbox stops holding.

Hosts: this test process (root in CI); when it is root, a helper process (tests/sandbox_host.py) running
as an unprivileged user created for the purpose; and this process with the sandbox set up as where user
namespaces are off (Landlock and seccomp alone).
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from nanochat import execution, sandbox

UNPRIVILEGED_USER = "nanochat-sandbox"
WATCHED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
PRELUDE = "import os as _o\n_o.write(2, ('SANDBOX %d %s\\n' % (_o.getpid(), _o.getcwd())).encode())\ndel _o\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# Hosts: where execute_code runs

class LocalHost:
    """This test process."""

    def __init__(self):
        self.pid, self.uid = os.getpid(), os.getuid()
        self.received = []
        self.previous = {s: signal.signal(s, lambda n, f: self.received.append(n)) for s in WATCHED_SIGNALS}

    def execute(self, code, timeout=3.0, audit_hook=False, memory=256 * 1024 * 1024):
        del self.received[:]
        result = execution._execute(code, timeout=timeout, maximum_memory_bytes=memory, audit_hook=audit_hook)
        answer = {f: getattr(result, f) for f in ("success", "stdout", "stderr", "error", "timeout",
                                                   "memory_exceeded", "violation")}
        answer["signals"] = list(self.received)
        return answer

    def control(self, code, timeout=10.0):
        del self.received[:]
        with tempfile.TemporaryDirectory() as cwd:
            p = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, timeout=timeout)
        return {"returncode": p.returncode, "stdout": p.stdout.decode(errors="replace"),
                "stderr": p.stderr.decode(errors="replace"), "signals": list(self.received)}

    def capabilities(self):
        return execution.sandbox_capabilities()

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class LocalHostWithoutNamespaces(LocalHost):
    """This test process, with the sandbox set up as on a host where user namespaces are off: no
    read-only mounts, no network namespace, no tmpfs; Landlock and seccomp alone."""

    def __init__(self):
        super().__init__()
        layers = {"namespaces": False, "landlock": True, "seccomp": True}
        active, complaint = sandbox._try_layers(layers)
        assert active is not None and not active["namespaces"], complaint
        self.original_probe = sandbox.probe
        sandbox.probe = lambda: (layers, active, ())

    def close(self):
        sandbox.probe = self.original_probe
        super().close()


class UserHost:
    """tests/sandbox_host.py as an unprivileged user, with a Python that user can run."""

    def __init__(self, user, python):
        import pyseccomp
        entry = pwd.getpwnam(user)
        # the code it needs, copied where that user can read it (the checkout may be under /root)
        self.code_dir = tempfile.mkdtemp(prefix="nanochat_sandbox_host_")
        os.chmod(self.code_dir, 0o755)
        os.mkdir(os.path.join(self.code_dir, "nanochat"))
        for name in ("__init__", "common", "execution", "sandbox", "sandbox_child"):
            shutil.copy(os.path.join(REPO, "nanochat", name + ".py"), os.path.join(self.code_dir, "nanochat"))
        shutil.copy(pyseccomp.__file__, self.code_dir)
        shutil.copy(os.path.join(REPO, "tests", "sandbox_host.py"), self.code_dir)
        for root, dirs, files in os.walk(self.code_dir):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o755)
        env = {"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir, "LANG": "C.UTF-8", "PYTHONPATH": self.code_dir}
        self.proc = subprocess.Popen([python, "-B", os.path.join(self.code_dir, "sandbox_host.py")], env=env,
                                     user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], cwd="/",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError(self.proc.stderr.read())
        info = json.loads(hello)
        self.pid, self.uid = info["pid"], info["uid"]

    def _ask(self, request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the unprivileged host died: {self.proc.poll()} {self.proc.stderr.read()}"
        return json.loads(line)

    def execute(self, code, timeout=3.0, audit_hook=False, memory=256 * 1024 * 1024):
        return self._ask({"op": "execute", "code": code, "timeout": timeout, "audit_hook": audit_hook,
                          "memory": memory})

    def control(self, code, timeout=10.0):
        return self._ask({"op": "control", "code": code, "timeout": timeout})

    def capabilities(self):
        return self._ask({"op": "capabilities"})

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.code_dir, ignore_errors=True)


def _unprivileged_host():
    if os.geteuid() != 0:
        pytest.skip("not root: this process is itself the unprivileged host (the other half needs root)")
    try:
        pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("no useradd to create an unprivileged user")
        subprocess.run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin", UNPRIVILEGED_USER],
                       check=True, capture_output=True)
    home = pwd.getpwnam(UNPRIVILEGED_USER).pw_dir
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "private-notes.txt"), "w") as f:
        f.write("my secret plans")
    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chown(os.path.join(home, "private-notes.txt"), entry.pw_uid, entry.pw_gid)
    # this Python if that user can run it, else the system's (the same minor version: the child
    # only needs the standard library)
    for python in (sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"):
        try:
            usable = subprocess.run([python, "-c", "pass"], user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                                    capture_output=True, cwd="/").returncode == 0
        except OSError:  # e.g. under /root
            usable = False
        if usable:
            try:
                return UserHost(UNPRIVILEGED_USER, python)
            except (RuntimeError, OSError) as e:
                pytest.skip(f"the unprivileged host could not start: {e}")
    pytest.skip(f"no Python that user {UNPRIVILEGED_USER} can run (this one is under an unreadable directory)")


@pytest.fixture(scope="module", params=["this-process", "unprivileged-user", "this-process-without-namespaces"])
def host(request):
    h = {"this-process": LocalHost, "unprivileged-user": _unprivileged_host,
         "this-process-without-namespaces": LocalHostWithoutNamespaces}[request.param]()
    yield h
    h.close()


# -----------------------------------------------------------------------------
# What an attack may leave behind

@pytest.fixture
def outside(host):
    """A directory outside the sandbox, owned by the host's user and open to everyone: only the sandbox
    can stop a write or a read there."""
    path = tempfile.mkdtemp(prefix="nanochat_outside_")
    victim = os.path.join(path, "victim.txt")
    with open(victim, "w") as f:
        f.write("precious")
    os.utime(victim, (1_000_000, 1_000_000))
    for p in (path, victim):
        os.chown(p, host.uid, -1)
    os.chmod(path, 0o777)
    os.chmod(victim, 0o666)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def snapshot(path):
    victim = os.path.join(path, "victim.txt")
    st = os.stat(victim)
    with open(victim) as f:
        return sorted(os.listdir(path)), f.read(), st.st_mode, st.st_mtime, st.st_uid, st.st_gid


def survivors(stderr):
    """Processes still alive from the sandboxed program (its process group, session or environment)."""
    lines = [l.split() for l in stderr.splitlines() if l.startswith("SANDBOX ")]
    assert lines, f"the program did not start: {stderr[-500:]}"
    pid, workdir = int(lines[0][1]), lines[0][2]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if fields[0] != "Z" and (int(fields[2]) == pid or int(fields[3]) == pid
                                 or f"HOME={workdir}".encode() in environ):
            found.append(int(entry))
    return found


def test_the_survivor_check_finds_a_process_left_behind(tmp_path):
    left = subprocess.Popen(["sleep", "30"], env={"HOME": str(tmp_path)})
    try:
        assert survivors(f"SANDBOX 999999999 {tmp_path}\n") == [left.pid]
    finally:
        left.kill()
        left.wait()


def run_attack(host, code, timeout=3.0, **kwargs):
    """Run `code` in the sandbox with the kernel alone (no audit hook) and check what every attack must
    leave as it was: the host gets no signal, no process survives."""
    result = host.execute(PRELUDE + code, timeout=timeout, audit_hook=False, **kwargs)
    assert result["signals"] == [], f"the host received signals {result['signals']}: {result}"
    assert survivors(result["stderr"]) == [], f"processes outlived the call: {result}"
    return result


# -----------------------------------------------------------------------------
# Starting a process: each attack prints "ran-42" (from a shell) or "forked 42" (from a forked child)
# if it manages to; neither string is in the code, so no error message can contain it.

SHELL = "echo ran-$((40+2))"
COPY_EXTENSION = ("import glob, importlib.machinery, importlib.util, os, shutil, sys\n"
                  "dynload = os.path.join(sys.base_exec_prefix, 'lib', 'python*', 'lib-dynload')\n"
                  "src = glob.glob(os.path.join(dynload, '{name}.*.so'))\n"
                  "src = src or glob.glob('/usr/lib/python3*/lib-dynload/{name}.*.so')\n"
                  "shutil.copyfile(src[0], 'innocent.so')\n"
                  "loader = importlib.machinery.ExtensionFileLoader('pkg.{name}', os.path.abspath('innocent.so'))\n"
                  "spec = importlib.util.spec_from_loader('pkg.{name}', loader)\n"
                  "mod = importlib.util.module_from_spec(spec)\n")
# the same module loaded in place under another name (no copy: the installation may be mapped executable)
RENAMED_EXTENSION = COPY_EXTENSION.replace("shutil.copyfile(src[0], 'innocent.so')\n", "").replace(
    "os.path.abspath('innocent.so')", "src[0]")
FORK_CHILD = "os.write(1, ('forked %d\\n' % (40 + 2)).encode()); os._exit(0)"

def skip_if_no_extension_file(attack, control):
    if ("renamed" in attack or "another name" in attack) and "IndexError" in control["stderr"]:
        pytest.skip("this Python has no extension file of that module to copy (it is built in)")


FORK_EXEC = ("spec.loader.exec_module(mod)\nimport os\nr, w = os.pipe()\n"
             f"pid = mod.fork_exec([b'/bin/sh', b'-c', {SHELL.encode()!r}], [b'/bin/sh'], True, (w,), None, None,"
             " -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\nos.waitpid(pid, 0)")

PROCESS_ATTACKS = {
    "os.system": f"import os\nos.system({SHELL!r})",
    "subprocess": f"import subprocess\nsubprocess.run(['/bin/sh', '-c', {SHELL!r}])",
    "os.fork": f"import os\nif os.fork() == 0:\n    {FORK_CHILD}\nos.wait()",
    "os.posix_spawn": f"import os\nos.waitpid(os.posix_spawn('/bin/sh', ['sh', '-c', {SHELL!r}], {{}}), 0)",
    "os.execv": f"import os\nos.execv('/bin/sh', ['sh', '-c', {SHELL!r}])",
    "pty.fork": "import os, pty\npid, fd = pty.fork()\n"
                "if pid == 0:\n    print('forked', 40 + 2, flush=True)\n    os._exit(0)\n"
                "print(os.read(fd, 100).decode())\nos.waitpid(pid, 0)",
    "multiprocessing": "import multiprocessing\np = multiprocessing.Process(target=print, args=('forked', 40 + 2))\n"
                       "p.start()\np.join()",
    "ctypes fork": f"import ctypes, os\nif ctypes.CDLL(None).fork() == 0:\n    {FORK_CHILD}\nos.wait()",
    "ctypes system": f"import ctypes\nctypes.CDLL(None).system({SHELL.encode()!r})",
    "ctypes execv": f"import ctypes\nargv = (ctypes.c_char_p * 4)(b'sh', b'-c', {SHELL.encode()!r}, None)\n"
                    "ctypes.CDLL(None).execv(b'/bin/sh', argv)",
    "ctypes raw clone": f"import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.syscall.restype = ctypes.c_long\n"
                        f"if libc.syscall(56, 17, 0, 0, 0, 0) == 0:\n    {FORK_CHILD}\nos.wait()",  # clone(SIGCHLD)
    "renamed _posixsubprocess": COPY_EXTENSION.format(name="_posixsubprocess") + FORK_EXEC,
    "_posixsubprocess under another name": RENAMED_EXTENSION.format(name="_posixsubprocess") + FORK_EXEC,
}


@pytest.mark.parametrize("attack", list(PROCESS_ATTACKS))
def test_no_way_to_start_a_process(host, attack):
    code = PROCESS_ATTACKS[attack]
    control = host.control(code)
    skip_if_no_extension_file(attack, control)
    assert "ran-42" in control["stdout"] or "forked 42" in control["stdout"], f"the attack itself is broken: {control}"
    result = run_attack(host, code)
    assert "ran-42" not in result["stdout"] + result["stderr"], result
    assert "forked 42" not in result["stdout"] + result["stderr"], result


# -----------------------------------------------------------------------------
# Signals: to the host (our parent) and to a decoy process outside

@pytest.fixture
def decoy(host):
    """A process outside the sandbox, of the host's user, in its own process group."""
    entry = pwd.getpwuid(host.uid)
    p = subprocess.Popen(["sleep", "60"], start_new_session=True, user=entry.pw_uid, group=entry.pw_gid,
                         extra_groups=[] if os.geteuid() == 0 else None)
    yield p
    p.kill()
    p.wait()


SIGNAL_ATTACKS = {
    "os.kill": "import os, signal\nos.kill({target}, signal.SIGTERM)",
    "os.killpg": "import os, signal\nos.killpg({target}, signal.SIGTERM)",
    "pidfd_send_signal": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({target}), signal.SIGTERM)",
    "ctypes kill": "import ctypes, signal\nctypes.CDLL(None).kill({target}, signal.SIGTERM)",
    "ctypes kill group": "import ctypes, signal\nctypes.CDLL(None).kill(-{target}, signal.SIGTERM)",
    "ctypes tgkill": "import ctypes, signal\nctypes.CDLL(None).syscall(234, {target}, {target}, signal.SIGTERM)",
    "ctypes tkill": "import ctypes, signal\nctypes.CDLL(None).syscall(200, {target}, signal.SIGTERM)",
    "ctypes rt_sigqueueinfo": "import ctypes, signal, struct\ninfo = ctypes.create_string_buffer(128)\n"
                              "struct.pack_into('iii', info, 0, signal.SIGTERM, 0, -1)\n"  # si_code SI_QUEUE
                              "ctypes.CDLL(None).syscall(129, {target}, signal.SIGTERM, info)",
    "kill everything": "import os, signal\nos.kill(-1, signal.SIGTERM)",
    "SIGIO owner": "import fcntl, os, signal\nr, w = os.pipe()\nfcntl.fcntl(r, 10, signal.SIGTERM)\n"  # F_SETSIG
                   "fcntl.fcntl(r, fcntl.F_SETOWN, {target})\nfcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\n"
                   "os.write(w, b'x')",
}


# (the group-wide ones are only aimed at the decoy: their control would signal the test runner's whole group)
@pytest.mark.parametrize("attack", [a for a in SIGNAL_ATTACKS if a not in ("kill everything", "os.killpg",
                                                                            "ctypes kill group")])
def test_no_signal_reaches_the_host(host, attack):
    code = SIGNAL_ATTACKS[attack].format(target=host.pid)
    control = host.control(code)
    assert signal.SIGTERM in control["signals"], f"the attack itself is broken: {control}"
    run_attack(host, code)  # asserts that no signal arrived


@pytest.mark.parametrize("attack", list(SIGNAL_ATTACKS))
def test_no_signal_reaches_a_process_outside(host, decoy, attack):
    code = SIGNAL_ATTACKS[attack].format(target=decoy.pid)
    if attack != "kill everything":
        # the control kills a decoy of its own
        entry = pwd.getpwuid(host.uid)
        other = subprocess.Popen(["sleep", "60"], start_new_session=True, user=entry.pw_uid, group=entry.pw_gid,
                                 extra_groups=[] if os.geteuid() == 0 else None)
        try:
            host.control(SIGNAL_ATTACKS[attack].format(target=other.pid))
            assert other.wait(timeout=5) == -signal.SIGTERM, "the attack itself is broken"
        finally:
            other.kill()
    run_attack(host, code)
    time.sleep(0.05)
    assert decoy.poll() is None, f"the decoy outside was killed by {attack}"


# -----------------------------------------------------------------------------
# Sockets: a TCP and a unix socket listen outside; no connection may arrive

@pytest.fixture
def listeners(outside):
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = os.path.join(outside, "listen.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen()
    accepted = []

    def serve(server):
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(server.family)
            conn.close()
    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in (tcp, unix)]
    for t in threads:
        t.start()
    yield {"port": tcp.getsockname()[1], "unix": unix_path, "accepted": accepted}
    for s in (tcp, unix):
        s.shutdown(socket.SHUT_RDWR)
        s.close()


SOCKET_ATTACKS = {
    "socket tcp": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "socket unix": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({unix!r})",
    "renamed _socket": COPY_EXTENSION.format(name="_socket") +
        "spec.loader.exec_module(mod)\ns = mod.socket(2, 1)\ns.connect(('127.0.0.1', {port}))",
    "_socket under another name": RENAMED_EXTENSION.format(name="_socket") +
        "spec.loader.exec_module(mod)\ns = mod.socket(2, 1)\ns.connect(('127.0.0.1', {port}))",
    "ctypes socket": "import ctypes, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"
                     "addr = struct.pack('<HH4s8x', 2, __import__('socket').htons({port}), bytes([127, 0, 0, 1]))\n"
                     "libc.connect(fd, addr, len(addr))",
}


@pytest.mark.parametrize("attack", list(SOCKET_ATTACKS))
def test_no_socket_reaches_anything(host, listeners, attack):
    code = SOCKET_ATTACKS[attack].format(port=listeners["port"], unix=listeners["unix"])
    if attack == "ctypes socket":
        code = code.replace("__import__('socket').htons", "(lambda p: ((p & 255) << 8) | (p >> 8))")
    skip_if_no_extension_file(attack, host.control(code))
    deadline = time.monotonic() + 5
    while not listeners["accepted"] and time.monotonic() < deadline:  # the accepting thread may lag
        time.sleep(0.01)
    assert len(listeners["accepted"]) == 1, "the attack itself is broken"
    run_attack(host, code)
    time.sleep(0.2)
    assert len(listeners["accepted"]) == 1, f"{attack} reached a listener outside"


# -----------------------------------------------------------------------------
# Writing outside: the directory listing, the victim's content, mode, times and owner stay as they were

WRITE_ATTACKS = {
    "open new file": "open({outside!r} + '/new.txt', 'w').write('x')",
    "append": "open({victim!r}, 'a').write('x')",
    "symlink": "import os\nos.symlink({victim!r}, 'link')\nopen('link', 'a').write('x')",
    "symlink to dir": "import os\nos.symlink({outside!r}, 'dir')\nopen('dir/new.txt', 'w').write('x')",
    "hard link": "import os\nos.link({victim!r}, 'hard')\nopen('hard', 'a').write('x')",
    "dir_fd": "import os\nfd = os.open({outside!r}, os.O_RDONLY)\n"
              "os.close(os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
    "O_PATH dir_fd": "import os\nfd = os.open({outside!r}, os.O_PATH)\n"
                     "os.close(os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
    "rename out": "open('made.txt', 'w').write('x')\nimport os\nos.rename('made.txt', {outside!r} + '/new.txt')",
    "rename over victim": "open('made.txt', 'w').write('x')\nimport os\nos.replace('made.txt', {victim!r})",
    "rename victim in": "import os\nos.rename({victim!r}, 'stolen.txt')",
    "remove": "import os\nos.remove({victim!r})",
    "/proc/self/fd": "import os\nfd = os.open({victim!r}, os.O_RDONLY)\nopen('/proc/self/fd/%d' % fd, 'a').write('x')",
    "/proc/self/root": "open('/proc/self/root' + {victim!r}, 'a').write('x')",
    "/proc/self/cwd": "import os\nos.chdir({outside!r})\nopen('/proc/self/cwd/new.txt', 'w').write('x')",
    "chdir out": "import os\nos.chdir({outside!r})\nopen('new.txt', 'w').write('x')",
    "chmod": "import os\nos.chmod({victim!r}, 0o700)",
    "fchmod": "import os\nos.fchmod(os.open({victim!r}, os.O_RDONLY), 0o700)",
    "chown": "import os\nos.chown({victim!r}, 0, 12345)",
    "utime": "import os\nos.utime({victim!r}, (5, 5))",
    "truncate": "import os\nos.truncate({victim!r}, 0)",
    "mkdir": "import os\nos.mkdir({outside!r} + '/newdir')",
    "mkfifo": "import os\nos.mkfifo({outside!r} + '/fifo')",
    "ctypes open": "import ctypes\nlibc = ctypes.CDLL(None)\n"
                   "libc.write(libc.open({victim!r}.encode(), 1 | 1024), b'x', 1)",  # O_WRONLY | O_APPEND
}


@pytest.mark.parametrize("attack", list(WRITE_ATTACKS))
def test_nothing_outside_is_written(host, outside, attack):
    victim = os.path.join(outside, "victim.txt")
    if attack == "chown" and host.uid != 0:
        pytest.skip("only root could chown, even without a sandbox")
    code = WRITE_ATTACKS[attack].format(outside=outside, victim=victim)
    before = snapshot(outside)
    control = host.control(code)
    assert not os.path.exists(victim) or snapshot(outside) != before, f"the attack itself is broken: {control}"
    shutil.rmtree(outside)
    os.mkdir(outside)
    with open(victim, "w") as f:
        f.write("precious")
    os.utime(victim, (1_000_000, 1_000_000))
    for p in (outside, victim):
        os.chown(p, host.uid, -1)
    os.chmod(outside, 0o777)
    os.chmod(victim, 0o666)
    before = snapshot(outside)
    run_attack(host, code)
    assert snapshot(outside) == before


# -----------------------------------------------------------------------------
# Reading outside: the home directory, a private file, /proc of other processes, /etc

def read_attacks(host, outside):
    home = pwd.getpwuid(host.uid).pw_dir
    entries = sorted(os.listdir(home))
    assert entries, "the host user's home is empty: nothing to find"
    return {
        "list home": (f"import os\nprint(os.listdir({home!r}))", [repr(e) for e in entries]),
        "scandir home": (f"import os\nprint([e.name for e in os.scandir({home!r})])", [repr(e) for e in entries]),
        "read file": (f"print(open({os.path.join(outside, 'victim.txt')!r}).read())", ["precious"]),
        "list outside": (f"import os\nprint(os.listdir({outside!r}))", ["victim.txt"]),
        "host cmdline": (f"print(open('/proc/{host.pid}/cmdline', 'rb').read())", ["python"]),
        "host environ": (f"print(open('/proc/{host.pid}/environ', 'rb').read())", ["PATH="]),
        "list /proc": ("import os\nprint(os.listdir('/proc'))", [repr(str(host.pid))]),
        "etc passwd": ("print(open('/etc/passwd').read())", ["root:x:0:0"]),
        "ctypes read": (f"import ctypes\nlibc = ctypes.CDLL(None)\n"
                        f"fd = libc.open({os.path.join(outside, 'victim.txt')!r}.encode(), 0)\n"
                        "buf = ctypes.create_string_buffer(64)\nlibc.read(fd, buf, 64)\nprint(buf.value)",
                        ["precious"]),
    }


READ_ATTACK_NAMES = ["list home", "scandir home", "read file", "list outside", "host cmdline", "host environ",
                     "list /proc", "etc passwd", "ctypes read"]


@pytest.mark.parametrize("attack", READ_ATTACK_NAMES)
def test_nothing_outside_is_listed_or_read(host, outside, attack):
    code, secrets = read_attacks(host, outside)[attack]
    control = host.control(code)
    assert any(s in control["stdout"] for s in secrets), f"the attack itself is broken: {control}"
    result = run_attack(host, code)
    for s in secrets:
        assert s not in result["stdout"] + result["stderr"], f"{attack} revealed {s!r}"


# -----------------------------------------------------------------------------
# Exhaustion: each is contained, the call returns in time, the host carries on

def test_fork_bomb_leaves_nothing_behind(host):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run_attack(host, code, timeout=0.5)
    assert not result["success"] and time.monotonic() - start < 10


def test_thread_bomb_is_contained(host):
    code = ("import threading, time\nn = 0\nwhile True:\n    try:\n"
            "        threading.Thread(target=time.sleep, args=(100,), daemon=True).start()\n        n += 1\n"
            "    except RuntimeError:\n        print('threads', n, flush=True)\n        time.sleep(100)\n")
    start = time.monotonic()
    result = run_attack(host, code, timeout=1.0)
    assert not result["success"] and time.monotonic() - start < 10


def test_memory_bomb_is_contained_even_after_trying_to_raise_the_limit(host):
    code = ("import resource\ntry:\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nexcept Exception:\n    pass\n"
            "x = bytearray(1024 ** 3)\nprint('allocated', len(x) >> 30)")
    result = run_attack(host, code, memory=128 * 1024 * 1024)
    assert "allocated 1" not in result["stdout"]
    assert not result["success"]


def test_disk_filling_with_many_files_is_bounded(host):
    if not host.capabilities()["disk_quota"]:
        pytest.skip("no namespaces, so no tmpfs quota: only each file's size is bounded (see sandbox.describe)")
    code = ("import os\nwritten = 0\ntry:\n    for i in range(100000):\n"
            "        with open('f%d' % i, 'wb') as f:\n            f.write(b'x' * (1 << 20))\n"
            "        written += 1 << 20\nexcept OSError as e:\n    pass\nprint('MB', written >> 20)\n"
            "files = 0\ntry:\n    for i in range(100000):\n        open('e%d' % i, 'w').close()\n        files += 1\n"
            "except OSError:\n    pass\nprint('files', files)\n")
    result = run_attack(host, code, timeout=20.0)
    counts = dict(line.split() for line in result["stdout"].splitlines())
    assert set(counts) == {"MB", "files"}, result
    assert int(counts["MB"]) <= execution.DISK_BYTES >> 20
    assert int(counts["files"]) <= execution.DISK_INODES


def test_file_descriptors_are_bounded(host):
    code = "import os\nfds = []\ntry:\n    while True:\n        fds.append(os.open('/dev/null', os.O_RDONLY))\n" \
           "except OSError:\n    print('fds', len(fds))\n"
    result = run_attack(host, code)
    assert 0 < int(result["stdout"].split()[1]) <= 64


def test_huge_output_is_cut_and_the_program_stopped(host):
    start = time.monotonic()
    result = run_attack(host, "while True:\n    print('x' * 10000)", timeout=20.0)
    assert not result["success"] and "output limit" in result["error"]
    assert len(result["stdout"]) <= execution.DEFAULT_MAX_OUTPUT_BYTES
    assert time.monotonic() - start < 10


def test_infinite_loop_with_every_signal_blocked_or_ignored_ends_at_the_deadline(host):
    code = ("import signal\nfor s in signal.valid_signals():\n    try:\n        signal.signal(s, signal.SIG_IGN)\n"
            "    except (OSError, ValueError, RuntimeError):\n        pass\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())\nwhile True:\n    pass\n")
    start = time.monotonic()
    result = run_attack(host, code, timeout=1.0)
    assert result["timeout"] and not result["success"]
    assert time.monotonic() - start < 8


def test_ordinary_programs_still_work_in_the_same_hosts(host):
    code = ("import threading, tempfile, os, json, hashlib, decimal, re, collections\n"
            "out = []\nt = threading.Thread(target=lambda: out.append(sum(range(10))))\nt.start()\nt.join()\n"
            "with tempfile.NamedTemporaryFile('w', dir='.', delete=False) as f:\n    f.write('hello')\n"
            "os.mkdir('sub')\nos.rename(f.name, 'sub/moved.txt')\n"
            "print(out[0], open('sub/moved.txt').read(), hashlib.md5(b'a').hexdigest()[:6],\n"
            "      decimal.Decimal('1.1') * 2)\n")
    result = run_attack(host, code)
    assert result["success"], result
    assert result["stdout"] == "45 hello 0cc175 2.2\n"
