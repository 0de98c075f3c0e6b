"""
The sandbox holds: every escape attempt below is contained, reported as a failure, and leaves the host
(its files, its processes, this test process) as it was.
"""

import os
import time

import pytest

from nanochat import execution, sandbox
from nanochat.execution import SandboxUnavailable, execute_code, sandbox_capabilities


@pytest.fixture
def outside(tmp_path):
    """A directory outside the sandbox with a file the sandboxed code will try to harm."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.chmod(tmp_path, 0o777)  # so a failure can only come from the sandbox, not from permissions
    return tmp_path


def assert_contained(result):
    assert not result.success, result
    assert result.error, result


def assert_untouched(outside):
    assert (outside / "victim.txt").read_text() == "precious"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


# -----------------------------------------------------------------------------
# ordinary programs work

def test_plain_program_runs_and_its_output_is_captured():
    result = execute_code("import math\nprint(math.factorial(5))\nimport sys\nprint('err', file=sys.stderr)")
    assert result.success, result
    assert result.stdout == "120\n"
    assert result.stderr == "err\n"
    assert result.error is None and not result.timeout


def test_exceptions_are_failures_with_the_exception_as_error():
    result = execute_code("assert 1 == 2, 'nope'")
    assert not result.success
    assert "AssertionError: nope" in result.error


def test_writing_inside_the_temporary_directory_is_allowed_and_the_directory_is_removed_afterwards():
    result = execute_code("import os, tempfile\nopen('a.txt', 'w').write('hi')\nos.mkdir('d')\n"
                          "os.rename('a.txt', 'd/b.txt')\ntempfile.TemporaryFile().write(b'x')\n"
                          "print(open('d/b.txt').read())\nprint(os.getcwd())")
    assert result.success, result
    text, cwd = result.stdout.split()
    assert text == "hi"
    assert not os.path.exists(cwd)


# -----------------------------------------------------------------------------
# time, memory, output

def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    start = time.monotonic()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert_contained(result)
    assert result.timeout
    assert time.monotonic() - start < 8


def test_sleeping_forever_is_killed_at_the_wall_clock_limit():
    result = execute_code("import time\ntime.sleep(1000)", timeout=0.5)
    assert_contained(result)
    assert result.timeout


def test_ignoring_sigterm_and_sigalrm_does_not_survive_the_timeout():
    code = ("import signal\n"
            "for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGINT):\n"
            "    try:\n        signal.signal(s, signal.SIG_IGN)\n    except Exception:\n        pass\n"
            "while True:\n    pass\n")
    start = time.monotonic()
    result = execute_code(code, timeout=1.0)
    assert_contained(result)
    assert result.timeout
    assert time.monotonic() - start < 8


def test_memory_bomb_fails_with_memory_exceeded():
    result = execute_code("x = bytearray(2 * 1024 ** 3)", maximum_memory_bytes=256 * 1024 * 1024)
    assert_contained(result)
    assert result.memory_exceeded


def test_growing_list_memory_bomb_is_contained():
    result = execute_code("l = []\nwhile True:\n    l.append(' ' * 10**6)", timeout=10,
                          maximum_memory_bytes=200 * 1024 * 1024)
    assert_contained(result)
    assert result.memory_exceeded or result.timeout


def test_huge_output_is_capped_and_the_program_killed():
    start = time.monotonic()
    result = execute_code("while True:\n    print('x' * 10000)", timeout=20, max_output_bytes=64 * 1024)
    assert_contained(result)
    assert "output limit" in result.error
    assert len(result.stdout) <= 64 * 1024
    assert time.monotonic() - start < 10  # killed at the cap, not at the timeout


# -----------------------------------------------------------------------------
# processes

def test_fork_bomb_is_contained():
    result = execute_code("import os\nwhile True:\n    os.fork()")
    assert_contained(result)


def test_os_system_is_blocked_and_runs_nothing(outside):
    target = outside / "from_shell"
    result = execute_code(f"import os\nos.system('touch {target}')")
    assert_contained(result)
    assert not target.exists()


def test_subprocess_is_blocked_and_runs_nothing(outside):
    target = outside / "from_subprocess"
    result = execute_code(f"import subprocess\nsubprocess.run(['touch', '{target}'])")
    assert_contained(result)
    assert not target.exists()


def test_low_level_process_creation_is_blocked():
    attempts = [
        "import _posixsubprocess",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import pty\npty.fork()",
        "import posix\nposix.fork()",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
        "import os\nos.execv('/bin/true', ['true'])",
    ]
    for code in attempts:
        assert_contained(execute_code(code))


def test_killing_the_host_process_is_blocked():
    result = execute_code(f"import os\nos.kill({os.getpid()}, 9)")
    assert_contained(result)
    result = execute_code("import signal\nsignal.pthread_kill(1, 9)")
    assert_contained(result)
    # and this process is still here to check
    assert os.getpid() > 0


# -----------------------------------------------------------------------------
# files outside the sandbox directory

def test_writing_a_file_outside_is_blocked(outside):
    for code in [f"open({str(outside / 'new.txt')!r}, 'w').write('x')",
                 f"open({str(outside / 'victim.txt')!r}, 'a').write('x')",
                 f"import os\nos.open({str(outside / 'new.txt')!r}, os.O_WRONLY | os.O_CREAT)",
                 f"import pathlib\npathlib.Path({str(outside / 'new.txt')!r}).write_text('x')",
                 f"import shutil\nopen('a', 'w').write('x')\nshutil.copy('a', {str(outside / 'new.txt')!r})",
                 "open('../escaped.txt', 'w').write('x')"]:
        assert_contained(execute_code(code))
    assert_untouched(outside)


def test_deleting_renaming_or_chmodding_a_file_outside_is_blocked(outside):
    victim = str(outside / "victim.txt")
    for code in [f"import os\nos.remove({victim!r})",
                 f"import os\nos.unlink({victim!r})",
                 f"import os\nos.rename({victim!r}, {str(outside / 'moved')!r})",
                 f"import os\nopen('here', 'w').close()\nos.replace('here', {victim!r})",
                 f"import os\nos.chmod({victim!r}, 0)",
                 f"import shutil\nshutil.rmtree({str(outside)!r})",
                 f"import os\nos.truncate({victim!r}, 0)"]:
        assert_contained(execute_code(code))
    assert_untouched(outside)
    assert os.stat(victim).st_mode & 0o777 != 0


def test_directory_and_link_tricks_are_blocked(outside):
    victim = str(outside / "victim.txt")
    for code in [f"import os\nos.chdir({str(outside)!r})\nopen('new.txt', 'w')",
                 f"import os\nfd = os.open({str(outside)!r}, os.O_RDONLY)\n"
                 "os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
                 f"import os\nos.symlink({victim!r}, 'link')\nopen('link', 'w').write('x')",
                 f"import os\nos.link({victim!r}, 'hard')\nopen('hard', 'w').write('x')"]:
        assert_contained(execute_code(code))
    assert_untouched(outside)


def test_a_path_object_that_changes_its_answer_cannot_write_outside(outside):
    code = ("import os\nclass Sly:\n    calls = 0\n    def __fspath__(self):\n        Sly.calls += 1\n"
            f"        return 'inside.txt' if Sly.calls == 1 else {str(outside / 'new.txt')!r}\n"
            "for opener in (lambda p: open(p, 'w'), lambda p: os.open(p, os.O_WRONLY | os.O_CREAT)):\n"
            "    Sly.calls = 0\n    opener(Sly())\n"
            "print(os.listdir('.'))")
    result = execute_code(code)
    assert_untouched(outside)
    # either refused, or the path that was checked is the path that was written
    assert not result.success or result.stdout == "['inside.txt']\n", result


def test_reading_files_outside_the_python_installation_is_blocked(outside):
    result = execute_code(f"print(open({str(outside / 'victim.txt')!r}).read())")
    assert_contained(result)
    assert "precious" not in result.stdout
    assert_contained(execute_code("print(open('/etc/passwd').read())"))


# -----------------------------------------------------------------------------
# network

def test_sockets_cannot_be_opened():
    for code in ["import socket\nsocket.socket().connect(('127.0.0.1', 80))",
                 "import _socket\n_socket.socket()",
                 "import importlib\nimportlib.import_module('socket').create_connection(('1.1.1.1', 53))",
                 "import urllib.request\nurllib.request.urlopen('http://example.com')"]:
        assert_contained(execute_code(code))


# -----------------------------------------------------------------------------
# import tricks and tampering

def test_import_tricks_cannot_reach_blocked_modules(outside):
    target = str(outside / "pwned")
    for code in [f"__import__('os').system('touch {target}')",
                 f"import importlib\nimportlib.import_module('subprocess').call(['touch', '{target}'])",
                 "import importlib.util as u\nm = u.module_from_spec(u.find_spec('_posixsubprocess'))",
                 "import ctypes\nctypes.CDLL(None).fork()",
                 f"import builtins\nbuiltins.__import__('subprocess').Popen(['touch', '{target}'])"]:
        assert_contained(execute_code(code))
    assert_untouched(outside)


def test_reaching_os_through_object_subclasses_is_contained(outside):
    target = str(outside / "pwned")
    code = ("for c in ().__class__.__base__.__subclasses__():\n"
            "    if c.__name__ == '_wrap_close':\n"
            "        g = c.__init__.__globals__\n"
            "        break\n"
            f"g['system']('touch {target}')\n")
    assert_contained(execute_code(code))
    code = ("for c in ().__class__.__base__.__subclasses__():\n"
            "    if c.__name__ == '_wrap_close':\n"
            "        os = c.__init__.__globals__['sys'].modules['os']\n"
            f"os.remove({str(outside / 'victim.txt')!r})\n")
    assert_contained(execute_code(code))
    assert_untouched(outside)


def test_tampering_with_builtins_does_not_loosen_the_sandbox(outside):
    code = ("import builtins, io\n"
            "builtins.open = None\nbuiltins.isinstance = lambda *a: True\nbuiltins.str = bytes\n"
            "builtins.__import__ = lambda *a, **k: None\n"
            f"io.open({str(outside / 'new.txt')!r}, 'w').write('x')\n")
    assert_contained(execute_code(code))
    assert_untouched(outside)


def test_the_audit_hook_cannot_be_found_or_rebound(outside):
    for code in ["import gc\nhooks = [o for o in gc.get_objects() if getattr(o, '__name__', '') == 'hook']",
                 "def f(): pass\nf.__code__ = (lambda: None).__code__",
                 "import sys\nsys.addaudithook(lambda *a: None)\n"
                 f"open({str(outside / 'new.txt')!r}, 'w')"]:
        assert_contained(execute_code(code))
    assert_untouched(outside)


def test_catching_the_violation_does_not_hide_it(outside):
    code = (f"try:\n    open({str(outside / 'new.txt')!r}, 'w')\nexcept BaseException:\n    pass\n"
            "print('carried on')")
    result = execute_code(code)
    assert_contained(result)
    assert result.violation
    assert "carried on" not in result.stdout
    assert_untouched(outside)


def test_host_keeps_working_after_the_adversarial_runs():
    result = execute_code("print(sum(range(10)))")
    assert result.success and result.stdout == "45\n"


# -----------------------------------------------------------------------------
# the kernel layers: reported, required, and what happens without them

def test_this_host_confines_with_seccomp_landlock_and_namespaces():
    caps = sandbox_capabilities()
    assert caps["confined"] and caps["seccomp_bpf"] and caps["no_new_privs"], caps
    assert caps["landlock_abi"] >= 1 and caps["namespaces"], caps
    assert caps["problems"] == [] and not caps["unsafe_execution_allowed"]


def test_the_child_can_read_the_installation_but_not_this_checkout_or_the_checkpoints(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_text("weights")
    os.chmod(tmp_path, 0o755)
    code = ("import json, decimal, os\nfor p in ({!r}, {!r}):\n    try:\n        print(open(p).read()[:20])\n"
            "    except OSError as e:\n        print('refused', e.errno)\n").format(execution.__file__, str(checkpoint))
    result = execution._execute(code, audit_hook=False)  # the kernel alone
    assert result.success, result
    assert result.stdout == "refused 13\nrefused 13\n"


def test_untrusted_code_is_refused_when_the_kernel_cannot_confine_it(monkeypatch, outside, capsys):
    unconfined = ({"namespaces": False, "landlock": False, "seccomp": False},
                  {"namespaces": False, "landlock_abi": 0, "seccomp": False, "no_new_privs": True},
                  ("no Landlock in this kernel",))
    monkeypatch.setattr(sandbox, "probe", lambda: unconfined)
    monkeypatch.setattr(sandbox, "_unsafe", {"allowed": False})
    code = f"open({str(outside / 'ran.txt')!r}, 'w').write('x')"
    with pytest.raises(SandboxUnavailable, match="--unsafe-execution"):
        execute_code(code)
    with pytest.raises(SandboxUnavailable, match="no Landlock"):
        sandbox.require_sandbox()
    assert "sandbox: NOT CONFINED" in capsys.readouterr().out
    assert_untouched(outside)
    # the explicit opt-in runs it (here with the audit hook only), loudly
    sandbox.require_sandbox(unsafe_execution=True)
    captured = capsys.readouterr()
    assert "WARNING: --unsafe-execution" in captured.err and "(--unsafe-execution)" in captured.out
    assert sandbox_capabilities()["unsafe_execution_allowed"]
    assert execute_code("print(6 * 7)").stdout == "42\n"


def test_a_child_that_cannot_set_up_its_confinement_raises_and_runs_nothing(monkeypatch, outside):
    monkeypatch.setattr(sandbox, "compile_seccomp", lambda pid, read_only_mounts: b"\x06\x00\x00\x00\x00\x00")
    with pytest.raises(SandboxUnavailable, match="sandbox setup failed: seccomp"):
        execute_code(f"open({str(outside / 'ran.txt')!r}, 'w').write('x')")
    monkeypatch.setattr(sandbox, "compile_seccomp", lambda pid, read_only_mounts: b"\x00" * 8)  # no return: invalid
    with pytest.raises(SandboxUnavailable, match="PR_SET_SECCOMP"):
        execute_code(f"open({str(outside / 'ran.txt')!r}, 'w').write('x')")
    assert_untouched(outside)


def test_the_installation_roots_exclude_paths_added_by_pth_files():
    from nanochat import sandbox_child
    roots = sandbox_child.read_roots()
    assert os.path.realpath(os.path.dirname(os.__file__)) in roots
    package = os.path.dirname(os.path.realpath(execution.__file__))  # the editable checkout's nanochat/
    assert not any(package == r or package.startswith(r + "/") for r in roots), roots


def test_an_old_landlock_is_enough_only_with_read_only_mounts(monkeypatch):
    # before ABI 3 Landlock does not check truncation: only the namespaces' read-only mounts stop it
    monkeypatch.setattr(sandbox, "_unsafe", {"allowed": False})
    for namespaces, confined in ((False, False), (True, True)):
        active = {"namespaces": namespaces, "landlock_abi": 2, "seccomp": True, "no_new_privs": True}
        layers = {"namespaces": namespaces, "landlock": True, "seccomp": True}
        monkeypatch.setattr(sandbox, "probe", lambda: (layers, active, ()))
        assert sandbox_capabilities()["confined"] is confined
        if confined:
            assert execute_code("print(1)").stdout == "1\n"
        else:
            with pytest.raises(SandboxUnavailable, match=r"Landlock ABI 2 \(< 3\) without namespaces"):
                execute_code("print(1)")
