"""README's Layout matches the tree: every module of both packages is listed there under its folder, and every
module listed exists (read from the text, nothing imported).

    python tests/test_layout.py        # what the Layout lists, a path per line
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llama_surgery_jax", "pallas_kernels")


def layout_block() -> str:
    """The code block of README's `## Layout` section."""
    section = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def listed_modules() -> set[str]:
    """The .py paths the Layout names at the start of its lines: a line's names come before its description
    (three spaces or more); a folder line (`name/`) opens a folder for the lines indented under it; a line indented
    deeper than a folder's files goes on the description above it."""
    paths, root, folder = set(), "", ""
    for line in layout_block().splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent > 4:
            continue
        names = re.split(r"\s{3,}", line.strip())[0]
        if indent == 0 and names.endswith("/"):
            root = folder = names
            continue
        if names.endswith("/"):
            folder = root + names
            continue
        base = "" if indent == 0 else root if indent <= 2 else folder
        paths.update(base + name for name in re.findall(r"[\w/]+\.py", names))
    return paths


def package_modules() -> set[str]:
    return {str(path.relative_to(ROOT)) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
            if path.name != "__init__.py"}


def test_the_layout_lists_every_module_under_its_folder():
    assert package_modules() - listed_modules() == set()


def test_the_layout_lists_no_module_that_is_gone():
    listed = {path for path in listed_modules() if path.startswith(PACKAGES)}
    assert listed - package_modules() == set()


if __name__ == "__main__":
    print("\n".join(sorted(listed_modules())))
