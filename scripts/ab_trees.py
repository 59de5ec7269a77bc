"""A/B of two code versions on one machine: the same command run alternately on an older tree and on
this working tree, each run in a fresh process that imports its own tree's ``hf_flex``.

    git archive REV hf_flex patches | tar -x -C ab_old     # on the CPU machine; carry ab_old/
    python scripts/ab_trees.py --old ab_old --rounds 2 -- -m hf_flex.bench --e2e-only --e2e-S 4096 \\
        --e2e-variants hf_flex --no-interleave --json '{out}/first_step_{side}_{round}.json'

Why a script: ``python -m hf_flex.bench`` puts the current directory first on sys.path, ahead of
PYTHONPATH, so an older tree merely put first on PYTHONPATH loses to the working tree when the command
runs from the repo root (tests/benchmarks/NOTES.md, eleventh round: two A/Bs compared the working
tree with itself). Here each side runs with its own tree as the current directory and first on
PYTHONPATH, the order of the sides alternating between rounds (old, new, new, old, ...), and each
run first prints which ``hf_flex`` it imported, so a wrong import shows in the log.

Placeholders in the command: ``{side}`` (old / new), ``{round}`` and ``{out}`` (--out, default $OUT or
the current directory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def side_env(tree: str) -> dict:
    """The environment of a run on ``tree``: its directory first on PYTHONPATH (then this repo's, for
    what the older tree lacks: tests' helpers, scripts)."""
    env = dict(os.environ)
    parts = [tree] + ([ROOT] if os.path.abspath(tree) != ROOT else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def which_hf_flex(tree: str) -> str:
    """The file of the ``hf_flex`` a process started on ``tree`` imports."""
    out = subprocess.run([sys.executable, "-c", "import hf_flex; print(hf_flex.__file__)"], cwd=tree,
                         env=side_env(tree), capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="directory holding the older tree's hf_flex (and patches)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=os.environ.get("OUT", os.getcwd()))
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="after --: python arguments, e.g. -m hf_flex.bench ...")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give the command after --")
    old = os.path.abspath(a.old)
    if not os.path.isfile(os.path.join(old, "hf_flex", "__init__.py")):
        ap.error(f"--old {a.old}: no hf_flex package there")
    trees = {"old": old, "new": ROOT}
    for side, tree in trees.items():
        got = os.path.dirname(os.path.dirname(which_hf_flex(tree)))
        if os.path.realpath(got) != os.path.realpath(tree):
            raise SystemExit(f"{side}: a process started on {tree} imports hf_flex from {got}")
        print(f"{side}: hf_flex from {got}", flush=True)
    rc = 0
    for r in range(a.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            args = [x.format(side=side, round=r, out=os.path.abspath(a.out)) for x in cmd]
            print(f"== round {r} {side}: python {' '.join(args)}", flush=True)
            p = subprocess.run([sys.executable] + args, cwd=trees[side], env=side_env(trees[side]))
            rc = rc or p.returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
