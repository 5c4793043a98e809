"""The child process of test_check_fuzz: runs `residency-gate check` on each case file.

Usage: python check_fuzz_child.py CASE_DIR MEMORY_LIMIT_BYTES

Runs the real `check` entry (`residency_gate.cli.main.main`) in-process, one case after
another, under RLIMIT_AS, and reports on stdout, one JSON line per case:
{"case": name, "rc": exit code, "lines": [stderr lines], "maxrss_kb": peak so far}
or {"case": name, "crash": traceback} when check raised instead of exiting. Before each
case it prints {"begin": name}, so the parent can name a case that hangs (it kills us).
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import traceback
from pathlib import Path


def main() -> None:
    case_dir, limit = Path(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from residency_gate.cli.main import main as cli  # imported under the limit too

    out = sys.stdout
    for case in sorted(case_dir.glob("case-*.yaml")):
        print(json.dumps({"begin": case.name}), file=out, flush=True)
        err, std = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
                try:
                    rc = cli(["check", "-c", str(case)])
                except SystemExit as e:
                    rc = e.code
        except BaseException:  # a traceback is exactly what we look for
            print(json.dumps({"case": case.name, "crash": traceback.format_exc()}), file=out,
                  flush=True)
            continue
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"case": case.name, "rc": rc, "lines": err.getvalue().splitlines(),
                          "maxrss_kb": peak}), file=out, flush=True)


if __name__ == "__main__":
    main()
