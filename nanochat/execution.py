"""
Running code the model wrote, without trusting it.

Two entry points:
- `execute_code(code, timeout, maximum_memory_bytes)` runs a whole Python program (HumanEval
  completions) in a separate, throw-away process and returns an `ExecutionResult`.
- `eval_calculator(expr)` evaluates the engine's tool calls (`<|python_start|>2*3<|python_end|>`):
  arithmetic and a few string methods only, checked against an AST whitelist, in-process and fast.

How `execute_code` contains a program (several independent layers, so one failing is not the end):
1. Process: a fresh `python -I` (no user site, no PYTHON* env vars) in a new session/process group,
   with a minimal environment, stdin closed, and only its three pipes open. The parent enforces a
   wall-clock deadline and kills the whole process group with SIGKILL, which no handler can catch.
2. OS limits set by the child's bootstrap before any user code runs (hard == soft, so they cannot be
   raised again): RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE, RLIMIT_NPROC (no new processes for
   unprivileged users), RLIMIT_NOFILE, RLIMIT_CORE=0.
3. Network: when `unshare -n` works (root, or `unshare -rn` with user namespaces) the child runs in an
   empty network namespace: there is no interface to talk to, whatever the code does.
4. Privileges: when the host runs as root and the Python installation is readable by everybody, the
   child drops to the `nobody` user, so the kernel itself refuses writes outside its own directory.
5. An audit hook (PEP 578), installed by the bootstrap before user code: every open for writing outside
   the temporary working directory, every file removal/rename/chmod outside it, reads outside the
   Python installation and the working directory, sockets, subprocesses, exec/spawn/fork, kill,
   ctypes, resource limits, gc introspection (the way to reach the hook itself), and imports of
   process/network/FFI modules end the process at once with exit code 86 and a one-line
   "sandbox violation" on stderr. It cannot be caught by the user code, removed, or bypassed by
   tampering with builtins, since hooks run inside the interpreter's C functions; the hook itself only
   uses values bound at definition time, and re-binding a function's code or defaults is a violation.
6. Output is read by the parent with a cap (64 KB per stream); a program that writes more is killed.
The working directory is a fresh temporary directory, removed afterwards.
"""

import ast
import dataclasses
import functools
import math
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

VIOLATION_EXIT_CODE = 86
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024


@dataclasses.dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    violation: bool = False

    def __repr__(self):
        parts = [f"success={self.success}"]
        for name in ("timeout", "memory_exceeded", "violation"):
            if getattr(self, name):
                parts.append(f"{name}=True")
        if self.error:
            parts.append(f"error={self.error!r}")
        if self.stdout:
            parts.append(f"stdout={self.stdout[:200]!r}")
        if self.stderr:
            parts.append(f"stderr={self.stderr[-200:]!r}")
        return "ExecutionResult(" + ", ".join(parts) + ")"


# -----------------------------------------------------------------------------
# The bootstrap: the first (trusted) code the child runs. It reads the program from stdin, applies the
# limits, drops privileges, installs the audit hook, and only then executes the program.
# argv: workdir cpu_seconds memory_bytes fsize_bytes drop_to_nobody(0/1) read_roots(os.pathsep-joined)

