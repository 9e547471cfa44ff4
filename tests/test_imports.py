"""The module import graph has no cycle, the core does not import the experiments layer, and bitsandbytes loads
only for a quantised run (issue 38, items 14 and 15)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

import morelora

SRC = Path(morelora.__file__).parent


def _module_graph() -> dict[str, set[str]]:
    """``{module: morelora modules it imports}``, function-level imports included (a lazy import closes a circle
    as well: whichever side loads first, the other half-initialised). Importing ``a.b.c`` imports ``a.b``; a
    module's own packages are left out (Python initialises them first, as a package's ``__init__`` expects)."""
    files = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative: from the package, one level up per dot after the first
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names |= {base} | {f"{base}.{a.name}" for a in node.names}
        deps = set()
        for name in names:
            if not name.startswith("morelora"):
                continue
            target = known(name)
            parts = target.split(".")
            deps |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {d for d in deps if d in files} - ancestors - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    graph = _module_graph()
    # the graph is read right: the edges of the two circles issue 38 found, where they were
    assert "morelora.data.tasks" in graph["morelora.data"] and "morelora.metrics" in graph["morelora.training.evaluate"]
    assert "morelora.experiments.statistics" in graph["morelora.analysis"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]   # the check finds one
    assert _cycles(graph) == []
    assert not {d for d in graph["morelora.metrics"] if d.startswith("morelora.experiments")}
    assert "morelora.config" not in graph["morelora.data.tasks"]


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC.parent), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)


def test_core_modules_import_alone_without_the_experiments_layer() -> None:
    """Each module of the two former circles, first in a fresh interpreter: it imports, and the core ones load
    nothing of ``morelora.experiments``."""
    modules = ["morelora.metrics", "morelora.config", "morelora.data.tasks", "morelora.training.evaluate",
               "morelora.experiments.statistics", "morelora.experiments.runs"]
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('morelora.experiments'))))")
    for module in modules:
        proc = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=240,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC.parent)})
        assert proc.returncode == 0, (module, proc.stderr[-2000:])
        loaded = json.loads(proc.stdout.splitlines()[-1])
        if not module.startswith("morelora.experiments"):
            assert loaded == [], (module, loaded)


BNB_NOISE = ("Skipping publisher trust check", "gemm_4bit_forward", "kernels-community")


def test_bitsandbytes_loads_only_for_quantisation(tmp_path: Path, tiny_llama: str) -> None:
    """A run without model.quantization trains without loading bitsandbytes (PEFT still sees it installed); PEFT's
    own LoRA, whose layer dispatch asks bitsandbytes for its classes, loads the real module, without its
    import-time lines."""
    from conftest import tiny_run_config

    cfg = tiny_run_config(tiny_llama, tmp_path / "unused", max_steps=1, save_steps=0, logging_steps=1)
    cfg["tasks"], cfg["data"] = ["sst2"], {"max_train_per_task": 4, "max_eval_per_task": 2}
    code = f"""
import sys, yaml
from morelora.config import RunConfig
from morelora.training import train
cfg = yaml.safe_load(open({str(tmp_path / 'c.yaml')!r}))
def run(name):
    cfg["method"] = {{"name": name, "r": 2, "target_modules": ["q_proj", "v_proj"]}}
    cfg["train"]["output_dir"] = {str(tmp_path)!r} + "/" + name
    train(RunConfig.from_dict(cfg))
    print("LOADED", name, sorted(m for m in sys.modules if m.startswith("bitsandbytes."))[:1])
run("more")
import importlib.util
from peft.import_utils import is_bnb_available
print("INSTALLED", is_bnb_available(), importlib.util.find_spec("bitsandbytes") is not None)
run("lora")
import bitsandbytes as bnb
print("REAL", bnb.nn.Linear4bit.__name__)
"""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert "LOADED more []" in out and "INSTALLED True True" in out
    assert "LOADED lora ['bitsandbytes._ops']" in out and "REAL Linear4bit" in out
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in BNB_NOISE)], proc.stderr[-2000:]
