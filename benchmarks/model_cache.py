"""Embedded model load: first load (GGUF dequantize + write the safetensors cache) vs a cached load.

RETAIN_CACHE points at a fresh temporary folder, then load_model(<model>) runs twice, each in its own
Python process (cold: converts and caches; warm: reads the cache). Reported: the time load_model itself
took in each process (LoadInfo.seconds), each process's wall time (imports included), the cache hit flags,
and the ratio cold/warm, measured in this one run. The temporary cache is removed afterwards.

    python benchmarks/model_cache.py            # smollm2-135m, about 20 s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import machine, print_table, write_json

from retain.models.loading import GGUF_MODELS

CHILD = """
import json, sys, logging
logging.disable(logging.WARNING)
from retain.models.loading import load_model
model, tokenizer, info = load_model(sys.argv[1])
params = sum(p.numel() for p in model.parameters())
print("RESULT " + json.dumps({"seconds": info.seconds, "cache_hit": info.cache_hit, "parameters": params}))
"""


def load_in_subprocess(model: str, cache: str) -> dict:
    env = dict(os.environ, RETAIN_CACHE=cache, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, model], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"loading {model} failed (exit {proc.returncode})")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "process_wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(GGUF_MODELS))
    parser.add_argument("--output", default="model_cache", help="name of the JSON file in benchmarks/out")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="retain-cache-bench-") as cache:
        print(f"RETAIN_CACHE={cache} (fresh); loading {args.model} cold, then warm", file=sys.stderr)
        cold = load_in_subprocess(args.model, cache)
        warm = load_in_subprocess(args.model, cache)
    if cold["cache_hit"] is not False or warm["cache_hit"] is not True:
        raise SystemExit(f"unexpected cache hits: cold {cold['cache_hit']}, warm {warm['cache_hit']}")
    ratio = cold["seconds"] / warm["seconds"]
    wall_ratio = cold["process_wall_s"] / warm["process_wall_s"]
    print_table(
        [
            ("load", "load_model s", "process wall s", "cache hit"),
            ("cold (dequantize + cache)", f"{cold['seconds']:.2f}", f"{cold['process_wall_s']:.2f}", "no"),
            ("warm (cached safetensors)", f"{warm['seconds']:.2f}", f"{warm['process_wall_s']:.2f}", "yes"),
        ]
    )
    print(f"\nratio cold/warm: load_model {ratio:.1f}x, process wall {wall_ratio:.1f}x")
    path = write_json(
        args.output,
        {
            "benchmark": "model_cache",
            "model": args.model,
            "cold": cold,
            "warm": warm,
            "ratio_cold_over_warm": ratio,
            "ratio_wall_cold_over_warm": wall_ratio,
            "machine": machine(),
            "note": "ratios measured in one run; absolute numbers depend on the machine",
        },
    )
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
