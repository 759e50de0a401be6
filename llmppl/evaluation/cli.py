"""``llmppl eval``: run methods on a task (resumable JSONL), or ``--plot`` a results file.

    llmppl eval --task reasoning_gym:chain_sum --n 200 --seed 0 \\
        --methods plain,lowtemp,smc,mh --model qwen2.5-coder-0.5b --json results.jsonl
    llmppl eval --task reasoning_gym_cot:gsm_symbolic --n 200 --methods plain,reweight,smc \\
        --max-new-tokens 256 --truncation zero --json cot.jsonl      # chain of thought, \\boxed{}
    llmppl eval --plot results.jsonl --out benchmarks/results/eval/

A method is ``name[:key=value...]`` (e.g. ``smc:particles=16``); the same ``--json``
file with the same command resumes where a killed run stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DEFAULT_METHODS = "plain,lowtemp,smc,mh"


def add_eval(sub: argparse._SubParsersAction) -> None:
    from ..options import METHOD_NAMES, HelpFormatter, add_engine_arguments

    p = sub.add_parser("eval", help="reasoning evaluation (accuracy, pass@k, cost) or --plot a results file",
                       description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--task", default=None, help="FAMILY:NAME: reasoning_gym:chain_sum (short answers), or a "
                   "chain-of-thought task graded by math-verify on the last \\boxed{}: "
                   "reasoning_gym_cot:gsm_symbolic, jsonl:PATH, parquet:PATH, hf:DATASET_ID")
    p.add_argument("--task-config", default="{}", help="JSON keyword arguments of the task generator, "
                   "e.g. '{\"max_terms\": 3}'; CoT tasks also take question_field, answer_field, split, "
                   "subset, strict, instruction")
    p.add_argument("--n", type=int, default=100, help="number of problems (default 100)")
    p.add_argument("--seed", type=int, default=0, help="problem-set and sampling seed")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, each name[:key=value...]; names: {', '.join(METHOD_NAMES)}")
    p.add_argument("--model", default=None, help="model name, local dir or .gguf (default: SmolLM2-135M)")
    p.add_argument("--json", default=None, help="results JSONL (appended; resumes)")
    p.add_argument("--particles", type=int, default=8, help="samples / particles / chains per problem (default 8)")
    p.add_argument("--alpha", type=float, default=4.0, help="power of the base LM for smc/mh/lookahead (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-prompts", type=int, default=1,
                   help="problems per run_batch call (default 1: problem i seeded by seed*1000003+i, as "
                   "before; larger batches b seeded by SeedSequence([seed, b]))")
    p.add_argument("--truncation", choices=["keep", "zero"], default="keep",
                   help="what p^alpha does with completions cut at --max-new-tokens (smc, mh, lookahead): "
                   "keep them (default) or give them zero mass, the honest p^alpha on <= T tokens")
    p.add_argument("--n-ctx", type=int, default=None,
                   help="llama.cpp KV cells shared by all rows (--backend llamacpp; batches need about "
                   "batch-prompts x particles x max-new-tokens + the prompts)")
    add_engine_arguments(p)
    p.add_argument("--time-limit", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only the batches b with b mod N = K (N processes or machines, each with its own "
                   "--json file; the records are those of one run; --plot merges the files). A shard skips only "
                   "what its own file holds: to shard a run that has records, start each file as a copy of them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plot", nargs="+", default=None, metavar="JSONL",
                   help="summarise results file(s): markdown table, McNemar tests, PNG figures")
    p.add_argument("--out", default=None, help="directory for --plot outputs (default: next to the first file)")
    p.add_argument("--note", default=None, help="--plot: markdown put first in table.md (e.g. the command that ran)")
    p.set_defaults(func=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    if args.plot:
        from .plots import report

        out = Path(args.out) if args.out else Path(args.plot[0]).parent
        print(report(args.plot, out, note=args.note))
        return 0
    if not args.task or not args.json:
        raise ValueError("llmppl eval needs --task and --json (or --plot FILE)")
    return evaluate(args)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``, refusing anything but integers with ``0 <= K < N``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2")
    return int(match[1]), int(match[2])


def evaluate(args: argparse.Namespace) -> int:
    import llmppl as pp
    from ..options import apply_threads, parse_threads, resolve_device, resolve_dtype

    from ..methods import METHODS, check_backend
    from .runner import Job, MethodSpec, ResultStore, method_config, method_namespace, run_eval
    from .registry import get_task

    if args.n < 1 or args.particles < 1 or args.max_new_tokens < 1 or args.batch_prompts < 1:
        raise ValueError("--n, --particles, --max-new-tokens and --batch-prompts must be >= 1")
    parse_threads(args.threads)
    try:
        task_config = json.loads(args.task_config)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--task-config is not JSON: {exc}") from None
    specs = [MethodSpec.parse(m) for m in args.methods.split(",") if m.strip()]
    if len({s.label for s in specs}) != len(specs):
        raise ValueError(f"--methods lists a method twice: {args.methods}")
    namespaces = [method_namespace(s, args) for s in specs]  # validates names and options early
    backend = getattr(args, "backend", "hf")
    for spec, ns in zip(specs, namespaces):                    # ... and what the backend cannot run
        check_backend(METHODS[spec.name](ns, spec.name), backend)
    shard = parse_shard(args.shard) if args.shard else (0, 1)
    task = get_task(args.task, task_config, seed=args.seed)
    problems = task.problems(args.n)
    store = ResultStore(args.json)
    apply_threads(args.threads)
    options = {"n_ctx": args.n_ctx} if args.n_ctx else {}  # (load_model refuses it for other backends)
    device = resolve_device(args.device)
    lm = pp.models.load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device, backend),
                              backend=backend, **options)
    chat = not args.no_chat and getattr(getattr(lm, "tokenizer", None), "chat_template", None) is not None
    jobs = []
    for spec, ns in zip(specs, namespaces):
        method = METHODS[spec.name](ns, spec.name)
        # the truncation choice is part of the sharpened target p^alpha; samplers of p ignore it
        truncation = args.truncation if method.sharpened else "keep"
        target = pp.Target(lm, pp.Power(method.target_alpha(ns.alpha)), chat=chat, truncation=truncation)
        config = method_config(spec, ns)
        if truncation != "keep":  # (absent for "keep", so files written before --truncation still resume)
            config["truncation"] = truncation
        jobs.append(Job(spec, method, target, config))
    run_config = {"model": args.model or "default", "task_config": task_config, "seed": args.seed,
                  "max_new_tokens": args.max_new_tokens, "chat": chat}
    if args.batch_prompts != 1:  # batches > 1 change the seeds (results files before them have none)
        run_config["batch_prompts"] = args.batch_prompts
    if backend != "hf":  # (absent for hf, so files written before --backend existed still resume)
        run_config["backend"] = backend
        run_config["model"] = f"{run_config['model']}@{backend}"  # records of two backends do not collide
    ran = run_eval(task, problems, jobs, store, args.max_new_tokens, args.seed, run_config,
                   progress=not args.quiet, time_limit=args.time_limit, batch_prompts=args.batch_prompts,
                   shard=shard)
    done = sum(1 for p in problems for j in jobs if (task.spec, run_config["model"], p.index, j.spec.label) in store)
    print(f"{ran} runs now, {done}/{len(problems) * len(jobs)} done in {args.json}", file=sys.stderr)
    return 0
