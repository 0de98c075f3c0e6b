"""
A host for the sandbox attack tests that runs as another (unprivileged) user: it reads one JSON request
per line on stdin, runs it, and answers one JSON line on stdout. Started by tests/test_sandbox_attacks.py
with `subprocess.Popen(..., user=...)`; imports only nanochat.execution (and pyseccomp).

    {"op": "execute", "code": ..., "timeout": ..., "audit_hook": ..., "memory": ...}
        -> the ExecutionResult's fields, plus "signals": the signals this host received meanwhile
    {"op": "control", "code": ..., "timeout": ...}
        -> the same program run WITHOUT the sandbox (python -c in a fresh directory), to show the attack works
    {"op": "capabilities"} -> execution.sandbox_capabilities() as seen by this user
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile

from nanochat import execution

WATCHED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
received = []


def run_control(code, timeout):
    with tempfile.TemporaryDirectory() as cwd:
        try:
            p = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, timeout=timeout)
            return {"returncode": p.returncode, "stdout": p.stdout.decode(errors="replace"),
                    "stderr": p.stderr.decode(errors="replace")}
        except subprocess.TimeoutExpired as e:
            return {"returncode": None, "stdout": (e.stdout or b"").decode(errors="replace"),
                    "stderr": (e.stderr or b"").decode(errors="replace")}


def main():
    for sig in WATCHED_SIGNALS:
        signal.signal(sig, lambda number, frame: received.append(number))
    print(json.dumps({"pid": os.getpid(), "uid": os.getuid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        del received[:]
        if request["op"] == "execute":
            result = execution._execute(request["code"], timeout=request["timeout"],
                                        maximum_memory_bytes=request.get("memory", 256 * 1024 * 1024),
                                        audit_hook=request["audit_hook"])
            answer = dataclasses.asdict(result)
        elif request["op"] == "capabilities":
            answer = execution.sandbox_capabilities()
        else:
            answer = run_control(request["code"], request["timeout"])
        answer["signals"] = list(received)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
