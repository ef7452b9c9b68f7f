"""Load a script of jobs/ as a module, so tests can call its functions in this process."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def load_job_script(name: str) -> ModuleType:
    """jobs/<name>.py as the module `<name>_script`, registered in sys.modules (dataclasses look it up there).
    Its folder comes first on sys.path while it loads, as when Python runs it, so it finds the scripts next to it."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(JOBS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(JOBS))
    return module
