"""House rules read from the source: ktchat owns its generation loop, so no code in src/ replaces a module's
`forward` or `generate` on an instance (no `x.forward = ...`, no `setattr(x, "generate", ...)`)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "ktchat"
REPLACED = {"forward", "generate"}


def assignments(tree: ast.AST):
    """(line, attribute) of every assignment to an attribute named in REPLACED, by statement or by setattr."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and t.attr in REPLACED:
                        yield node.lineno, t.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in REPLACED):
            yield node.lineno, node.args[1].value


def test_no_forward_or_generate_replaced_on_an_object():
    found = [f"{path.relative_to(SRC)}:{line} assigns .{attr}" for path in sorted(SRC.rglob("*.py"))
             for line, attr in assignments(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, "\n".join(found)


def test_the_check_finds_each_form():
    source = "m.forward = f\nm.inner.generate = g\na, m.generate = 1, 2\nsetattr(m, 'forward', f)\nm.generate2 = 1\n"
    assert [attr for _, attr in assignments(ast.parse(source))] == ["forward", "generate", "generate", "forward"]
