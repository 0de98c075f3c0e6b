"""
The kernel side of running model-written code: what this host can confine, the seccomp filter each
sandboxed child loads, and how the child (nanochat/sandbox_child.py) is started.

The child confines itself with namespaces, Landlock and seccomp-bpf before the program runs (see its
docstring). Here, once per process, `probe()` starts a child that sets everything up and reports what
is active; without Landlock and seccomp (or when the child cannot set them up), untrusted code is
refused with SandboxUnavailable, unless `allow_unsafe_execution()` was called (the scripts'
`--unsafe-execution`), in which case it runs with whatever layers this host has, after a loud warning.

The seccomp filter is an allow-list compiled with libseccomp (through pyseccomp) for each child,
since it names the child's own pid: kill/tgkill only to itself; clone only with CLONE_THREAD (threads,
not processes; clone3 answers ENOSYS so that the C library falls back to clone, whose flags a filter
can see); setrlimit/prlimit only to read; fcntl and ioctl only with commands that signal no one. Everything
not listed fails with EPERM: fork, vfork, execve,
execveat, ptrace, process_vm_*, pidfd_*, socket, socketpair, io_uring_*, mount, unshare, setns, bpf,
perf_event_open, keyctl, chown, setxattr, ...
"""

import ast
import errno
import functools
import marshal
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile

from nanochat.common import NanochatError, print0

CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
# imported by name rather than run by path, so that its compiled form in __pycache__ is used (compiling
# it would cost every run as much again as the interpreter's start-up); probe() writes that file
LAUNCHER = (f"import sys; sys.path.insert(0, {os.path.dirname(CHILD_SCRIPT)!r}); import sandbox_child; "
            "del sys.path[0]; sandbox_child.main()")
SETUP_FAILED_EXIT = 87  # sandbox_child.SETUP_FAILED_EXIT (that file is run by path, not imported)
CLONE_THREAD = 0x00010000

# What CPython needs to run ordinary programs (files, memory, threads, time, its own signals).
ALLOWED_SYSCALLS = (
    # files and descriptors (which paths is Landlock's business)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "preadv2", "pwritev", "pwritev2",
    "lseek", "close", "close_range", "open", "openat", "openat2", "creat", "stat", "fstat", "lstat",
    "newfstatat", "statx", "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents",
    "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename",
    "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "ftruncate", "fallocate", "fsync",
    "fdatasync", "flock", "dup", "dup2", "dup3", "pipe", "pipe2", "sendfile", "copy_file_range",
    "statfs", "fstatfs", "umask", "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr",
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore",
    # its own signals and timers
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "rt_sigpending", "rt_sigsuspend",
    "rt_sigtimedwait", "alarm", "setitimer", "getitimer", "pause", "restart_syscall",
    # time
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time", "times",
    # who am I
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid",
    "getresgid", "getpgrp", "getpgid", "getsid", "getrusage", "getpriority", "sched_getaffinity",
    "sched_yield", "sched_getparam", "sched_getscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "uname", "sysinfo", "getrandom", "getrlimit", "getcpu",
    # threads and exit
    "futex", "futex_waitv", "set_robust_list", "rseq", "set_tid_address", "arch_prctl", "membarrier",
    "exit", "exit_group", "wait4", "waitid",
    # waiting on descriptors
    "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
    "prctl",
)
# changing a file's mode or times needs no write access, only ownership, and Landlock does not see it:
# allowed only when the child's mounts are read-only (then the kernel refuses it outside the workdir)
METADATA_SYSCALLS = ("chmod", "fchmod", "fchmodat", "fchmodat2", "utime", "utimes", "futimesat", "utimensat")
# fcntl commands, all but F_SETOWN/F_SETOWN_EX/F_SETSIG (which would have the kernel send SIGIO, or any
# signal, to another process when a descriptor is ready) and leases/dnotify (signals too)
SAFE_FCNTLS = (0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 16, 36, 37, 38, 1025, 1030, 1031, 1032, 1033, 1034)
# ioctls for terminals/pipes that the io module asks (isatty, non-blocking, close-on-exec)
SAFE_IOCTLS = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)  # TCGETS TIOCGWINSZ FIONREAD FIONBIO FIONCLEX FIOCLEX


