"""
The report card: every stage logs its metrics and timings here, and `generate` assembles report.md.

    python -m nanochat.report reset      # start a new report: header (git, hardware, versions, code size)
    python -m nanochat.report generate   # assemble <base>/report/report.md (and copy it to ./report.md)

Stages call `get_report().log(section="Chat SFT", data=[{...}, ...])` (one markdown file per section,
rewritten atomically, so re-running a stage replaces its section) and
`get_report().log_series("train loss", steps, values)` for curves, which `generate` draws as PNG line plots
with matplotlib (labelled axes with units: loss against step, val bpb against tokens). Only rank 0 writes.

The summary table has rows CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE
(plus any other task a chat evaluation logged) and columns BASE, MID, SFT, RL, filled from the logged
metrics of each stage's sections ("-" where nothing was logged).
"""

import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import time

from nanochat.common import (ArgumentParser, atomic_write_bytes, atomic_write_json, atomic_write_text, get_base_dir,
                             get_rank, run_main)

SECTION_ORDER = [
    "Tokenizer training", "Tokenizer evaluation", "Tokenizer extension", "Base model training", "Base model loss",
    "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft", "Chat RL",
    "Chat evaluation rl",
]
SUMMARY_ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
EXTRA_ROWS = ["Arithmetic", "SimpleSpelling", "val bpb", "unigram baseline val bpb"]  # shown when logged
COLUMNS = ["BASE", "MID", "SFT", "RL"]


def slugify(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "section"


def stage_column(section):
    """Which summary column a section's metrics belong to, by its name."""
    words = set(re.findall(r"[a-z]+", section.lower()))
    if "rl" in words:
        return "RL"
    if "sft" in words:
        return "SFT"
    if "mid" in words or "midtraining" in words:
        return "MID"
    if "base" in words:
        return "BASE"
    return None


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


# -----------------------------------------------------------------------------
# The header: where and with what the run happened

def _run(cmd, cwd=None):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_info():
    root = repo_root()
    commit = _run(["git", "rev-parse", "--short", "HEAD"], cwd=root) or "unknown"
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=root) or "unknown"
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root))
    return {"commit": commit, "branch": branch, "dirty": dirty}


def hardware_info():
    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "gpus": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * page_size / 1024 ** 3, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None
    try:
        import torch
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                info["gpus"].append(f"{props.name} ({props.total_memory / 1024 ** 3:.0f} GiB)")
    except ImportError:
        pass
    return info


def dependency_versions():
    from importlib import metadata
    versions = {"python": platform.python_version()}
    for name in ("torch", "tiktoken", "tokenizers", "datasets", "pyarrow", "numpy", "safetensors", "fastapi",
                 "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def code_size(root=None):
    """Lines and characters of the repository's own .py/.rs/.sh files (tracked by git when possible)."""
    root = root or repo_root()
    listed = _run(["git", "ls-files", "*.py", "*.rs", "*.sh"], cwd=root).splitlines()
    if not listed:
        listed = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("target", "node_modules")]
            listed += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                       if f.endswith((".py", ".rs", ".sh"))]
    files = lines = chars = 0
    for rel in listed:
        try:
            with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        files += 1
        lines += text.count("\n")
        chars += len(text)
    return {"files": files, "lines": lines, "characters": chars}


