"""The structure docs/architecture.md describes, checked: no switch on method names outside each method's own
package, no file over 400 lines, and the dependency rule (nothing imports upwards)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mim_lightning"
METHODS = ("mae", "simmim", "mixmae", "itpn", "itpn_clip")
#: Layers, bottom up: a module may import its own layer and the layers below, never above. Entries are module
#: paths under ``mim_lightning`` (the longest match counts).
LAYERS = [
    ("errors", "geometry", "runlog", "losses", "masking", "mask_stats", "instantiate", "checkpoints.official",
     "checkpoints.resize", "checkpoints.timm_keys"),
    ("models",),
    ("data", "checkpoints", "methods", "optim"),
    ("modules", "callbacks", "loggers", "parallel", "visualize"),
    ("config", "resume", "api", "runchecks", "runlock"),
    ("cli", "train", "finetune", "export", "sweep_report", "__init__", "__main__"),
]


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def own_method(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[1] if len(parts) > 2 and parts[0] == "methods" else None


def code_tokens(path: Path):
    """NAME tokens and string literals that are not docstrings (comments are not tokens)."""
    source = path.read_text()
    docstrings = {(node.body[0].value.lineno, node.body[0].value.col_offset)
                  for node in ast.walk(ast.parse(source))
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME or (token.type == tokenize.STRING and token.start not in docstrings):
            yield token


def test_no_code_outside_a_method_names_a_method():
    """A method name as an identifier or a string literal (``if method == "mae"``, ``{"mae": ...}``) outside the
    method's own package is a switch on method names; comments, docstrings and prose in messages are fine."""
    found = []
    for path in package_files():
        for token in code_tokens(path):
            text = token.string.strip("\"'rbf") if token.type == tokenize.STRING else token.string
            if text.lower() in METHODS and own_method(path) != text.lower():
                found.append(f"{path.relative_to(PACKAGE)}:{token.start[0]}: {token.line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "mim_lightning":
        return None
    path = ".".join(parts[1:]) or "__init__"
    best, layer = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (path == name or path.startswith(name + ".")) and len(name) > best:
                best, layer = len(name), index
    return layer


def test_nothing_imports_upwards_and_models_know_no_lightning():
    found = []
    for path in package_files():
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.parts[-1] == "__init__" and len(rel.parts) > 1 else rel.parts
        own = layer_of("mim_lightning." + ".".join(parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "mim_lightning":
                names = [f"mim_lightning.{a.name}" for a in node.names]  # from mim_lightning import runlog
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                names = []
            for name in names:
                target = layer_of(name)
                if own is not None and target is not None and target > own:
                    found.append(f"{rel}: imports {name}")
                if rel.parts[0] in ("models", "methods") and name.split(".")[0] == "lightning":
                    found.append(f"{rel}: a model imports {name}")
    assert not found, "\n".join(found)
