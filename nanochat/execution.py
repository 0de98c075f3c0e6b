"""
Running code the model wrote (HumanEval completions), without trusting it.

`execute_code(code, timeout, maximum_memory_bytes)` runs a whole Python program in a fresh, throw-away
process and returns an `ExecutionResult`. (The engine's calculator tool is nanochat.calculator.)

Containment, outermost first:
1. The kernel (nanochat.sandbox, nanochat/sandbox_child.py): before any byte of the program runs, the
   child confines itself: resource limits; user, mount and network namespaces with read-only mounts and a
   small tmpfs as its working directory; no capabilities, no new privileges; Landlock (reads only in
   the Python installation and its directory, writes only in its directory); a seccomp-bpf allow-list
   (threads but no processes, signals only to itself, no exec, ptrace, sockets, mounts, ...). This holds
   whatever the program does, including loading any C extension or calling libc through ctypes. If the
   host cannot set it up, execute_code raises SandboxUnavailable instead of running the program (unless
   nanochat.sandbox.allow_unsafe_execution() was called: the scripts' --unsafe-execution).
2. An audit hook (PEP 578) in the child, as a second line that gives clear messages: process, socket,
   ctypes, writes or reads outside, ... end the program at once with exit code 86 and a one-line
   "sandbox violation" on stderr.
3. This process: a wall-clock deadline after which the child's whole process group gets SIGKILL, and
   output read with a cap (64 KB per stream by default; a program that writes more is killed).
The working directory is a fresh temporary directory, removed afterwards.
"""

import dataclasses
import math
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from nanochat import sandbox
from nanochat.sandbox import SandboxUnavailable, allow_unsafe_execution, sandbox_capabilities

__all__ = ["ExecutionResult", "execute_code", "sandbox_capabilities", "allow_unsafe_execution", "SandboxUnavailable"]

VIOLATION_EXIT_CODE = 86
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
DISK_BYTES = 64 * 1024 * 1024  # the working directory's tmpfs: all files together
DISK_INODES = 4096


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
    success is True only if it exited 0 within the limits and did not trip the sandbox.
    Raises SandboxUnavailable when this host cannot confine it (and unsafe execution was not allowed)."""
    return _execute(code, timeout, maximum_memory_bytes, max_output_bytes, max_file_bytes)


def _execute(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES,
             max_file_bytes=16 * 1024 * 1024, audit_hook=True):
    """execute_code, with the audit hook optional: the attack tests switch it off to show that the
    kernel alone holds."""
    layers = sandbox.layers_for_untrusted_code()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat_exec_"))
    try:
        memory = int(maximum_memory_bytes) if maximum_memory_bytes else 4 * 1024 ** 3
        limits = {"cpu": max(1, int(math.ceil(timeout)) + 1), "memory": memory, "fsize": int(max_file_bytes),
                  "nofile": 64, "disk": DISK_BYTES, "inodes": DISK_INODES}
        proc, settings = sandbox.start_child(workdir, limits, layers, audit_hook=audit_hook)
        try:
            result = _supervise(proc, settings + code.encode("utf-8", "replace"), timeout, max_output_bytes)
        finally:
            _kill_group(proc)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
            proc.wait()
        if proc.returncode == sandbox.SETUP_FAILED_EXIT and "sandbox setup failed:" in result.stderr:
            raise SandboxUnavailable(result.stderr.strip().splitlines()[-1])
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _feed_stdin(proc, data):
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _supervise(proc, data, timeout, max_output_bytes):
    # the program goes in through stdin from a thread, so a huge program cannot block us
    feeder = threading.Thread(target=_feed_stdin, args=(proc, data), daemon=True)
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
