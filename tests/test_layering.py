"""The package's layering: everything outside the Ray shims imports without Ray, and no module does
work at import time that pulls Ray in."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the Ray shims: the only modules that import ray at module level
SHIMS = {"skipray.serve.app"}

PROBE = r"""
import importlib, pkgutil, sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"ray is unimportable in this test (imported: {name})")
        return None

sys.meta_path.insert(0, NoRay())
import skipray
shims = set(sys.argv[1].split(","))
names = sorted(m.name for m in pkgutil.walk_packages(skipray.__path__, "skipray.")
               if m.name not in shims and not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
print(len(names))
"""


def test_every_module_outside_the_ray_shims_imports_without_ray():
    r = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(SHIMS)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) >= 30  # core, training, batch, serve and the top-level modules


def test_the_probe_can_fail():
    r = subprocess.run([sys.executable, "-c", PROBE, ""], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "ray is unimportable" in r.stderr


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The skipray modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found & modules


def test_no_import_circles():
    """No two skipray modules import each other, directly or through others (function-level imports count):
    each shared piece lives in the module that owns it."""
    paths = {}
    for p in (ROOT / "skipray").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: _imports(p, set(paths)) - {m} for m, p in paths.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_batch_actor_is_the_engine_stage_not_a_generator():
    """The batch actor class is ``SkipDecodeEngineStage``; ``Generator`` is torch's alone: no module, test,
    bench or page names a ``Generator`` of skipray's."""
    import skipray.batch
    import skipray.batch.actor

    assert not hasattr(skipray.batch, "Generator") and not hasattr(skipray.batch.actor, "Generator")
    old = re.compile(r"(?<![\w.])Generator\b")  # torch.Generator is preceded by a dot
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for d in ("skipray", "tests", "bench", "scripts", "jobs", "examples", "docs")
        for p in sorted((ROOT / d).rglob("*"))
        if p.suffix in (".py", ".md") and p.name != Path(__file__).name
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if old.search(line)
    ]
    assert not found, found
