"""Every public function, class and method of the package has a docstring; every comment and docstring
that names a documentation file names one that exists in the repository."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mirl"


def _public(tree):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_"):
                    yield f"{node.name}.{sub.name}", sub


def test_every_public_function_and_class_has_a_docstring():
    missing = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, node in _public(ast.parse(path.read_text()))
        if not ast.get_docstring(node)
    ]
    assert not missing, "\n".join(missing)


def test_documentation_files_named_in_the_code_exist():
    named = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        named |= set(re.findall(r"\b(docs/[\w./-]+\.md)\b", path.read_text()))
    assert named, "the code names no documentation page"
    assert all((ROOT / n).exists() for n in named), sorted(n for n in named if not (ROOT / n).exists())
