"""The README and docs/ as a new user meets them: every command and snippet runs, every relative link resolves.

Each fenced ``bash`` / ``python`` block of ``README.md`` and ``docs/*.md`` is one test, run in a fresh
directory (which holds the ``prompts.jsonl`` of docs/runner.md, so that commands reading it run).

* **Small settings, substituted in one controlled place** (``SMALL`` and ``_small_python``): the
  sizes a doc shows (``--particles 8``, ``max_new_tokens=256``, ``chains=4``, ``--workers 4``, …) are
  rewritten to tiny values; a model this box cannot fetch is replaced by the bundled one
  (``STAND_IN``) and a placeholder path by the bundled model's file (``_placeholders``); nothing else
  is changed, and the rewritten text is in the failure message.
* ``llmppl`` commands run through ``llmppl.cli.main`` (the console script's function), in order;
  ``llmppl serve`` starts the real server in a subprocess, waits for ``/health`` and stops it with
  Ctrl-C; ``--workers`` runs and ``pp.distributed`` snippets join a real local Ray cluster (started
  once for this file, as in tests/test_distributed.py).  ``cat > FILE <<'EOF'`` blocks write their
  file, ``export`` sets the variable for the block's later commands, ``python3 -m venv`` and ``git
  clone`` run as written.
* Python blocks run top to bottom in one namespace per document (a later block may use an earlier
  block's names, as a reader does).
* **Checked instead of run** (``_bash_check``), because running them needs the network or takes hours:
  ``pip install`` (each ``llmppl[extra]`` exists in pyproject.toml; a named package is installed in the
  venv the command names, an uninstalled one is absent), ``make TARGET`` (``make -n TARGET`` parses the
  target), ``llmppl models fetch`` and commands that need CUDA (the CLI's argparse parses every flag),
  and the benchmark scripts (``bash benchmarks/...sh`` runs as written with ``PYTHON`` pointing to a
  stub that records each ``llmppl.cli`` invocation, and argparse parses each).
* vLLM snippets run in the vLLM venv: tests/test_vllm_docs.py (in the Makefile's ``VLLM_TESTS``)
  reuses this file's extraction and substitutions; here they are skipped with that reason.
* What remains skipped says why it cannot run here (``_skip_reason``): CUDA and a schematic.  Once a
  command of a bash block is skipped, the block's later commands are skipped too (they may read what it
  would have written).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
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
         "--prompts": "2", "--bridge-steps": "2", "--workers": "1", "--n-ctx": "2048"}
#: ... and the options appended to these sub-commands when absent (their defaults are minutes of work)
APPEND = {("bench", "latency"): ["--prompts", "2", "--particles", "2", "--max-new-tokens", "4", "--reps", "1"],
          ("bench", "backends"): ["--particles", "2", "--max-new-tokens", "4", "--reps", "1"],
          ("sample",): ["--particles", "2", "--max-new-tokens", "4", "--quiet", "--threads", "1"],
          ("run",): ["--particles", "2", "--max-new-tokens", "4", "--batch-prompts", "2", "--quiet", "--threads", "1"],
          ("eval",): ["--n", "2", "--particles", "2", "--max-new-tokens", "4", "--quiet", "--threads", "1"]}
#: a ``--model`` this box cannot fetch (no network) -> the bundled model that stands in for it
STAND_IN = {"qwen2.5-coder-0.5b": "smollm2-135m-instruct", "Qwen/Qwen2.5-0.5B-Instruct": "smollm2-135m-instruct"}

#: commands parsed with argparse instead of run because the same kind of command runs in another block
#: (each Ray run starts a model replica per worker, 20-40 s here: one run per kind keeps this test short):
#: (file, text of the command) -> the block that runs it
SAME_AS = {("README.md", "--workers"): "docs/runner.md's `llmppl run --workers` (its Ray section), which runs"}

#: blocks that are schematics, not programs (a placeholder engine or target): (file, first line of code)
SCHEMATIC: dict[tuple[str, str], str] = {}
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


def _code(text: str) -> str:
    return "\n".join(_strip_comment(line) for line in text.splitlines())


# ------------------------------------------------------------------ what needs what
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def needs(text: str, lang: str) -> str | None:
    """The venv or service a python block or a bash command needs beyond the main test venv:
    ``"vllm"`` (tests/test_vllm_docs.py runs it in .venv-vllm), ``"ray"`` (a local Ray cluster,
    started here) or None.  Install commands naming vLLM are checks, which run here."""
    t = _code(text)
    if lang == "python" or t.startswith("llmppl "):
        if re.search(r"(?i)vllm", t):
            return "vllm"
        if re.search(r"--workers|pp\.distributed\.|\bray\b", t):
            return "ray"
    return None


def _skip_reason(text: str) -> str | None:
    """Why a python block cannot run in this test at all, or None (comments are not read)."""
    t = _code(text)
    if re.search(r"^\s*serve\(", t, re.M):
        return "blocks until Ctrl-C (tests/test_server.py runs the server)"
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


def _stand_ins(argv: list[str]) -> list[str]:
    """``argv`` with a model this box cannot fetch (``STAND_IN``) and placeholder paths replaced by the
    bundled model."""
    out = list(argv)
    for k, a in enumerate(out):
        if k and out[k - 1] == "--model" and a in STAND_IN:
            out[k] = STAND_IN[a]
        elif a.startswith("path/to/"):
            out[k] = _placeholder(a)
    return out


def _placeholder(path: str) -> str:
    """The bundled model's file standing in for a placeholder path: its GGUF for ``*.gguf``, else its
    safetensors directory (converted once into the cache)."""
    from llmppl.models.registry import DEFAULT_MODEL, convert_gguf_cached, smollm2_gguf_path

    if path.endswith(".gguf"):
        return str(smollm2_gguf_path())
    return str(convert_gguf_cached(smollm2_gguf_path(), DEFAULT_MODEL))


def _small_python(code: str) -> str:
    """Sizes in a python snippet made tiny: particle counts 2, token budgets 4, MH 1 step of 2 tokens."""
    subs = [
        (r"\b(max_new_tokens|max_tokens)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 4)}"),
        (r"\b(n_particles|chains|particles|n)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 2)}"),
        (r"\b(block_size)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 2)}"),
        (r"\b(n_mcmc|rollouts)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 1)}"),
        (r"\b(top_k|horizon|steps|batch_prompts)=(\d+)", lambda m: f"{m[1]}={min(int(m[2]), 2)}"),
        (r"\b(workers)=(\d+)", lambda m: f"{m[1]}=1"),   # each Ray worker loads a model replica
        (r"\bpp\.SMC\((\d+)", lambda m: f"pp.SMC({min(int(m[1]), 2)}"),
        # a positional token budget after the prompt: .run(target, prompt, 256) / run_batch / init
        (r"(\.(?:run|run_batch|init)\(\s*\w+\s*,\s*(?:\"[^\"]*\"|\[[^\]]*\]|\w+)\s*,\s*)(\d+)",
         lambda m: f"{m[1]}{min(int(m[2]), 4)}"),
    ]
    for pattern, repl in subs:
        code = re.sub(pattern, repl, code)
    return code


def prepare_python(code: str) -> str:
    """A python block as this test runs it: small sizes, placeholder paths replaced by the bundled model's
    (``"path/to/model_dir"``, ``"model.gguf"``)."""
    code = _small_python(code)
    return re.sub(r"(?<![\w/])([\"'])(path/to/[\w./-]+|model\.gguf)\1",
                  lambda m: repr(_placeholder(m[2])), code)


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


def parse_llmppl(argv: list[str]) -> None:
    """The CLI's argparse accepts ``argv`` (every flag, choice and typed value), without running it."""
    from llmppl.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"llmppl {shlex.join(argv)}: argparse refuses it ({exc.code})\n"
                                 f"{err.getvalue()[-2000:]}") from None


