"""Print the resolved versions of the stack gist-scale runs on (CI prints them first, so a failure can be tied to a
release), or, with --freeze, the constraints file of the current environment (see docs/development.md, "Reproducible installs").

    python .ci/versions.py            # one line per package of the stack
    python .ci/versions.py --freeze   # constraints.txt contents: every installed distribution pinned, torch and
                                      # gist-scale left out (torch is pinned on the install command: CPU or CUDA build)
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import sys

STACK = ["torch", "accelerate", "deepspeed", "transformers", "datasets", "peft", "safetensors", "tokenizers",
         "huggingface-hub", "sentence-transformers", "mteb", "faiss-cpu", "numpy", "pyarrow", "pytest"]
UNPINNED = {"torch", "gist-scale", "pip", "setuptools", "wheel"}


def _installed() -> dict[str, str]:
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower().replace("_", "-")] = dist.version
    return found


def main() -> None:
    installed = _installed()
    if sys.argv[1:] == ["--freeze"]:
        print("# The exact versions the full suite last passed with (python -m pytest -q -n 2 --dist worksteal, "
              f"0 failed), on Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
              f"{datetime.date.today().isoformat()}.")
        print("# Used by .ci/run and README's development install: pip install -c constraints.txt ...")
        print("# Refresh: bash .ci/newest --lock (newest releases, full suite, rewritten only when it passes).")
        print("# torch is pinned on the install command instead (torch==2.13.0, the CPU build on CPU machines).")
        for name in sorted(installed):
            if name not in UNPINNED:
                print(f"{name}=={installed[name]}")
        return
    print(f"python {platform.python_version()} on {platform.system()} {platform.machine()}")
    for name in STACK:
        print(f"{name:<22} {installed.get(name, 'not installed')}")


if __name__ == "__main__":
    main()
