"""No pickle anywhere: a scan of canopy's own sources for ways to run code hidden in data.

Every byte canopy reads (sockets, Redis, checkpoint files) comes from a machine it does
not trust, and pickle-based formats execute code on load. The scan walks the syntax tree
of every module, so strings and comments that merely mention pickle do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["cluster", "learner", "actors", "cache", "replay", "deploy", "scripts", "tests"]

# Modules whose whole purpose is deserialising objects (and so running their code).
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
# Attribute calls that unpickle or evaluate: zmq's *_pyobj, pandas, yaml's full loader.
UNSAFE_METHODS = {"recv_pyobj", "send_pyobj", "read_pickle", "to_pickle"}
UNSAFE_BUILTINS = {"eval", "exec"}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return ""


def findings(source: str, filename: str = "<src>") -> list[str]:
    """Each unsafe construct in `source` as 'file:line: what'."""
    out: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [
                f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            out.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rpartition(".")[2]
            if name in UNSAFE_BUILTINS:
                out.append(f"{where}: calls {name}()")
            elif last in UNSAFE_METHODS:
                out.append(f"{where}: calls {last}() (pickle underneath)")
            elif name.endswith("torch.load"):
                if not _is_true(_keyword(node, "weights_only")):
                    out.append(f"{where}: torch.load without weights_only=True")
            elif name in {"np.load", "numpy.load"} and _is_true(_keyword(node, "allow_pickle")):
                out.append(f"{where}: np.load(allow_pickle=True)")
            elif name == "yaml.load" and _keyword(node, "Loader") is None:
                out.append(f"{where}: yaml.load without a safe Loader (use yaml.safe_load)")
            elif name in {"yaml.unsafe_load", "yaml.full_load"}:
                out.append(f"{where}: {name}")
    return out


def _sources() -> list[Path]:
    files: list[Path] = []
    for top in SCANNED:
        files += sorted((REPO_ROOT / top).rglob("*.py"))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def test_scanner_catches_every_unsafe_form() -> None:
    bad = "\n".join(
        [
            "import pickle",
            "from cloudpickle import loads",
            "import torch, numpy as np, yaml",
            "torch.load('f')",
            "torch.load('f', weights_only=False)",
            "np.load('f', allow_pickle=True)",
            "sock.recv_pyobj()",
            "yaml.load(text)",
            "eval(data)",
        ]
    )
    assert len(findings(bad)) == 8  # every line but the plain imports of torch/numpy/yaml


def test_scanner_accepts_the_safe_forms() -> None:
    good = "\n".join(
        [
            "import torch, numpy as np, yaml, msgpack",
            "torch.load('f', weights_only=True)",
            "np.load('f', allow_pickle=False)",
            "np.load('f')",
            "yaml.safe_load(text)",
            "msgpack.unpackb(b, raw=False)",
            "s = 'pickle is mentioned only in this string'",
        ]
    )
    assert findings(good) == []


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_unsafe_deserialisation(path: Path) -> None:
    found = findings(path.read_text(), str(path.relative_to(REPO_ROOT)))
    assert not found, "unsafe deserialisation (use msgpack, raw arrays or weights_only=True):\n" + "\n".join(
        found
    )
