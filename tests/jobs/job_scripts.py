"""Load a script of jobs/ as a module, so tests can call its functions in this process."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def load_job_script(name: str) -> ModuleType:
    """jobs/<name>.py (e.g. "search", "bench/bench_motion") as the module `<stem>_script`, registered in
    sys.modules (dataclasses look it up there). Its folder comes first on sys.path while it loads, as when Python
    runs it, so it finds the scripts next to it."""
    path = JOBS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
