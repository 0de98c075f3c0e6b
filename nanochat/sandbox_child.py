"""
The sandboxed child: the first, trusted code of the process that runs a model-written program.
nanochat.sandbox starts it in `python -I -B -X utf8` by its directory (it must not import nanochat, only
the standard library, since nothing outside the Python installation is readable once it has confined
itself), writes its settings (see main) and then the program on its stdin, and reads its stdout/stderr.

Before a single byte of the program runs, the child confines itself with the kernel:
1. resource limits (hard == soft): CPU seconds, address space, file size, open files, no core dumps;
2. namespaces (when the host allows them): a new user namespace (so it holds no capability on the
   host, even when the host runs as root), an empty network namespace, and a private mount namespace
   in which every existing mount is made read-only and the working directory becomes a small tmpfs
   (bounded bytes and inodes: disk filling stops there);
3. every capability dropped, then PR_SET_NO_NEW_PRIVS;
4. Landlock: reads only in the Python installation, the system's shared libraries and the working
   directory; writes, creations, removals, links and renames only inside the working directory; no
   TCP; signals and abstract unix sockets only within the sandbox (where the kernel's ABI has them);
5. seccomp-bpf: the filter the parent compiled with libseccomp (nanochat.sandbox) for this very
   process: an allow-list of the system calls CPython needs; threads but no new processes, signals
   only to itself, no exec, ptrace, sockets, mounts, namespaces, io_uring, ...
Then (unless switched off, as the attack tests do to prove the kernel alone holds) the audit hook
below is installed as a second line that ends the program with a clear "sandbox violation" message,
and the program runs as __main__.

If a layer that the settings ask for cannot be set up, the child prints "sandbox setup failed: ..."
and exits with SETUP_FAILED_EXIT before the program runs. With "report" set, it confines itself,
prints what is active as JSON and exits: that is how the parent probes the host once.
"""

import ctypes
import marshal
import os
import resource
import stat
import sys
import types

VIOLATION_EXIT_CODE = 86
SETUP_FAILED_EXIT = 87

# Linux constants (the same on every architecture for the syscalls used here)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MS_PRIVATE, AT_RECURSIVE = 0x1, 0x2, 1 << 18, 0x8000
AT_FDCWD = -100
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_MOUNT_SETATTR = 442
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

# Landlock filesystem rights, by the ABI version that introduced them
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_ABI1 = (1 << 13) - 1
FS_BY_ABI = {1: FS_ABI1, 2: FS_ABI1 | FS_REFER, 3: FS_ABI1 | FS_REFER | FS_TRUNCATE,
             5: FS_ABI1 | FS_REFER | FS_TRUNCATE | FS_IOCTL_DEV}
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # the ones a file rule may hold

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long  # variadic: callers pass every integer as a full c_long
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4  # the unused arguments must really be 0
libc.unshare.argtypes = [ctypes.c_int]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
L = ctypes.c_long


class SetupError(Exception):
    pass


def _check(result, what):
    if result < 0:
        e = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(e)} (errno {e})")
    return result


# -----------------------------------------------------------------------------
# The layers, in the order they are applied

def set_limits(limits):
    for name, value in (("RLIMIT_CPU", limits["cpu"]), ("RLIMIT_AS", limits["memory"]),
                        ("RLIMIT_FSIZE", limits["fsize"]), ("RLIMIT_NOFILE", limits["nofile"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def enter_namespaces(workdir, disk_bytes, disk_inodes):
    """New user + mount + network namespaces; every mount read-only; a bounded tmpfs as the workdir."""
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET), "unshare(user, mount, net)")
    # keep our ids as they were (so files we create look like the caller's); setgroups must be off first
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    # struct mount_attr {attr_set, attr_clr, propagation, userns_fd}: read-only, private, all mounts at once
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, MS_PRIVATE, 0)
    _check(libc.syscall(L(SYS_MOUNT_SETATTR), L(AT_FDCWD), b"/", L(AT_RECURSIVE), attr, L(ctypes.sizeof(attr))),
           "mount_setattr(/, read-only)")
    options = f"size={disk_bytes},nr_inodes={disk_inodes},mode=700".encode()
    _check(libc.mount(b"sandbox", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options),
           "mount(tmpfs on the working directory)")


def drop_capabilities():
    # capset(version 3, this thread) with empty effective/permitted/inheritable sets, then no ambient ones
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(libc.capset(header, data), "capset")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL on old kernels: nothing to clear
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def landlock_abi():
    abi = libc.syscall(L(SYS_LANDLOCK_CREATE_RULESET), None, L(0), L(LANDLOCK_CREATE_RULESET_VERSION))
    return abi if abi > 0 else 0


