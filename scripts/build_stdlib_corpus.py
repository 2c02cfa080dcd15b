"""Build a second, larger corpus for the scaling study: this interpreter's standard library source.

Every `.py` file under the standard library (not its tests, not site-packages) that is valid UTF-8,
in sorted path order, each preceded by a `# file: <relative path>` line. About 12 MB on CPython
3.11. The output is not committed: it is rebuilt from whatever Python runs the script.

    python scripts/build_stdlib_corpus.py data/stdlib.txt
"""

import sys
import sysconfig
from pathlib import Path


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests"}
    return [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]


def main(out: str) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for path in stdlib_sources():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# file: {path.relative_to(root)}\n{text}\n")
    Path(out).write_text("".join(parts), encoding="utf-8")
    print(f"{out}: {len(parts)} files, {sum(len(p) for p in parts):,} characters")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/build_stdlib_corpus.py OUT.txt")
    main(sys.argv[1])
