"""scripts/ab_trees.py: each side of an A/B imports its own tree's hf_flex, sides alternating by round.

The check that matters (tests/benchmarks/NOTES.md, eleventh round): ``python -m`` run from the repo root
imports the working tree's hf_flex whatever PYTHONPATH says, so an A/B must start each side on its own
tree; here a stand-in older tree (a package that only says where it is) must be the one the "old" runs
import, also under ``python -m``.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_side_imports_its_own_tree(tmp_path):
    old = tmp_path / "old"
    (old / "hf_flex").mkdir(parents=True)
    (old / "hf_flex" / "__init__.py").write_text("")
    (old / "hf_flex" / "where.py").write_text("import hf_flex\nprint('WHERE', hf_flex.__file__)\n")
    # the new side: this repo's hf_flex has no where.py, so it runs a one-liner instead
    (tmp_path / "out").mkdir()
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "ab_trees.py"), "--old", str(old), "--rounds", "2",
           "--out", str(tmp_path / "out"), "--", "-c",
           "import hf_flex, sys; print('WHERE', hf_flex.__file__, '{side}', '{round}', '{out}')"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("WHERE")]
    assert [(ln[2], ln[3]) for ln in lines] == [("old", "0"), ("new", "0"), ("new", "1"), ("old", "1")]
    for ln in lines:
        tree = str(old) if ln[2] == "old" else ROOT
        assert os.path.realpath(os.path.dirname(os.path.dirname(ln[1]))) == os.path.realpath(tree), ln
        assert ln[4] == str(tmp_path / "out")
    # and python -m, which puts the current directory first
    base = [sys.executable, os.path.join(ROOT, "scripts", "ab_trees.py"), "--old", str(old), "--out", str(tmp_path)]
    p = subprocess.run(base + ["--", "-m", "hf_flex.where"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode != 0  # the working tree has no hf_flex.where: its side fails, and says so
    (where,) = [ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("WHERE")]
    assert os.path.realpath(os.path.dirname(os.path.dirname(where))) == os.path.realpath(old)


def test_refuses_a_tree_without_hf_flex(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ab_trees.py"), "--old", str(tmp_path), "--",
                        "-c", "pass"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode != 0 and "no hf_flex package" in p.stderr