def _run_llmppl(command: str, cwd: Path) -> str | None:
    """Runs an ``llmppl`` command (returns None), or parses it and says why it did not run."""
    from llmppl.cli import main

    argv = _stand_ins(small_argv(shlex.split(command)[1:]))
    if argv[:2] == ["models", "fetch"]:
        parse_llmppl(argv)
        return "downloads a model (network): parsed only"
    if "cuda" in argv and not _cuda():
        parse_llmppl(argv)
        return "needs a CUDA GPU: parsed only"
    if argv[:1] == ["serve"]:
        _run_serve(argv, cwd)
        return None
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
    assert rc == 0, f"llmppl {' '.join(argv)} -> {rc}\n{err.getvalue()[-3000:]}"
    return None


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(venv: Path | None) -> set[str] | None:
    """Distributions installed in ``venv`` (this interpreter's when None); None if that venv is absent."""
    from importlib import metadata

    if venv is None:
        return {_canonical(d.metadata["Name"]) for d in metadata.distributions()}
    site = sorted(venv.glob("lib/python*/site-packages"))
    if not site:
        return None
    return {_canonical(d.metadata["Name"]) for d in metadata.distributions(path=[str(p) for p in site])}


def _check_pip(words: list[str]) -> str:
    """``[VENV/bin/]pip install|uninstall ...``: each ``llmppl[extra]`` / ``.[extra]`` names an extra of
    pyproject.toml; a package installed by name is installed in that venv, an uninstalled one is absent."""
    pip = words.index(next(w for w in words if w == "pip" or w.endswith("/pip") or w == "pip3"))
    venv = Path(words[pip]).parent.parent if "/" in words[pip] else None
    op, args = words[pip + 1], [w for w in words[pip + 2:] if not w.startswith("-")]
    assert op in ("install", "uninstall"), words
    installed = _installed(ROOT / venv if venv is not None else None)
    for arg in args:
        m = re.fullmatch(r"(?:llmppl|\.)\[([\w,-]+)\]", arg)
        if m:
            missing = set(m[1].split(",")) - _extras()
            assert not missing, f"{shlex.join(words)}: no extra {sorted(missing)} in pyproject.toml"
        elif installed is not None:
            there = _canonical(arg) in installed
            assert there == (op == "install"), (
                f"{shlex.join(words)}: {arg} is {'' if there else 'not '}installed in {venv or sys.prefix}")
    return "installs from the package index: extras and packages checked"


