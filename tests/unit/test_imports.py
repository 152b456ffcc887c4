"""The API stays light: it never imports torch, transformers or the worker."""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("torch", "transformers", "worker")


def test_importing_api_imports_neither_torch_nor_worker() -> None:
    code = (
        "import sys, api.app, api.routes.jobs, api.routes.health, api.deps, api.errors;"
        "api.app.create_app;"
        f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_api_modules_import_with_no_genq_variable_set() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    code = (
        "import pkgutil, importlib, api;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(api.__path__, 'api.')]"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
