"""List the modules over 600 lines and the functions over 80 lines (the style limits).

Usage: python tools/sizes.py [FOLDER ...]   (default: node gossip models)

Why a script and not a test: the limits are the project's standard for new code, and a few
older modules still exceed them (docs/architecture.md, "Sizes", says which and why); this
prints the current list so a change can see whether it made it longer. Exit status 1 when
anything is over, 0 otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def over_limits(folders: list[str]) -> list[str]:
    """One line per module or function over its limit, longest first within each kind."""
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.py")):
            text = path.read_text()
            lines = len(text.splitlines())
            if lines > MAX_MODULE_LINES:
                modules.append((lines, f"module   {path}: {lines} lines"))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    length = (node.end_lineno or node.lineno) - start + 1
                    if length > MAX_FUNCTION_LINES:
                        where = f"{path}:{node.lineno} {node.name}"
                        functions.append((length, f"function {where}: {length} lines"))
    return [line for _, line in sorted(modules, reverse=True)] + [
        line for _, line in sorted(functions, reverse=True)
    ]


def main(argv: list[str]) -> int:
    folders = argv or ["node", "gossip", "models"]
    found = over_limits(folders)
    for line in found:
        print(line)
    print(
        f"{len(found)} over the limits ({MAX_MODULE_LINES} lines a module, "
        f"{MAX_FUNCTION_LINES} a function) in {', '.join(folders)}"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
