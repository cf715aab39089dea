"""The README's file map stays true: every listed file exists and its line count is current.

    python tests/test_readme.py      # rewrite the counts after editing code
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `([^`]+)` \| (\d+) \|")


def rows(text):
    return [(m.group(1), int(m.group(2)), i) for i, line in enumerate(text.splitlines()) if (m := ROW.match(line))]


def count(path):
    return len((ROOT / path).read_text().splitlines())


def test_readme_file_map_line_counts_are_current():
    listed = rows((ROOT / "README.md").read_text())
    assert len(listed) >= 10
    stale = [f"{path}: README says {n}, file has {count(path)}" for path, n, _ in listed if count(path) != n]
    assert not stale, "run `python tests/test_readme.py` to update:\n" + "\n".join(stale)


def test_every_python_file_of_the_package_is_in_the_map():
    listed = {path for path, _, _ in rows((ROOT / "README.md").read_text())}
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "minillava").rglob("*.py")}
    files |= {p.name for p in ROOT.glob("*.py")}
    assert files <= listed, f"not in the README's file map: {sorted(files - listed)}"


def test_the_ci_script_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci


if __name__ == "__main__":
    path = ROOT / "README.md"
    lines = path.read_text().splitlines()
    for file, _, i in rows(path.read_text()):
        lines[i] = ROW.sub(lambda m: f"| `{m.group(1)}` | {count(m.group(1))} |", lines[i])
    path.write_text("\n".join(lines) + "\n")
    print("README line counts updated")