_BOOTSTRAP = r'''
import sys, os, resource
def _setup():
    workdir, cpu, mem, fsize, drop, roots = sys.argv[1:7]
    code = sys.stdin.buffer.read().decode("utf-8", "replace")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, "r", closefd=False)
    limits = [(resource.RLIMIT_CPU, int(cpu)), (resource.RLIMIT_AS, int(mem)),
              (resource.RLIMIT_FSIZE, int(fsize)), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
    for which, value in limits:
        resource.setrlimit(which, (value, value))
    os.chdir(workdir)
    if drop == "1" and os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError:
            pass
    # no new processes (enforced by the kernel for unprivileged users; the audit hook covers root)
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    # signals: the parent kills with SIGKILL, so nothing here is load-bearing, but taking away the
    # means to ignore SIGXCPU/SIGTERM keeps the CPU limit's polite warning effective too
    import signal, _signal
    def _no_signals(*args, **kwargs):
        raise PermissionError("sandbox: changing signal handling is not allowed")
    for module in (signal, _signal):
        for name in ("signal", "siginterrupt", "pthread_sigmask", "setitimer", "alarm", "set_wakeup_fd"):
            if hasattr(module, name):
                setattr(module, name, _no_signals)
    # second layer for process creation: remove the functions themselves
    for module in (os, sys.modules["posix"]):
        for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
                     "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp",
                     "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg",
                     "mkfifo", "mknod", "setuid", "setgid", "setresuid", "setreuid", "chroot"):
            if hasattr(module, name):
                delattr(module, name)

    read_roots = tuple(r for r in roots.split(os.pathsep) if r) + (workdir,)
    blocked_prefixes = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn",
                        "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.link", "os.symlink",
                        "signal.pthread_kill", "ctypes.", "resource.setrlimit", "resource.prlimit",
                        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sqlite3.", "urllib.",
                        "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
                        "webbrowser.", "pty.", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
                        "sys._current_frames", "sys.unraisablehook")
    blocked_modules = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "subprocess", "socket", "_socket",
                                 "ssl", "_ssl", "multiprocessing", "_multiprocessing", "_posixshmem",
                                 "pty", "asyncio", "selectors", "select", "mmap", "sqlite3", "_sqlite3",
                                 "dbm", "_dbm", "_gdbm", "urllib", "http", "ftplib", "smtplib", "webbrowser",
                                 "concurrent", "_xxsubinterpreters", "_testcapi", "_testinternalcapi",
                                 "faulthandler", "tracemalloc", "readline"))
    path_events = {"os.remove": (0, 1), "os.rmdir": (0, 1), "os.mkdir": (0, 2), "os.chmod": (0, 2),
                   "os.chown": (0, 3), "os.utime": (0, 4), "os.truncate": (0, None),
                   "os.rename": (0, 2, 3), "os.chdir": (0, None), "shutil.rmtree": (0, 1)}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    import pathlib, types
    path_types = (pathlib.PurePosixPath, pathlib.PosixPath)

    def hook(event, args, _workdir=workdir, _roots=read_roots, _blocked=blocked_prefixes,
             _blocked_modules=blocked_modules, _path_events=path_events, _write_flags=write_flags,
             _getcwd=os.getcwd, _write=os.write, _exit=os._exit, _str=str, _bytes=bytes, _int=int,
             _type=type, _function=types.FunctionType, _path_types=path_types, _isdir=os.path.isdir,
             _stat_isdir=__import__("stat").S_ISDIR, _stat=os.stat, _ostr=repr):

        def violation(what):
            message = ("sandbox violation: " + what + "\n").encode("utf-8", "replace")
            try:
                _write(2, message)
            finally:
                _exit(86)

        def as_text(p):
            # only plain strings/bytes (or pathlib's own types) are trusted: a user-defined
            # __fspath__ could answer differently here and when the real call converts it
            t = _type(p)
            if t is _str:
                return p
            if t is _bytes:
                return _bytes.decode(p, "utf-8", "surrogateescape")
            if t in _path_types:
                return _str(p)
            return None

        def normalize(p):
            if not p.startswith("/"):
                p = _getcwd() + "/" + p
            parts = []
            for seg in p.split("/"):
                if seg == "" or seg == ".":
                    continue
                if seg == "..":
                    if parts:
                        parts.pop()
                else:
                    parts.append(seg)
            return "/" + "/".join(parts)

        def inside(p, root):
            return p == root or p.startswith(root.rstrip("/") + "/")

        def check_write_path(p, what):
            text = as_text(p)
            if text is None:
                violation(what + " with a path of type " + _type(p).__name__)
            if not inside(normalize(text), _workdir):
                violation(what + " outside the sandbox directory: " + _ostr(text))

        if event == "open":
            path, mode, flags = args
            if _type(path) is _int:
                return
            writing = False
            if _type(mode) is _str:
                for ch in "wax+":
                    if ch in mode:
                        writing = True
            if _type(flags) is _int and flags & _write_flags:
                writing = True
            if writing:
                check_write_path(path, "open for writing")
                return
            text = as_text(path)
            if text is None:
                violation("open with a path of type " + _type(path).__name__)
            full = normalize(text)
            if full in ("/dev/null", "/dev/urandom", "/dev/zero"):
                return
            for root in _roots:
                if inside(full, root):
                    if not inside(full, _workdir):
                        # a directory handle outside could serve as dir_fd for a write
                        try:
                            if _stat_isdir(_stat(full).st_mode):
                                violation("open of a directory outside the sandbox: " + _ostr(text))
                        except OSError:
                            pass
                    return
            violation("read outside the sandbox and the Python installation: " + _ostr(text))
        elif event == "import":
            name = args[0]
            if _type(name) is not _str:
                violation("import of a non-string module name")
            top = name.split(".")[0]
            if top in _blocked_modules or name in _blocked_modules:
                violation("import of " + name)
            if len(args) > 1 and _type(args[1]) is _str:
                base = args[1].rsplit("/", 1)[-1].split(".")[0]
                if base in _blocked_modules:
                    violation("import of " + base + " as " + name)
        elif event in _path_events:
            spec = _path_events[event]
            # a dir_fd makes a relative path mean some other directory: not allowed
            for i in spec[1:]:
                if i is not None and i < len(args) and args[i] is not None and args[i] != -1:
                    violation(event + " with dir_fd")
            if event == "os.truncate" and _type(args[0]) is _int:
                return  # ftruncate on an fd we could only have opened inside
            if _type(args[0]) is _int:
                violation(event + " on a file descriptor")
            check_write_path(args[0], event)
            if event == "os.rename":
                check_write_path(args[1], event)
        elif event == "object.__setattr__":
            if _type(args[0]) is _function:
                violation("rebinding " + _str(args[1]) + " of a function")
        else:
            for prefix in _blocked:
                if event.startswith(prefix):
                    violation(event)

    sys.addaudithook(hook)
    return code

_code = _setup()
del _setup
import types as _types
_main = _types.ModuleType("__main__")
_main.__builtins__ = __builtins__
sys.modules["__main__"] = _main
_compiled = compile(_code, "<sandbox>", "exec")
del _code
exec(_compiled, _main.__dict__)
'''


