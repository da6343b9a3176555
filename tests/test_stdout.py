"""Native output on the C stdout (HiGHS prints there) never reaches a CLI's JSON document.

:func:`lipbound._stdout.fd1_redirected` points file descriptor 1 elsewhere for a block;
``lipbound compare`` runs the rival methods under it with fd 1 on stderr. Checked in fresh
processes, whose fd 1 and 2 are pipes (C stdio is then fully buffered: a ``printf`` not
flushed before the switch back would land on stdout at exit).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=True)


def test_native_and_python_output_go_where_fd1_points():
    out = _run("""
        import ctypes, os, sys
        from lipbound._stdout import fd1_redirected
        libc = ctypes.CDLL(None)
        print("before", flush=False)
        with fd1_redirected(2):
            libc.printf(b"native inside\\n")
            os.write(1, b"raw inside\\n")
            print("python inside")
        with fd1_redirected(None):
            libc.printf(b"native hidden\\n")
        print("after")
        libc.printf(b"native after\\n")
        """)
    assert out.stdout.split() == ["before", "after", "native", "after"]
    assert "native inside" in out.stderr and "raw inside" in out.stderr
    assert "python inside" in out.stderr and "hidden" not in out.stderr + out.stdout


def test_compare_json_stays_clean_when_a_solver_prints():
    out = _run("""
        import ctypes, sys
        import lipbound.baselines.compare
        from lipbound.cli import main
        cmp = sys.modules["lipbound.baselines.compare"]
        real = cmp.compare
        def noisy(*args, **kwargs):
            ctypes.CDLL(None).printf(b"HighsMipSolverData::noise\\n")
            return real(*args, **kwargs)
        cmp.compare = noisy
        main(["compare", "--model", "compnet", "--eps", "0.01", "--methods", "local",
              "--threads", "1", "--json"])
        """)
    doc = json.loads(out.stdout)
    assert [r["method"] for r in doc["rows"]] == ["local"]
    assert "HighsMipSolverData::noise" in out.stderr
