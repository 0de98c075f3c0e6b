"""
Cost of one sandboxed program run: execute_code calls per second over HumanEval's 164 canonical
solutions (each program = prompt + solution + its tests + check(...), as tasks/humaneval.py runs them).

Each round runs all 164 programs one after another and checks that every one passes (a sandbox that
is fast because it breaks programs would not count). We print calls/s by wall clock, and the CPU
time the children and this process used per call (os.times), which other jobs on a shared machine
move much less than the wall clock.

    python dev/bench_execution.py                # 3 rounds
    python dev/bench_execution.py --rounds 1 --limit 40
    python dev/bench_execution.py --check-broken # and every broken solution must fail
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import run_main
from nanochat import execution
from tasks.humaneval import HumanEval


def programs(limit, broken=False):
    """(task_id, program) for each problem: its canonical solution, or (broken) a body that returns None."""
    task = HumanEval()
    out = []
    for i in range(min(limit, task.num_examples()) if limit else task.num_examples()):
        c = task.get_example(i)
        body = "    return None\n" if broken else c["messages"][1]["content"]
        out.append((c["task_id"], c["prompt"] + body + "\n\n" + c["test"] + "\n" + f"check({c['entry_point']})\n"))
    return out


def run_round(progs, timeout):
    t0, c0 = time.perf_counter(), os.times()
    failed = [task_id for task_id, code in progs if not execution.execute_code(code, timeout=timeout).success]
    t1, c1 = time.perf_counter(), os.times()
    cpu = (c1.children_user + c1.children_system + c1.user + c1.system
           - c0.children_user - c0.children_system - c0.user - c0.system)
    return t1 - t0, cpu, failed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the programs")
    parser.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all 164)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-program wall-clock limit, as HumanEval uses")
    parser.add_argument("--check-broken", action="store_true",
                        help="then also run every problem with a broken solution: all must fail")
    args = parser.parse_args()

    progs = programs(args.limit)
    caps = execution.sandbox_capabilities() if hasattr(execution, "sandbox_capabilities") else {}
    print(f"{len(progs)} programs x {args.rounds} rounds | python {platform.python_version()} | "
          f"{os.cpu_count()} cpus | load {os.getloadavg()[0]:.1f} | uid {os.geteuid()}")
    print(f"sandbox: {caps}")
    rates, cpus = [], []
    for r in range(args.rounds):
        wall, cpu, failed = run_round(progs, args.timeout)
        rates.append(len(progs) / wall)
        cpus.append(1000 * cpu / len(progs))
        print(f"round {r + 1}: {wall:6.2f} s  {rates[-1]:6.1f} calls/s  {cpus[-1]:6.1f} ms CPU/call  "
              f"failed: {failed or 'none'}  load {os.getloadavg()[0]:.1f}")
        if failed:
            raise SystemExit(f"{len(failed)} canonical solutions failed in the sandbox: {failed}")
    print(f"best {max(rates):.1f} calls/s, median {statistics.median(rates):.1f} calls/s; "
          f"CPU per call best {min(cpus):.1f} ms, median {statistics.median(cpus):.1f} ms")
    if args.check_broken:
        broken = programs(args.limit, broken=True)
        passed = [task_id for task_id, code in broken if execution.execute_code(code, timeout=args.timeout).success]
        if passed:
            raise SystemExit(f"{len(passed)} broken solutions passed in the sandbox: {passed}")
        print(f"all {len(broken)} broken solutions failed, as they must")


if __name__ == "__main__":
    run_main(main)