class SandboxUnavailable(NanochatError):
    """The kernel confinement cannot be set up here, and unsafe execution was not asked for."""


_unsafe = {"allowed": False}


def allow_unsafe_execution():
    """Let execute_code run programs without the kernel confinement when the host cannot provide it
    (the scripts' --unsafe-execution). Loud: model-written code could then harm this machine."""
    _unsafe["allowed"] = True
    print("WARNING: --unsafe-execution: model-written code may run WITHOUT the kernel sandbox, and could then "
          "start processes, signal them, use the network, and read or write your files", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# The seccomp filter

def _seccomp():
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as e:  # RuntimeError: libseccomp itself is missing
        return None, f"libseccomp/pyseccomp unavailable ({e})"
    return pyseccomp, None


def _add_rule(seccomp, flt, action, name, *args):
    number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
    if number == -1:  # not a system call on this architecture
        return
    flt.add_rule(action, number, *args)


def compile_seccomp(pid, read_only_mounts):
    """The classic-BPF program (bytes) for the child `pid`."""
    seccomp, problem = _seccomp()
    if seccomp is None:
        raise SandboxUnavailable(problem)
    flt = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)  # e.g. 32-bit system calls on x86_64
    names = ALLOWED_SYSCALLS + (METADATA_SYSCALLS if read_only_mounts else ())
    # truncate(path) is checked by Landlock only from its ABI 3; the ruleset handles it then (see the child)
    names += ("truncate",) if landlock_abi() >= 3 else ()
    for name in names:
        _add_rule(seccomp, flt, seccomp.ALLOW, name)
    _add_rule(seccomp, flt, seccomp.ALLOW, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    _add_rule(seccomp, flt, seccomp.ERRNO(errno.ENOSYS), "clone3")
    _add_rule(seccomp, flt, seccomp.ALLOW, "kill", seccomp.Arg(0, seccomp.EQ, pid))
    _add_rule(seccomp, flt, seccomp.ALLOW, "tgkill", seccomp.Arg(0, seccomp.EQ, pid))
    _add_rule(seccomp, flt, seccomp.ALLOW, "prlimit64", seccomp.Arg(2, seccomp.EQ, 0))
    for command in SAFE_FCNTLS:
        _add_rule(seccomp, flt, seccomp.ALLOW, "fcntl", seccomp.Arg(1, seccomp.EQ, command))
    for request in SAFE_IOCTLS:
        _add_rule(seccomp, flt, seccomp.ALLOW, "ioctl", seccomp.Arg(1, seccomp.EQ, request))
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "wb", closefd=False) as f:
            flt.export_bpf(f)
        os.close(write_fd)
        write_fd = None
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        if write_fd is not None:
            os.close(write_fd)
    return b"".join(chunks)