def _check_make(target: str, cwd: Path) -> str:
    """``make TARGET``: the Makefile of ``cwd`` (else the repository's) has the target (``make -n``)."""
    where = cwd if (cwd / "Makefile").exists() else ROOT
    proc = subprocess.run(["make", "-n", "-C", str(where), target], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"make -n {target} in {where}: {proc.stderr[-2000:]}"
    return "installs from the package index (minutes): make -n only"


STUB = """#!/bin/sh
# records one llmppl.cli invocation (arguments separated by US) in a file of its own, instead of running it
# (a script's jobs run in parallel: one file per call, so that no two calls interleave)
call=$(mktemp "{calls}/call.XXXXXX")
for a in "$@"; do printf '%s\\037' "$a"; done > "$call"
"""


def _check_script(words: list[str], env: dict[str, str], workdir: Path) -> str:
    """``bash benchmarks/...sh``: the script runs as written (from the repository root, with the doc's
    environment) but with ``PYTHON`` a stub that records each ``python -m llmppl.cli ...`` it would
    run, and ``OUT`` in this test's directory; argparse then parses every recorded command."""
    calls_dir, stub = workdir / "llmppl-invocations", workdir / "python-stub"
    calls_dir.mkdir(exist_ok=True)
    stub.write_text(STUB.format(calls=calls_dir))
    stub.chmod(0o755)
    full = {**os.environ, **env, "PYTHON": str(stub), "OUT": str(workdir / "bench-out")}
    proc = subprocess.run(words, cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{shlex.join(words)} -> {proc.returncode}\n{proc.stderr[-3000:]}"
    calls = [f.read_text().split("\x1f")[:-1] for f in sorted(calls_dir.iterdir())]
    assert calls, f"{shlex.join(words)} ran no llmppl command"
    for argv in calls:
        assert argv[:2] == ["-m", "llmppl.cli"], argv
        parse_llmppl(argv[2:])
    shutil.rmtree(calls_dir)
    return f"a benchmark of hours: its {len(calls)} llmppl commands parsed"


class Shell:
    """The state a bash block's commands share: the working directory and the exported variables."""

    def __init__(self, workdir: Path):
        self.workdir, self.cwd, self.env = workdir, workdir, {}


def run_bash(command: str, sh: Shell) -> str | None:
    """Runs one command of a bash block (returns None), or checks it and says what was checked."""
    if "<<" in command:   # a heredoc writing a file
        subprocess.run(["bash", "-c", command], cwd=sh.cwd, check=True)
        return None
    notes = [n for part in command.split(" && ") if (n := _run_part(part.strip(), sh))]
    return "; ".join(notes) or None


def _run_part(command: str, sh: Shell) -> str | None:
    if command.startswith("llmppl "):
        return _run_llmppl(command, sh.cwd)
    # scratch paths of a doc (/tmp/...) go to this test's directory
    words = [re.sub(r"^/tmp/", str(sh.workdir) + "/", w) for w in shlex.split(command)]
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[:2] == ["/usr/bin/time", "-v"]:
        words = words[2:]
    if words[0] == "export":   # the doc's commands run from the repository root: $PWD is that
        name, _, value = words[1].partition("=")
        sh.env[name] = value = value.replace("$PWD", str(ROOT))
        path = Path(value)
        if path.is_absolute() and path.parent.parent.is_dir():   # e.g. .venv-vllm/lib/libiomp5.so, where that venv is
            assert path.exists(), f"{command}: no {path}"
        return None
    if words[0] == "cd":
        sh.cwd = Path(words[1])
        return None
    if words[:3] == ["git", "clone", "."]:   # a fresh clone of this repository
        subprocess.run(["git", "clone", "-q", str(ROOT), *words[3:]], check=True, timeout=120)
        return None
    if re.fullmatch(r"python3?", words[0]) and words[1:3] == ["-m", "venv"]:
        subprocess.run([words[0], *words[1:]], cwd=sh.workdir, check=True, timeout=300)
        return None
    if any(w == "pip" or w == "pip3" or w.endswith("/pip") for w in words[:3]):
        return _check_pip(words)
    if words[0] == "make":
        return "; ".join(_check_make(t, sh.cwd) for t in words[1:])
    if words[0] == "bash" and words[1].startswith("benchmarks/"):
        return _check_script(words, env, sh.workdir)
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


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the blocks that need one (``--workers``, ``pp.distributed``), started
    at the first such block, as tests/test_distributed.py starts its own: the CLI and run_dataset join it."""
    ray = pytest.importorskip("ray", reason="Ray is in the test extras (make install-test)")
    from llmppl.distributed.driver import init_local

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), saved]) if saved else str(ROOT)
    init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


BLOCKS = blocks()
VLLM_SKIP = "needs vLLM, which lives in its own venv: tests/test_vllm_docs.py runs this in .venv-vllm"


@pytest.mark.model
@pytest.mark.parametrize("path, line, lang, text", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _, _ in BLOCKS])
def test_doc_block_runs(path, line, lang, text, workdir, request):
    run_doc_block(path, line, lang, text, workdir, request, venv="main")


def run_doc_block(path, line, lang, text, workdir, request, venv):
    """Runs a block (its commands that belong to ``venv``: "main" or "vllm"), skipping with the reason
    what cannot run here."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    where = str(path.relative_to(ROOT))
    schematic = next((why for (f, start), why in SCHEMATIC.items() if f == where and first.startswith(start)), None)
    if schematic:
        pytest.skip(schematic)
    broken = next((why for (f, start), why in KNOWN_BROKEN.items() if f == where and first.startswith(start)), None)
    try:
        _run_block(path, line, lang, text, workdir, request, venv)
    except AssertionError:
        if broken:
            pytest.xfail(broken)
        raise


def _belongs(need: str | None, venv: str, request) -> str | None:
    """None if a block or command needing ``need`` runs in ``venv`` (starting Ray for it), else why not."""
    if (need == "vllm") != (venv == "vllm"):
        return VLLM_SKIP if venv == "main" else "runs in the main venv (tests/test_docs.py)"
    if need == "ray":
        request.getfixturevalue("ray_cluster")
    return None


def _run_block(path, line, lang, text, workdir, request, venv):
    if lang == "python":
        reason = _skip_reason(text) or _belongs(needs(text, "python"), venv, request)
        if reason:
            pytest.skip(reason)
        code = prepare_python(text)
        ns = NAMESPACES.setdefault(path, {"__name__": f"doc:{path.name}"})
        import matplotlib

        matplotlib.use("Agg")
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"{path.name}:{line} failed ({type(exc).__name__}: {exc}); ran:\n{code}") from exc
        return
    skipped, unwritten, done, sh = [], set(), [], Shell(workdir)
    where = str(path.relative_to(ROOT))
    for command in bash_commands(text):
        words = set(shlex.split(command)) if "<<" not in command else set()
        same = next((why for (f, part), why in SAME_AS.items() if f == where and part in command), None)
        if same and command.startswith("llmppl "):
            parse_llmppl(_stand_ins(small_argv(shlex.split(command)[1:])))
            done.append(f"{command[:60]}: parsed only, the same as {same}")
            continue
        reason = _belongs(needs(command, "bash"), venv, request)
        if reason is None and words & unwritten:
            reason = f"reads {sorted(words & unwritten)[0]}, which a skipped command writes"
        if reason:
            skipped.append(reason)
            unwritten |= _outputs(command)
            continue
        note = run_bash(command, sh)
        done.append(f"{command[:60]}: {note or 'ran'}")
    print("\n".join(done))   # what ran and what was only checked (pytest -rA shows it)
    if not done:
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


def test_make_test_runs_every_vllm_test_file():
    """``make test`` runs each committed test file that needs vLLM in the vLLM venv (the Makefile's
    ``VLLM_TESTS``): in the main venv such a file only skips (tests/conftest.py names the gap)."""
    from conftest import _vllm_tests

    listed = _vllm_tests()
    tracked = subprocess.run(["git", "ls-files", "tests/test_vllm*.py"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout (the test files cannot be told from untracked ones)")
    needing = [f for f in tracked.stdout.split()
               if re.search(r"^pytest\.importorskip\(\"vllm\"", (ROOT / f).read_text(), re.M)]
    assert needing and not set(needing) - listed, f"not in the Makefile's VLLM_TESTS: {sorted(set(needing) - listed)}"