def header_markdown(started):
    git, hw, deps, size = git_info(), hardware_info(), dependency_versions(), code_size()
    lines = ["# nanochat report card", "",
             f"Generated for the run started {datetime.datetime.fromtimestamp(started).strftime('%Y-%m-%d %H:%M:%S')}"
             f" on {socket.gethostname()}.", "",
             "## Environment", "",
             f"- git: commit {git['commit']} on {git['branch']}{' (uncommitted changes)' if git['dirty'] else ''}",
             f"- CPU: {hw['cpu']} ({hw['cpu_count']} cores), memory {hw['memory_gb']} GiB",
             f"- GPUs: {', '.join(hw['gpus']) if hw['gpus'] else 'none'}",
             f"- platform: {platform.platform()}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in deps.items()),
             f"- code: {size['files']} files, {size['lines']:,} lines, {size['characters']:,} characters (.py/.rs/.sh)",
             ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Plots: matplotlib on its non-interactive Agg canvas (no display, no global backend switch)

LOSS_LABEL = "loss (nats per token)"


def plot_figure(title, series, x_label="step", y_label=LOSS_LABEL):
    """series: list of (label, xs, ys) -> a matplotlib Figure with one line per series."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter
    fig = Figure(figsize=(8, 5), dpi=100, layout="tight")
    ax = fig.add_subplot()
    for label, xs, ys in series:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if series and max((max(xs, default=0) for _, xs, _ in series), default=0) >= 10_000:
        ax.xaxis.set_major_formatter(EngFormatter())  # 2.5M tokens, not 2500000 or an offset
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return fig


def plot_png(title, series, x_label="step", y_label=LOSS_LABEL):
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = plot_figure(title, series, x_label, y_label)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# The report

class Report:

    def __init__(self, report_dir):
        self.report_dir = report_dir
        os.makedirs(os.path.join(report_dir, "series"), exist_ok=True)

    def _state_path(self):
        return os.path.join(self.report_dir, "state.json")

    def _state(self):
        try:
            with open(self._state_path()) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}

    def reset(self):
        """Start a new report: remove old sections/series, write the header, remember the start time."""
        for name in os.listdir(self.report_dir):
            path = os.path.join(self.report_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        os.makedirs(os.path.join(self.report_dir, "series"), exist_ok=True)
        started = time.time()
        atomic_write_json(self._state_path(), {"started": started})
        atomic_write_text(os.path.join(self.report_dir, "header.md"), header_markdown(started))

    def log(self, section, data):
        """Write (or replace) one section: data is a list of dicts (metrics) and strings (free text)."""
        if isinstance(data, dict):
            data = [data]
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}", ""]
        metrics = {}
        for item in data:
            if isinstance(item, dict):
                for key, value in item.items():
                    lines.append(f"- {key}: {format_value(value)}")
                    if isinstance(value, (int, float, str, bool)) or value is None:
                        metrics[key] = value
            elif item:
                lines.append(str(item))
        lines.append("")
        slug = slugify(section)
        atomic_write_text(os.path.join(self.report_dir, f"{slug}.md"), "\n".join(lines))
        atomic_write_json(os.path.join(self.report_dir, f"{slug}.json"),
                          {"section": section, "metrics": metrics, "time": time.time()})

    def log_series(self, name, steps, values, section=None, x_label="step", y_label=LOSS_LABEL):
        """Record a curve (e.g. training loss by step); `name`s sharing a plot group by prefix before ':'.
        The axis labels (with units) are the plot's; a group takes its first series' labels."""
        steps, values = [float(s) for s in steps], [float(v) for v in values]
        if len(steps) != len(values):
            raise ValueError(f"series {name}: {len(steps)} steps but {len(values)} values")
        atomic_write_json(os.path.join(self.report_dir, "series", f"{slugify(name)}.json"),
                          {"name": name, "section": section, "steps": steps, "values": values,
                           "x_label": x_label, "y_label": y_label})

    def _sections(self):
        sections = []
        for fname in os.listdir(self.report_dir):
            if fname.endswith(".json") and fname != "state.json":
                with open(os.path.join(self.report_dir, fname)) as f:
                    meta = json.load(f)
                sections.append(meta)
        rank = {name: i for i, name in enumerate(SECTION_ORDER)}
        sections.sort(key=lambda m: (rank.get(m["section"], len(SECTION_ORDER)), m["time"]))
        return sections

    def summary_table(self, sections):
        values = {}
        rows = list(SUMMARY_ROWS)
        for meta in sections:
            column = stage_column(meta["section"])
            if column is None:
                continue
            for key, value in meta["metrics"].items():
                row = next((r for r in SUMMARY_ROWS + EXTRA_ROWS if r.lower() == key.lower()
                            or (r == "CORE" and key.lower() in ("core metric", "core_metric"))), None)
                if row is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                values[(row, column)] = value
                if row not in rows:
                    rows.append(row)
        lines = ["| Metric | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for row in rows:
            cells = [f"{values[(row, c)]:.4f}" if (row, c) in values else "-" for c in COLUMNS]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _plots(self):
        """Render every logged series, grouped by the name before ':' (e.g. 'base: train', 'base: val')."""
        series_dir = os.path.join(self.report_dir, "series")
        groups, labels = {}, {}
        for fname in sorted(os.listdir(series_dir)):
            with open(os.path.join(series_dir, fname)) as f:
                s = json.load(f)
            group, _, label = s["name"].partition(":")
            group = group.strip()
            groups.setdefault(group, []).append((label.strip() or group, s["steps"], s["values"]))
            labels.setdefault(group, (s.get("x_label", "step"), s.get("y_label", LOSS_LABEL)))
        links = []
        for group, series in groups.items():
            fname = f"{slugify(group)}.png"
            atomic_write_bytes(os.path.join(self.report_dir, fname), plot_png(group, series, *labels[group]))
            links.append((group, fname))
        return links

    def generate(self, copy_to_cwd=True):
        """Assemble report.md from the header, the summary, the plots and the sections; return its path."""
        state = self._state()
        header_path = os.path.join(self.report_dir, "header.md")
        header = open(header_path).read() if os.path.exists(header_path) else \
            "# nanochat report card\n\n(no header: run `python -m nanochat.report reset` before the first stage)\n"
        sections = self._sections()
        parts = [header, "## Summary", "", self.summary_table(sections), ""]
        if "started" in state:
            elapsed = time.time() - state["started"]
            hours, rem = divmod(int(elapsed), 3600)
            parts += [f"Total wall clock time: {hours}h{rem // 60:02d}m{rem % 60:02d}s", ""]
        links = self._plots()
        if links:
            parts += ["## Plots", ""] + [f"![{group}]({fname})" for group, fname in links] + [""]
        for meta in sections:
            with open(os.path.join(self.report_dir, f"{slugify(meta['section'])}.md")) as f:
                parts.append(f.read())
        text = "\n".join(parts)
        out = os.path.join(self.report_dir, "report.md")
        atomic_write_text(out, text)
        if copy_to_cwd:
            # the plots go beside the copy too, so its image links work
            atomic_write_text(os.path.join(os.getcwd(), "report.md"), text)
            for _, fname in links:
                if os.path.abspath(os.getcwd()) != os.path.abspath(self.report_dir):
                    shutil.copyfile(os.path.join(self.report_dir, fname), os.path.join(os.getcwd(), fname))
        return out


class DummyReport:
    """What ranks other than 0 get: every call does nothing."""

    def log(self, *args, **kwargs):
        pass

    def log_series(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        return None


def get_report():
    if get_rank() != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


def main(argv=None):
    parser = ArgumentParser(description="Reset or generate the nanochat report card")
    parser.add_argument("command", choices=["reset", "generate"])
    args = parser.parse_args(argv)
    report = get_report()
    if args.command == "reset":
        report.reset()
        print(f"report reset: {os.path.join(get_base_dir(), 'report')}")
    else:
        path = report.generate()
        print(f"report written: {path} (copied to ./report.md)")
    return 0


if __name__ == "__main__":
    run_main(main)
