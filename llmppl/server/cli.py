"""``llmppl serve``: the command-line front of :mod:`llmppl.server`."""

from __future__ import annotations

import argparse
import os
import sys


def add_serve(sub: argparse._SubParsersAction) -> None:
    from ..options import METHOD_NAMES, TRUNCATION, TRUNCATION_HELP, HelpFormatter, add_engine_arguments

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server sampling from p^alpha (needs llmppl[serve])",
                       formatter_class=HelpFormatter,
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models and /health. "
                       "Every sampler flag is the server's default; a request may override method, alpha, "
                       "particles, resampling, ess_threshold, block_size and n_mcmc in its body (extra_body); "
                       "--proposal, --schedule, --bridge-steps, --step, --tau and --truncation hold for every "
                       "request. GET /health shows the configuration in force.")
    p.add_argument("--model", default=None, help="model name, local dir, .gguf file or hub id "
                   "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: --model, or the "
                   "default model's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LLMPPL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default: $LLMPPL_API_KEY; none: no authentication)")
    p.add_argument("--method", choices=METHOD_NAMES, default="smc")
    p.add_argument("--alpha", type=float, default=4.0, help="power of the base LM: the target is p^alpha")
    p.add_argument("--particles", type=int, default=8, help="particles / chains / samples")
    p.add_argument("--max-new-tokens", type=int, default=64, help="max_tokens of a request that gives none")
    add_engine_arguments(p)
    p.add_argument("--truncation", choices=TRUNCATION, default="keep", help=TRUNCATION_HELP)
    p.add_argument("--max-batch-prompts", type=int, default=32, help="prompts per run_batch call (and per request)")
    p.add_argument("--max-particles", type=int, default=64, help="largest particles a request may ask for")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-n-mcmc", type=int, default=16, help="largest n_mcmc a request may ask for")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting for a batch; more get 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="after a request reaches an idle server, wait this long for others to join its batch")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from ..models.registry import DEFAULT_MODEL, load_model
    from ..options import apply_threads, parse_threads, resolve_device, resolve_dtype
    from . import ServerConfig, serve

    parse_threads(args.threads)
    config = ServerConfig(  # bad flags fail here, before the model loads
        model_name=args.model_name or args.model or DEFAULT_MODEL, method=args.method, alpha=args.alpha,
        particles=args.particles, resampling=args.resampling, ess_threshold=args.ess_threshold,
        block_size=args.block_size, n_mcmc=args.n_mcmc, top_k=args.top_k, rollouts=args.rollouts,
        horizon=args.horizon, max_tokens=args.max_new_tokens, max_particles=args.max_particles,
        max_tokens_limit=args.max_tokens_limit, max_n_mcmc=args.max_n_mcmc,
        max_batch_prompts=args.max_batch_prompts, queue_size=args.queue_size,
        max_body_bytes=args.max_body_bytes, batch_wait_s=args.batch_wait_ms / 1000.0,
        api_key=args.api_key or None, chat=not args.no_chat, proposal=args.proposal, schedule=args.schedule,
        bridge_steps=args.bridge_steps, step=args.step, tau=args.tau, truncation=args.truncation)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"llmppl serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    lm = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device, args.backend),
                    backend=args.backend)
    serve(lm, config, host=args.host, port=args.port, log_level=args.log_level, exit_when_stopped=True)
    return 0