@functools.lru_cache(maxsize=None)
def landlock_abi():
    """Landlock ABI version of the running kernel (0: none)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return abi if abi > 0 else 0


# -----------------------------------------------------------------------------
# Starting a child

def start_child(workdir, limits, layers, audit_hook=True, report=False):
    """Start the child in `workdir` (a new session, minimal environment, three pipes). Returns the
    Popen and the settings (bytes) to write on its stdin before the program."""
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "TZ": "UTC"}
    proc = subprocess.Popen([sys.executable, "-I", "-B", "-X", "utf8", "-c", LAUNCHER],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=workdir, env=env, start_new_session=True, close_fds=True)
    try:
        bpf = compile_seccomp(proc.pid, layers["namespaces"]) if layers["seccomp"] else None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    settings = {"workdir": workdir, "limits": limits, "namespaces": layers["namespaces"],
                "landlock": layers["landlock"], "seccomp": bpf,
                "disk_bytes": limits["disk"], "disk_inodes": limits["inodes"],
                "audit_hook": audit_hook, "report": report}
    data = marshal.dumps(settings)  # the child is this same interpreter
    return proc, len(data).to_bytes(4, "little") + data


def _try_layers(layers):
    """Start a child in report mode with `layers`: (what it says is active, or None, and its complaint)."""
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat_probe_"))
    limits = {"cpu": 10, "memory": 1 << 30, "fsize": 1 << 20, "nofile": 64, "disk": 1 << 20, "inodes": 64}
    try:
        proc, settings = start_child(workdir, limits, layers, report=True)
        try:
            out, err = proc.communicate(settings, timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode == 0:
            return ast.literal_eval(out.decode()), None
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return None, lines[-1] if lines else f"exit code {proc.returncode}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def probe():
    """What this host can confine, found once by starting a child that sets it all up."""
    try:
        py_compile.compile(CHILD_SCRIPT, doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass  # a read-only checkout: the child compiles itself each time, slower but the same
    problems = []
    have_seccomp = _seccomp()[0] is not None
    if not have_seccomp:
        problems.append(_seccomp()[1])
    abi = landlock_abi()
    if abi < 1:
        problems.append("no Landlock in this kernel (Linux >= 5.13 with CONFIG_SECURITY_LANDLOCK, lsm=landlock)")
    layers = {"namespaces": True, "landlock": abi >= 1, "seccomp": have_seccomp}
    active, complaint = _try_layers(layers)
    if active is None:
        # user namespaces may be off (sysctl, container policy): the other layers may still work
        problems.append(f"namespaces: {complaint}")
        layers["namespaces"] = False
        active, complaint = _try_layers(layers)
    if active is None:
        problems.append(f"setup: {complaint}")
        layers = {"namespaces": False, "landlock": False, "seccomp": False}
        active = {"namespaces": False, "landlock_abi": 0, "seccomp": False, "no_new_privs": False}
    return layers, active, tuple(problems)


def _confined(active):
    # Landlock checks truncation from ABI 3 only (open(O_TRUNC) included); before that, only read-only
    # mounts stop a truncation of a readable file outside
    return bool(active["seccomp"] and active["landlock_abi"] and (active["landlock_abi"] >= 3 or active["namespaces"]))


def sandbox_capabilities():
    """Which kernel layers confine model-written code on this host (for logs and reports)."""
    layers, active, problems = probe()
    return {"confined": _confined(active),
            "seccomp_bpf": active["seccomp"], "landlock_abi": active["landlock_abi"],
            "namespaces": active["namespaces"], "network_namespace": active["namespaces"],
            "disk_quota": active["namespaces"], "no_new_privs": active["no_new_privs"],
            "unsafe_execution_allowed": _unsafe["allowed"], "problems": list(problems)}


def layers_for_untrusted_code():
    """The layers to run untrusted code with; SandboxUnavailable if the kernel cannot confine it."""
    layers, active, problems = probe()
    if not _confined(active) and not _unsafe["allowed"]:
        if not problems:
            problems = (f"Landlock ABI {active['landlock_abi']} (< 3) without namespaces",)
        raise SandboxUnavailable("cannot confine model-written code on this host (" + "; ".join(problems)
                                 + "): fix that, or pass --unsafe-execution to run it anyway at your own risk")
    return layers


def describe(capabilities):
    """One line for logs: what confines model-written code here."""
    c = capabilities
    if c["confined"]:
        head = (f"confined by the kernel: seccomp-bpf, Landlock ABI {c['landlock_abi']}, no-new-privs"
                + (", user/mount/network namespaces with read-only mounts and a tmpfs quota" if c["namespaces"]
                   else ", no namespaces (no network namespace, no disk quota)"))
    else:
        head = "NOT CONFINED by the kernel" + (" (--unsafe-execution)" if c["unsafe_execution_allowed"] else "")
    return head + ("; problems: " + "; ".join(c["problems"]) if c["problems"] else "")


def require_sandbox(unsafe_execution=False):
    """For a script about to run model-written code: take the --unsafe-execution opt-in, print once what
    confines the code, and refuse now (SandboxUnavailable) rather than after the model has run."""
    if unsafe_execution:
        allow_unsafe_execution()
    capabilities = sandbox_capabilities()
    print0(f"sandbox: {describe(capabilities)}")
    layers_for_untrusted_code()
    return capabilities