def read_roots():
    """The Python installation this interpreter imports from (its sys.path inside its prefixes; not
    what .pth files add, such as an editable checkout), the shared libraries extension modules load,
    and time zones."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    roots = set()
    for p in sys.path:
        real = os.path.realpath(p) if p else ""
        if real and os.path.isdir(real) and any(real == q or real.startswith(q + "/") for q in prefixes):
            roots.add(real)
    for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo"):
        if os.path.isdir(p):
            roots.add(os.path.realpath(p))
    return sorted(roots)


def apply_landlock(abi, workdir, roots):
    handled = FS_BY_ABI[max(a for a in FS_BY_ABI if a <= abi)]
    # struct landlock_ruleset_attr: handled_access_fs, handled_access_net (ABI 4), scoped (ABI 6)
    fields = [handled]
    if abi >= 4:
        fields.append(NET_BIND_TCP | NET_CONNECT_TCP)  # no rule grants them: no TCP at all
    if abi >= 6:
        fields.append(SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = _check(libc.syscall(L(SYS_LANDLOCK_CREATE_RULESET), attr, L(ctypes.sizeof(attr)), L(0)),
                     "landlock_create_ruleset")
    read = FS_READ_FILE | FS_READ_DIR
    inside = handled & ~(FS_EXECUTE | FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_MAKE_SOCK | FS_IOCTL_DEV)
    rules = [(root, read) for root in roots] + [(workdir, inside), ("/etc/ld.so.cache", FS_READ_FILE),
                                                ("/dev/null", FS_READ_FILE | FS_WRITE_FILE | (handled & FS_TRUNCATE)),
                                                ("/dev/zero", FS_READ_FILE), ("/dev/urandom", FS_READ_FILE),
                                                ("/dev/random", FS_READ_FILE)]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not on this system (e.g. no /lib64)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= FILE_RIGHTS
                # struct landlock_path_beneath_attr (packed): u64 allowed_access, s32 parent_fd
                rule = ctypes.create_string_buffer(access.to_bytes(8, sys.byteorder) + fd.to_bytes(4, sys.byteorder))
                _check(libc.syscall(L(SYS_LANDLOCK_ADD_RULE), L(ruleset), L(LANDLOCK_RULE_PATH_BENEATH), rule, L(0)),
                       f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        _check(libc.syscall(L(SYS_LANDLOCK_RESTRICT_SELF), L(ruleset), L(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def load_seccomp(bpf):
    """Install the classic-BPF program compiled by the parent (8 bytes per instruction)."""
    if not bpf or len(bpf) % 8:
        raise SetupError("seccomp: no valid filter program was given")
    program = ctypes.create_string_buffer(bpf, len(bpf))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(bpf) // 8, ctypes.addressof(program))
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


def confine(config, roots):
    """Apply every layer the settings ask for; returns what is active. Raises SetupError."""
    workdir = config["workdir"]
    set_limits(config["limits"])
    active = {"namespaces": False, "landlock_abi": 0, "seccomp": False, "no_new_privs": False}
    if config["namespaces"]:
        enter_namespaces(workdir, config["disk_bytes"], config["disk_inodes"])
        active["namespaces"] = True
    os.chdir(workdir)  # (again: after the mount, so that "." is the tmpfs)
    drop_capabilities()
    active["no_new_privs"] = True
    if config["landlock"]:
        abi = landlock_abi()
        if abi < 1:
            raise SetupError("Landlock is not available in this kernel")
        apply_landlock(abi, workdir, roots)
        active["landlock_abi"] = abi
    if config["seccomp"] is not None:
        load_seccomp(config["seccomp"])
        active["seccomp"] = True
    return active


# -----------------------------------------------------------------------------
# The second line: an audit hook (PEP 578) that ends the program with a clear "sandbox violation" message
# at its first attempt at something the kernel refuses anyway (it grants nothing the kernel does not).

BLOCKED_EVENT_PREFIXES = (
    "socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "os.link", "os.symlink", "signal.pthread_kill", "ctypes.", "resource.setrlimit",
    "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sqlite3.", "urllib.", "http.",
    "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.", "webbrowser.", "pty.",
    "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "sys._current_frames", "sys.unraisablehook")
BLOCKED_MODULES = frozenset((
    "ctypes", "_ctypes", "_posixsubprocess", "subprocess", "socket", "_socket", "ssl", "_ssl", "multiprocessing",
    "_multiprocessing", "_posixshmem", "pty", "asyncio", "selectors", "select", "mmap", "sqlite3", "_sqlite3",
    "dbm", "_dbm", "_gdbm", "urllib.request", "http", "ftplib", "smtplib", "webbrowser", "concurrent",
    "_xxsubinterpreters", "_testcapi", "_testinternalcapi", "faulthandler", "tracemalloc", "readline"))
# event -> (index of the path argument, indices of dir_fd arguments...)
PATH_EVENTS = {"os.remove": (0, 1), "os.rmdir": (0, 1), "os.mkdir": (0, 2), "os.chmod": (0, 2),
               "os.chown": (0, 3), "os.utime": (0, 4), "os.truncate": (0, None),
               "os.rename": (0, 2, 3), "os.chdir": (0, None), "shutil.rmtree": (0, 1)}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def make_audit_hook(workdir, roots):
    """The hook only uses values bound here, at definition time: the program cannot rebind them."""
    roots = tuple(roots) + (workdir,)
    path_types = ("PurePosixPath", "PosixPath")

    def hook(event, args, _workdir=workdir, _roots=roots, _blocked=BLOCKED_EVENT_PREFIXES,
             _blocked_modules=BLOCKED_MODULES, _path_events=PATH_EVENTS, _write_flags=WRITE_FLAGS,
             _getcwd=os.getcwd, _write=os.write, _exit=os._exit, _str=str, _bytes=bytes, _int=int,
             _type=type, _function=types.FunctionType, _path_types=path_types, _stat_isdir=stat.S_ISDIR,
             _stat=os.stat, _repr=repr, _code=VIOLATION_EXIT_CODE):

        def violation(what):
            try:
                _write(2, ("sandbox violation: " + what + "\n").encode("utf-8", "replace"))
            finally:
                _exit(_code)

        def as_text(p):
            # only plain strings/bytes and pathlib's types are trusted: a user-defined __fspath__ could
            # answer differently here and when the real call converts it. (pathlib's types are known by
            # name, since importing pathlib here would cost every run a third of its start-up; a forged
            # "pathlib" could then fool this message layer, not the kernel, which decides.)
            t = _type(p)
            if t is _str:
                return p
            if t is _bytes:
                return _bytes.decode(p, "utf-8", "surrogateescape")
            if _str(t.__module__).split(".")[0] == "pathlib" and t.__name__ in _path_types:  # (3.13: pathlib._local)
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
                violation(what + " outside the sandbox directory: " + _repr(text))

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
                                violation("open of a directory outside the sandbox: " + _repr(text))
                        except OSError:
                            pass
                    return
            violation("read outside the sandbox and the Python installation: " + _repr(text))
        elif event == "import":
            name = args[0]
            if _type(name) is not _str:
                violation("import of a non-string module name")
            if name.split(".")[0] in _blocked_modules or name in _blocked_modules:
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

    return hook


# -----------------------------------------------------------------------------
# Main: settings and program in, confinement, then the program

def main():
    # settings: 4 bytes of length, then a marshal'ed dict (no json: every import here costs each run)
    size = int.from_bytes(sys.stdin.buffer.read(4), "little")
    config = marshal.loads(sys.stdin.buffer.read(size))
    code = sys.stdin.buffer.read().decode("utf-8", "replace")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, "r", closefd=False)
    roots = read_roots()
    try:
        active = confine(config, roots)
    except (SetupError, OSError) as e:
        os.write(2, f"sandbox setup failed: {e}\n".encode("utf-8", "replace"))
        os._exit(SETUP_FAILED_EXIT)
    if config.get("report"):
        print(repr(active))
        return
    # the program gets no handle on the machinery: ctypes is re-imported (and so seen by the hook) if it
    # wants it, and this module is not its __main__
    for name in [n for n in sys.modules if n == "ctypes" or n.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    if config["audit_hook"]:
        sys.addaudithook(make_audit_hook(config["workdir"], roots))
    sys.modules.pop("sandbox_child", None)  # (imported by name by the launcher, see nanochat.sandbox)
    main_module = types.ModuleType("__main__")
    main_module.__builtins__ = __builtins__
    sys.modules["__main__"] = main_module
    try:
        exec(compile(code, "<sandbox>", "exec"), main_module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # the traceback of the program's frames only (the C printer: no imports)
        e = e.with_traceback(e.__traceback__.tb_next)
        sys.excepthook(type(e), e, e.__traceback__)
        sys.exit(1)


if __name__ == "__main__":
    main()
