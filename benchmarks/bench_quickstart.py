"""The quickstart as a new user meets it: a fresh clone, `make quickstart`, timed, with its accuracy.

    python benchmarks/bench_quickstart.py [--repo .] [--keep]

Clones the repository (its committed HEAD) into a temporary folder, runs `make quickstart` there
(which creates the venv, installs, generates data, trains stage 1 and 2, evaluates and prints the
chat command), and prints a table: wall time (set-up included and excluded), per-type exact-match
accuracy and the chance level (majority answer) read from the run's scores.json.
The acceptance targets of the quickstart: <= 15 minutes on 2 CPU cores, >= 85% overall accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="vrwkv-qs-")
    clone = os.path.join(work, "clone")
    subprocess.run(["git", "clone", "-q", a.repo, clone], check=True)
    t0 = time.time()
    subprocess.run(["make", "setup"], cwd=clone, check=True)
    t1 = time.time()
    run = subprocess.run(["make", "quickstart"], cwd=clone)
    t2 = time.time()
    scores_path = os.path.join(clone, "runs", "quickstart", "scores.json")
    if run.returncode != 0 or not os.path.exists(scores_path):
        print(f"quickstart failed (exit code {run.returncode}); clone kept at {clone}")
        return 1
    s = json.load(open(scores_path))
    print(f"\nfresh clone of {a.repo}; {os.cpu_count()} CPU cores")
    print(f"set-up (venv + install): {(t1 - t0) / 60:.1f} min; quickstart: {(t2 - t1) / 60:.1f} min; "
          f"total {(t2 - t0) / 60:.1f} min")
    print("| type | questions | accuracy | chance (majority) |\n|---|---|---|---|")
    for t, v in s["accuracy"].items():
        c = s["chance"].get(t, {}).get("majority")
        print(f"| {t} | {v['n']} | {100 * v['accuracy']:.1f}% | {'' if c is None else f'{100 * c:.1f}%'} |")
    if a.keep:
        print(f"clone kept at {clone}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
