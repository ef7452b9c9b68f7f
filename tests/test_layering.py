"""The layers import only downward: jobs/ -> pipeline.job -> pipeline.store -> tokendyn, with pipeline.readers
beside the job, reading the store and making tokens through pipeline.job.tokenizer only.

Checked on the source (ast, nothing is imported), so imports inside functions, methods and `if TYPE_CHECKING:`
blocks count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "tokendyn")

# (importing package, package it may not import, modules of that package it may import anyway, why)
RULES = [
    ("pipeline.store", "pipeline.job", (), "the store sits below the job"),
    ("pipeline.store", "pipeline.readers", (), "the store sits below its readers"),
    ("tokendyn", "pipeline", (), "tokendyn is pure torch, below the whole pipeline"),
    ("pipeline.readers", "pipeline.job", ("pipeline.job.tokenizer",),
     "readers reach the job only through pipeline.job.tokenizer"),
    ("pipeline.job", "pipeline.readers", (), "the job writes outputs, readers read them: the job never needs them"),
]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The modules (or module.attribute names) an import statement or import_module("...") call names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importing module's package, one level up per extra dot
            package = module if is_package else module.rpartition(".")[0]
            parts = package.split(".")
            anchor = ".".join(parts[:len(parts) - (node.level - 1)])
            base = f"{anchor}.{base}" if base else anchor
        # `from a.b import c`: c is the module a.b.c or a name in a.b; either way a.b.c is what it reaches.
        return [f"{base}.{alias.name}" if alias.name != "*" else f"{base}.*" for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def upward_imports(source: str, module: str, filename: str, is_package: bool = False) -> list[str]:
    """'file:line: import statement (why)' for every import in `source` (the module `module`) that goes against
    RULES."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        reasons: dict[str, list[str]] = {}  # why -> the targets it refuses
        for target in _imported(node, module, is_package):
            for importer, forbidden, allowed, why in RULES:
                if _within(module, importer) and _within(target, forbidden) and not any(
                        _within(target, exception) for exception in allowed):
                    reasons.setdefault(why, []).append(target)
        if reasons:
            text = "; ".join(f"{module} -> {', '.join(targets)}: {why}" for why, targets in reasons.items())
            found.append((node.lineno, f"{filename}:{node.lineno}: {ast.unparse(node)}  ({text})"))
    return [message for _, message in sorted(found)]


def _source_files() -> list[tuple[Path, str, bool]]:
    """(path, module name, whether it is a package's __init__) of every .py file under PACKAGES."""
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            files.append((path, ".".join(parts[:-1] if is_package else parts), is_package))
    return files


def test_no_module_imports_upward():
    files = _source_files()
    assert {module.split(".")[0] for _, module, _ in files} == set(PACKAGES)
    assert any(module.startswith("pipeline.store.") for _, module, _ in files)
    violations = [violation for path, module, is_package in files
                  for violation in upward_imports(path.read_text(), module, str(path.relative_to(ROOT)), is_package)]
    assert not violations, "upward imports:\n" + "\n".join(violations)


# ---- the checker itself -----------------------------------------------------------------------------------------

STORE_IMPORTING_THE_JOB = '''
from pipeline.store.schema import SCHEMA_VERSION
from pipeline.job.config import JobConfig, compress_kwargs


class OutputStore:
    def _create_exclusive(self):
        from pipeline.job.sources import s3_client
'''


def test_the_checker_names_file_line_and_import_of_each_upward_import():
    found = upward_imports(STORE_IMPORTING_THE_JOB, "pipeline.store.storage", "pipeline/store/storage.py")
    assert len(found) == 2
    assert found[0].startswith("pipeline/store/storage.py:3: from pipeline.job.config import JobConfig, "
                               "compress_kwargs")
    assert found[1].startswith("pipeline/store/storage.py:8: from pipeline.job.sources import s3_client")


@pytest.mark.parametrize("module, source", [
    ("pipeline.store.contract", "import pipeline.job.config"),
    ("pipeline.store.contract", "from pipeline import job"),
    ("pipeline.store.contract", "from ..job.config import JobConfig"),
    ("pipeline.store.contract", "from pipeline.readers.cache import CachedTokenDataset"),
    ("pipeline.store.contract", "if TYPE_CHECKING:\n    from pipeline.job.config import JobConfig"),
    ("pipeline.store.contract", "importlib.import_module('pipeline.job.config')"),
    ("tokendyn.kmeans", "from pipeline.store.schema import video_row"),
    ("tokendyn", "import pipeline"),
    ("pipeline.readers.evaluation.run", "def f():\n    from pipeline.job.sources import list_videos"),
    ("pipeline.readers.search.index",
     "class A:\n    def f(self):\n        from pipeline.job.encoders import load_encoder"),
    ("pipeline.readers.cache", "from pipeline.job import config"),
    ("pipeline.readers.cache", "from ..job.decode import DecodeError"),
    ("pipeline.job.run", "from pipeline.readers.search import VideoSearch"),
])
def test_the_checker_refuses(module, source):
    assert len(upward_imports(source, module, "x.py")) == 1


@pytest.mark.parametrize("module, source, is_package", [
    ("pipeline.job.run", "from pipeline.store.storage import OutputStore", False),
    ("pipeline.job.config", "from pipeline.store import contract_fields", False),
    ("pipeline.readers.search.index", "from pipeline.job.tokenizer import VideoTokenizer, load_encoder", False),
    ("pipeline.readers.search.index", "def f():\n    from pipeline.job.tokenizer import load_encoder", False),
    ("pipeline.readers.cache", "from pipeline.job import tokenizer", False),
    ("pipeline.readers.cache", "from ..job.tokenizer import VideoTokenizer", False),
    ("pipeline.readers.cache", "from pipeline.store.contract import read_contract", False),
    ("pipeline.store.schema", "import tokendyn", False),
    ("pipeline.store.contract", "from .schema import SCHEMA_VERSION", False),
    ("pipeline.store", "from . import storage", True),
    ("tokendyn.compress", "from tokendyn.kmeans import spherical_kmeans", False),
])
def test_the_checker_lets_downward_imports_through(module, source, is_package):
    assert upward_imports(source, module, "x.py", is_package) == []
