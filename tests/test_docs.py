"""The README's Layout section describes the package as it is: every module it names exists, and every module of
``c2r/`` is named (a renamed file once left the section pointing at names that were gone)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def expand_braces(name: str) -> list[str]:
    """``a_{b,c}.py`` → ``["a_b.py", "a_c.py"]`` (one brace group at most, as the section writes them)."""
    match = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)
    return [name] if match is None else [match[1] + part + match[3] for part in match[2].split(",")]


def layout_paths(readme: str) -> set[str]:
    """The ``.py`` paths the Layout block names: a line's first column is a path; the names in its description
    (and in the indented lines that continue it) belong to that path when it is a folder."""
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named: set[str] = set()
    folder = ""
    for line in block.splitlines():
        if line and not line[0].isspace():
            first, _, line = line.partition(" ")
            folder = first if first.endswith("/") else ""
            named.add(first)
        named.update(folder + path for name in re.findall(r"[\w{},]+\.py", line) for path in expand_braces(name))
    return {path for path in named if path.endswith(".py")}


def test_expand_braces():
    assert expand_braces("first_letter_{prompts,probe}.py") == ["first_letter_prompts.py", "first_letter_probe.py"]
    assert expand_braces("train.py") == ["train.py"]


def test_readme_layout_names_every_module_and_only_modules_that_exist():
    named = layout_paths((ROOT / "README.md").read_text())
    modules = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "c2r").rglob("*.py")
        if path.name != "__init__.py" or path.parent == ROOT / "c2r"
    }
    assert sorted(path for path in named if not (ROOT / path).exists()) == []
    assert sorted(modules - named) == []
