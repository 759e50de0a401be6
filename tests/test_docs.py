"""The README and docs/ as a new user meets them: every command and snippet runs, every relative link resolves.

Each fenced ``bash`` / ``python`` block of ``README.md`` and ``docs/*.md`` is one test, run in a fresh
directory (which holds the ``prompts.jsonl`` of docs/runner.md, so that commands reading it run).

* **Small settings, substituted in one controlled place** (``SMALL`` and ``_small_python``): the
  sizes a doc shows (``--particles 8``, ``max_new_tokens=256``, ``chains=4``, …) are rewritten to
  tiny values, and nothing else is changed; the rewritten text is in the failure message.
* ``llmppl`` commands run through ``llmppl.cli.main`` (the console script's function), in order;
  ``llmppl serve`` starts the real server in a subprocess, waits for ``/health`` and stops it with
  Ctrl-C.  ``cat > FILE <<'EOF'`` blocks write their file.
* Python blocks run top to bottom in one namespace per document (a later block may use an earlier
  block's names, as a reader does).
* What cannot run here is skipped with its reason (``_skip_reason``): installs (``pip``, ``make``,
  ``git clone``), vLLM, CUDA, Ray, the network, models that are not bundled, placeholder paths,
  hours-long benchmark scripts, and a ``serve(...)`` call that blocks.  Once a command of a bash block
  is skipped, the block's later commands are skipped too (they may read what it would have written).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: option -> the small value it gets in a doc's command (present options only: nothing is added)
SMALL = {"--particles": "2", "--max-new-tokens": "4", "--n": "2", "--batch-prompts": "2", "--reps": "1",
         "--prompts": "2", "--bridge-steps": "2"}
#: ... and the options appended to these sub-commands when absent (their defaults are minutes of work)
APPEND = {("bench", "latency"): ["--prompts", "2", "--particles", "2", "--max-new-tokens", "4", "--reps", "1"],
          ("bench", "backends"): ["--particles", "2", "--max-new-tokens", "4", "--reps", "1"],
          ("sample",): ["--particles", "2", "--max-new-tokens", "4", "--quiet", "--threads", "1"],
          ("run",): ["--particles", "2", "--max-new-tokens", "4", "--quiet", "--threads", "1"],
          ("eval",): ["--n", "2", "--particles", "2", "--max-new-tokens", "4", "--quiet", "--threads", "1"]}

#: blocks that are schematics, not programs (a placeholder engine or target): (file, first line of code)
SCHEMATIC = {("docs/architecture.md", "state = engine.init(target, prompts, max_new_tokens, seed=0)"):
             "a schematic of the kernel loop (engine, target and prompts are placeholders)"}
#: blocks known to fail, with why and whose doc it is: run, and reported as xfail while they fail
KNOWN_BROKEN: dict[tuple[str, str], str] = {}

PROMPTS_JSONL = (
    '{"id": "q1", "prompt": "What is 17 * 23?", "answer": 391}\n'
    '{"id": "q2", "prompt": [{"role": "user", "content": "Name three primary colors."}]}\n'
    '{"id": "q3", "prompt": [1, 4093, 30]}\n')


# ------------------------------------------------------------------ extraction
def blocks() -> list[tuple[Path, int, str, str]]:
    """(file, line, language, text) of every fenced bash / python block."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M):
            lang = m.group(1)   # an unlabelled fence is text (a diagram, a formula), not code
            if lang in ("bash", "sh", "console", "python"):
                out.append((path, text[:m.start()].count("\n") + 1, "python" if lang == "python" else "bash",
                            m.group(2)))
    return out


