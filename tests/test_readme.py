"""The README's examples are true: its Python code blocks run and print what it says, its
``$ lipbound ...`` blocks print the output shown (times masked), and the examples in the
library's docstrings pass as doctests.

Values that depend only on seeds and the shipped weights must match the text exactly (to the
digits shown). Blocks slower than a few seconds are listed in ``SLOW`` and not run here; every
other ``$ lipbound`` block of the README is.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pkgutil
import re
import shlex
from pathlib import Path

import pytest
import torch

import lipbound
from lipbound.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"

SLOW = {
    # the rival methods on the MNIST LeNet's 11,404-unit chain: about 20 s
    "compare --model mnist --input mnist:8 --eps 0.1 --time-limit 10",
}
"""README commands not run here (too slow for the test suite), by their arguments."""

TIME_COLUMNS = {"seconds", "time [s]"}


def _blocks(lang: str) -> list[str]:
    """The README's fenced code blocks whose opening fence is exactly ```<lang>."""
    blocks: list[str] = []
    fence: str | None = None  # the opening fence's language while inside a block
    body: list[str] = []
    for line in README.read_text(encoding="utf-8").split("\n"):
        if fence is None and line.startswith("```"):
            fence, body = line[3:].strip(), []
        elif fence is not None and line.strip() == "```":
            if fence == lang:
                blocks.append("\n".join(body) + "\n")
            fence = None
        elif fence is not None:
            body.append(line)
    return blocks


def _cli_blocks() -> list[tuple[str, list[str]]]:
    """(arguments, expected output lines) of each README block that starts with
    ``$ lipbound``; the note ``(first lines)`` after the command is dropped."""
    out = []
    for block in _blocks(""):
        first, _, rest = block.partition("\n")
        if first.startswith("$ lipbound "):
            args = first[len("$ lipbound "):].split("   (")[0].strip()
            out.append((args, rest.rstrip("\n").split("\n")))
    return out


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _normalise(lines: list[str]) -> list[str]:
    """Lines with times masked: the columns headed ``seconds`` / ``time [s]`` of a table (a
    header line above a line of dashes) dropped, ``<number> s`` and the JSON ``"seconds"``
    replaced by ``T``; table rows as their cells joined by ``|`` (column widths depend on
    the widest cell, e.g. a time), the dash lines left out, trailing spaces removed."""
    out: list[str] = []
    drop: set[int] | None = None
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if re.fullmatch(r"-+(\s+-+)*\s*", line):
            continue
        if re.fullmatch(r"-+(\s+-+)*\s*", nxt):  # a table's header
            header = _cells(line)
            drop = {k for k, h in enumerate(header) if h in TIME_COLUMNS}
        elif drop is not None and len(_cells(line)) < 2:
            drop = None  # the table ended
        if drop is not None:
            cells = [c for k, c in enumerate(_cells(line)) if k not in drop]
            out.append("|".join(cells))
            continue
        line = re.sub(r"seconds min \S+ / median \S+ / max \S+", "seconds min T / median T / "
                      "max T", line.rstrip())
        line = re.sub(r"\b\d+(\.\d+)? s\b", "T s", line)
        line = re.sub(r'"seconds": \S+,', '"seconds": T,', line)
        out.append(line)
    return out


def _run_cli(capsys, args: list[str]) -> list[str]:
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out.rstrip("\n").split("\n")


def test_every_cli_block_is_run_or_listed_as_slow():
    blocks = [args for args, _ in _cli_blocks()]
    assert len(blocks) >= 8  # models, bound (3), radius, tight, compare (2), residual
    assert SLOW <= set(blocks), "a SLOW entry no longer matches a README block"


@pytest.mark.parametrize("args, expected", [b for b in _cli_blocks() if b[0] not in SLOW],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_readme_cli_block_prints_what_it_shows(capsys, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(README.parent)  # (paths such as examples/resnet_cifar.py: the repo's)
    argv = shlex.split(args)
    if "--out" in argv:  # write where the test may (the README shows /tmp/...)
        k = argv.index("--out") + 1
        shown, argv[k] = argv[k], str(tmp_path / Path(argv[k]).name)
        expected = [line.replace(shown, argv[k]) for line in expected]
    n = torch.get_num_threads()
    try:
        got = _normalise(_run_cli(capsys, argv))
    finally:
        torch.set_num_threads(n)  # --threads auto set it for the command
    want = _normalise(expected)
    if any(line.strip() == "..." for line in want):  # an excerpt: the lines around "..."
        k = next(i for i, line in enumerate(want) if line.strip() == "...")
        head, tail = want[:k], want[k + 1:]
        assert got[:len(head)] == head
        assert not tail or got[-len(tail):] == tail
    else:
        assert got == want


@pytest.mark.usefixtures("torch_one_thread")
def test_readme_python_blocks_run_and_print_the_bound():
    """"The Python API in five lines": it runs as written and prints the local bound of
    mnist:8 at eps 0.1, the same value as the README's ``lipbound bound`` table (1052.93), an
    upper bound on the ratio at sampled points of the ball."""
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        buf = io.StringIO()
        scope: dict = {}
        with contextlib.redirect_stdout(buf):
            exec(compile(code, str(README), "exec"), scope)
        value = float(buf.getvalue().split()[-1])
        assert f"{value:.2f}" == "1052.93"
        net, x0 = scope["net"], scope["x0"].double()
        model = net.double()
        g = torch.Generator().manual_seed(0)
        d = torch.randn((64, *x0.shape[1:]), generator=g, dtype=torch.float64)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.1
        with torch.no_grad():
            ratio = ((model(x0 + d) - model(x0)).norm(dim=1) / 0.1).max().item()
        assert 0 < ratio <= value


def _public_modules() -> list[str]:
    names = ["lipbound"]
    for info in pkgutil.walk_packages(lipbound.__path__, "lipbound."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            names.append(info.name)
    return names


@pytest.mark.usefixtures("torch_one_thread")
def test_docstring_examples_pass_as_doctests():
    """Every ``>>>`` example in the library (those marked ``+SKIP`` aside: a sweep or a
    benchmark, seconds each) prints what its docstring shows."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    attempted = 0
    for name in _public_modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if test.examples:
                with contextlib.redirect_stdout(io.StringIO()) as buf:
                    result = runner.run(test)
                assert result.failed == 0, f"{test.name}:\n{buf.getvalue()}"
                attempted += result.attempted
    assert attempted >= 30