# -----------------------------------------------------------------------------
# What the host can offer: network namespaces, privilege drop.

@functools.lru_cache(maxsize=None)
def _unshare_prefix():
    """['unshare', '-n', '--'] (or '-rn' for unprivileged users) if that works here, else []."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    flags = ["-n"] if os.geteuid() == 0 else ["-r", "-n"]
    try:
        probe = subprocess.run([exe, *flags, "--", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (exe, *flags, "--") if probe.returncode == 0 else ()


def _world_readable(path):
    """True if user `nobody` could reach `path`: every directory on the way has o+x, the target o+r."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        prefix = "/".join(parts[:i]) or "/"
        try:
            mode = os.stat(prefix).st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


@functools.lru_cache(maxsize=None)
def _can_drop_to_nobody():
    if os.geteuid() != 0:
        return False
    try:
        pwd.getpwuid(65534)
    except KeyError:
        return False
    stdlib = os.path.dirname(os.__file__)
    return _world_readable(sys.executable) and _world_readable(stdlib)


def _read_roots():
    """Where the sandboxed program may read: the Python installation and its import path."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for p in sys.path:
        if p and os.path.isabs(p):
            roots.add(p)
    roots.add("/usr/share/zoneinfo")
    roots.add(os.path.dirname(os.__file__))
    return os.pathsep.join(sorted(os.path.realpath(r) for r in roots))


def sandbox_capabilities():
    """Which OS-level layers are active on this host (for logs and the report)."""
    return {"network_namespace": bool(_unshare_prefix()), "drop_to_nobody": _can_drop_to_nobody()}


# -----------------------------------------------------------------------------
# execute_code

def _kill_group(proc):
    for target in (lambda: os.killpg(proc.pid, signal.SIGKILL), lambda: proc.kill()):
        try:
            target()
        except (ProcessLookupError, PermissionError, OSError):
            pass


def _summarize_error(returncode, stderr_text):
    """One line saying why the program failed."""
    lines = [l for l in stderr_text.strip().splitlines() if l.strip()]
    for line in reversed(lines):
        if line.startswith("sandbox violation:"):
            return line
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by {name}"
    return lines[-1] if lines else f"exit code {returncode}"


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024,
                 max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES, max_file_bytes=16 * 1024 * 1024):
    """Run the Python program `code` in the sandbox (see the module docstring) and report how it went.
    success is True only if it exited 0 within the limits and did not trip the sandbox."""
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat_exec_"))
    drop = _can_drop_to_nobody()
    try:
        if drop:
            os.chown(workdir, 65534, 65534)
        cpu_seconds = max(1, int(math.ceil(timeout)) + 1)
        memory = int(maximum_memory_bytes) if maximum_memory_bytes else 4 * 1024 ** 3
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-X", "utf8", "-c", _BOOTSTRAP,
               workdir, str(cpu_seconds), str(memory), str(int(max_file_bytes)), "1" if drop else "0",
               _read_roots()]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, env=env, start_new_session=True, close_fds=True)
        try:
            return _supervise(proc, code, timeout, max_output_bytes)
        finally:
            _kill_group(proc)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
            proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _feed_stdin(proc, data):
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _supervise(proc, code, timeout, max_output_bytes):
    # the program goes in through stdin from a thread, so a huge program cannot block us
    feeder = threading.Thread(target=_feed_stdin, args=(proc, code.encode("utf-8", "replace")), daemon=True)
    feeder.start()
    buffers = {"stdout": bytearray(), "stderr": bytearray()}
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
    selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
    deadline = time.monotonic() + timeout
    timed_out = overflow = False
    open_streams = 2
    while open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in selector.select(timeout=min(remaining, 0.5)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            buf = buffers[key.data]
            buf.extend(chunk[: max(0, max_output_bytes - len(buf))])
            if len(chunk) and len(buf) >= max_output_bytes:
                overflow = True
        if overflow:
            break
    selector.close()
    if timed_out or overflow:
        _kill_group(proc)
    try:
        returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()) if not (timed_out or overflow) else 5)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        returncode = proc.wait()
    feeder.join(timeout=1)
    stdout = buffers["stdout"].decode("utf-8", "replace")
    stderr = buffers["stderr"].decode("utf-8", "replace")
    memory_exceeded = "MemoryError" in stderr
    violation = returncode == VIOLATION_EXIT_CODE and "sandbox violation:" in stderr
    if timed_out:
        error = f"timed out after {timeout:g}s"
    elif overflow:
        error = f"output limit exceeded ({max_output_bytes} bytes)"
    elif returncode == -signal.SIGKILL or returncode == -signal.SIGXCPU:
        error = "CPU time limit exceeded"
        timed_out = True
    elif memory_exceeded:
        error = "memory limit exceeded"
    elif returncode != 0:
        error = _summarize_error(returncode, stderr)
    else:
        error = None
    success = returncode == 0 and not (timed_out or overflow)
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error, timeout=timed_out,
                           memory_exceeded=memory_exceeded, violation=violation)