def bash_commands(text: str) -> list[str]:
    """Commands of a bash block: continuation lines joined, comments dropped, heredocs kept whole."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        heredoc = re.search(r"<<\s*'?(\w+)'?", line)
        if heredoc:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == heredoc.group(1))
            out.append("\n".join(lines[i:end + 1]))
            i = end + 1
            continue
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        command = _strip_comment(line).strip()
        if command:
            out.append(command)
    return out


def _strip_comment(line: str) -> str:
    quote = None
    for k, c in enumerate(line):
        if c in "'\"" and quote in (None, c):
            quote = None if quote == c else c
        elif c == "#" and quote is None and (k == 0 or line[k - 1].isspace()):
            return line[:k]
    return line


# ------------------------------------------------------------------ what cannot run here
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _skip_reason(text: str) -> str | None:
    """Why a command or a python block cannot run in this test, or None (comments are not read)."""
    t = "\n".join(_strip_comment(line) for line in text.splitlines())
    rules = [
        (r"^\s*pip install", "installs packages (the test venv has every extra already)"),
        (r"(^|\s)make\b", "a Makefile target (CI runs make test itself)"),
        (r"^\s*export\s", "sets the shell's environment for the commands after it"),
        (r"^\s*git clone", "a fresh-clone timing recipe"),
        (r"^\s*bash benchmarks/", "a benchmark script of hours (its results files are in benchmarks/results/)"),
        (r"(?i)vllm", "needs vLLM (its own venv: make vllm; tests/test_vllm*.py)"),
        (r"--workers|pp\.distributed\.run_dataset|workers=", "needs a Ray cluster (tests/test_distributed.py)"),
        (r"models fetch", "downloads a model (network)"),
        (r"path/to/|\"model\.gguf\"|'model\.gguf'", "a placeholder path"),
        (r"qwen|Qwen|from_pretrained\(\"[A-Za-z]", "a model that is not bundled (llmppl models fetch, or the hub)"),
        (r"^\s*serve\(", "blocks until Ctrl-C (tests/test_server.py runs the server)"),
    ]
    for pattern, reason in rules:
        if re.search(pattern, t, re.M):
            return reason
    if re.search(r"cuda", t) and not _cuda():
        return "needs a CUDA GPU"
    return None


# ------------------------------------------------------------------ small settings
def small_argv(argv: list[str]) -> list[str]:
    """``argv`` with the sizes in ``SMALL`` replaced and the ``APPEND`` options added when absent."""
    out = list(argv)
    for k, a in enumerate(out[:-1]):
        if a in SMALL:
            out[k + 1] = SMALL[a]
    for key, extra in APPEND.items():
        if tuple(out[:len(key)]) == key:
            for k in range(0, len(extra)):
                if extra[k].startswith("--") and extra[k] not in out:
                    out.append(extra[k])
                    if k + 1 < len(extra) and not extra[k + 1].startswith("--"):
                        out.append(extra[k + 1])
    return out


def _small_python(code: str) -> str:
    """Sizes in a python snippet made tiny: particle counts 2, token budgets 4, MH 1 step of 2 tokens."""
    subs = [
        (r"\b(max_new_tokens|max_tokens)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 4)}"),
        (r"\b(n_particles|chains|particles|n)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 2)}"),
        (r"\b(block_size)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 2)}"),
        (r"\b(n_mcmc|rollouts)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 1)}"),
        (r"\b(top_k|horizon|steps|batch_prompts)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 2)}"),
        (r"\bpp\.SMC\((\d+)", lambda m: f"pp.SMC({min(int(m[1]), 2)}"),
        # a positional token budget after the prompt: .run(target, prompt, 256) / run_batch / init
        (r"(\.(?:run|run_batch|init)\(\s*\w+\s*,\s*(?:\"[^\"]*\"|\[[^\]]*\]|\w+)\s*,\s*)(\d+)",
         lambda m: f"{m[1]}{min(int(m[2]), 4)}"),
    ]
    for pattern, repl in subs:
        code = re.sub(pattern, repl, code)
    return code


# ------------------------------------------------------------------ running
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_serve(argv: list[str], cwd: Path) -> None:
    """``llmppl serve ...`` in a subprocess: up within 600 s, /health answers, stopped by Ctrl-C."""
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("LLMPPL_API_KEY", None)
    log = cwd / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llmppl.cli", *argv, "--port", str(port), "--threads", "1",
                                 "--log-level", "warning"], cwd=cwd, env=env, stdout=f, stderr=f)
    try:
        deadline = time.monotonic() + 600   # a busy 2-core box: imports and the model load take minutes
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "llmppl serve did not come up within 600 s"
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if r.status_code == 200:
                    break
            time.sleep(0.5)
        assert r.json()["config"]["particles"] == int(argv[argv.index("--particles") + 1])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, log.read_text()


def _run_llmppl(command: str, cwd: Path) -> None:
    from llmppl.cli import main

    argv = small_argv(shlex.split(command)[1:])
    if argv[:1] == ["serve"]:
        _run_serve(argv, cwd)
        return
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
    assert rc == 0, f"llmppl {' '.join(argv)} -> {rc}\n{err.getvalue()[-3000:]}"


def _run_bash(command: str, cwd: Path) -> None:
    if "<<" in command:   # a heredoc writing a file
        subprocess.run(["bash", "-c", command], cwd=cwd, check=True)
    elif command.startswith("llmppl "):
        _run_llmppl(command, cwd)
    else:
        raise AssertionError(f"the doc-test does not know how to run {command!r}: add a rule")


NAMESPACES: dict[Path, dict] = {}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "prompts.jsonl").write_text(PROMPTS_JSONL)
    monkeypatch.chdir(tmp_path)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


BLOCKS = blocks()


@pytest.mark.model
@pytest.mark.parametrize("path, line, lang, text", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _, _ in BLOCKS])
def test_doc_block_runs(path, line, lang, text, workdir):
    first = text.strip().splitlines()[0] if text.strip() else ""
    where = str(path.relative_to(ROOT))
    schematic = next((why for (f, start), why in SCHEMATIC.items() if f == where and first.startswith(start)), None)
    if schematic:
        pytest.skip(schematic)
    broken = next((why for (f, start), why in KNOWN_BROKEN.items() if f == where and first.startswith(start)), None)
    try:
        _run_block(path, line, lang, text, workdir)
    except AssertionError:
        if broken:
            pytest.xfail(broken)
        raise


def _run_block(path, line, lang, text, workdir):
    if lang == "python":
        reason = _skip_reason(text)
        if reason:
            pytest.skip(reason)
        code = _small_python(text)
        ns = NAMESPACES.setdefault(path, {"__name__": f"doc:{path.name}"})
        import matplotlib

        matplotlib.use("Agg")
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"{path.name}:{line} failed ({type(exc).__name__}: {exc}); ran:\n{code}") from exc
        return
    skipped, unwritten, ran = [], set(), 0
    for command in bash_commands(text):
        words = set(shlex.split(command)) if "<<" not in command else set()
        reason = _skip_reason(command)
        if reason is None and words & unwritten:
            reason = f"reads {sorted(words & unwritten)[0]}, which a skipped command writes"
        if reason:
            skipped.append(reason)
            unwritten |= _outputs(command)
            continue
        _run_bash(command, workdir)
        ran += 1
    if not ran:
        pytest.skip("; ".join(dict.fromkeys(skipped)) or "no command")


def _outputs(command: str) -> set[str]:
    """The files a command writes (the values of --output / --json / --out / >)."""
    words = shlex.split(command) if "<<" not in command else command.split()
    return {words[k + 1] for k, w in enumerate(words[:-1]) if w in ("--output", "--json", "--out", ">")}


# ------------------------------------------------------------------ links
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = heading.strip().lower().replace("`", "")
    return "".join(c for c in h if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("L")
                   ).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m and not fenced:
            base = slug = _slug(m.group(1))
            k = 1
            while slug in seen:
                slug, k = f"{base}-{k}", k + 1
            seen.add(slug)
    return seen


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and an anchor that a
    heading of that file defines."""
    broken = []
    for path in DOCS:
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):
                continue
            target, _, anchor = link.partition("#")
            file = (path.parent / target) if target else path
            if not file.exists():
                broken.append(f"{path.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{path.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


def test_docs_cite_no_missing_design_document():
    """The docs cite DESIGN.md sections only if the repository has the file."""
    if (ROOT / "DESIGN.md").exists() or (ROOT / "docs" / "DESIGN.md").exists():
        return
    cites = [f"{p.relative_to(ROOT)}" for p in DOCS if re.search(r"DESIGN\.md\s*§", p.read_text(encoding="utf-8"))]
    assert not cites, f"cite DESIGN.md, which is not in the repository: {cites}"


def test_the_doc_test_rewrites_only_sizes():
    """The substitutions touch sizes and nothing else."""
    assert small_argv(["sample", "--prompt", "x", "--particles", "8", "--schedule", "linear"]) == [
        "sample", "--prompt", "x", "--particles", "2", "--schedule", "linear", "--max-new-tokens", "4",
        "--quiet", "--threads", "1"]
    code = 'smc.run(target, "Name it.", 48, seed=0); pp.SMC(n_particles=16, ess_threshold=0.5); f(alpha=4.0)'
    assert _small_python(code) == ('smc.run(target, "Name it.", 4, seed=0); pp.SMC(n_particles=2, '
                                   'ess_threshold=0.5); f(alpha=4.0)')
    assert bash_commands("llmppl run --a 1 \\\n    --b 2   # note\n# only a comment\nllmppl x") == [
        "llmppl run --a 1 --b 2", "llmppl x"]
