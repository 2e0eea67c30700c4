"""Scaling of ``attrsparse sweep`` over torchrun ranks: questions per minute, speed-up, peak memory.

Runs the same sweep (fresh output directory each time, so nothing is reused) as
``torchrun --standalone --nproc-per-node P -m attrsparse sweep ...`` for each configuration
``PxT`` (P ranks of T threads each; default ``1x1,2x1,1x2``) and reports, side by side:

* ``wall_s``: the whole command, model loads, merge, report and plots included;
* ``shard_s``: the slowest rank's time on its questions (from ``out/shards/rank*.json``);
* questions per minute for both, the speed-up against the first configuration, and each rank's
  peak resident memory (``ru_maxrss``);
* whether the merged ``results.json`` (timings dropped) equals the first configuration's. With the
  same threads per rank (``1x1`` vs ``2x1``) it must be identical; with other thread counts
  float sums may be reordered, so small differences there are reported, not hidden.

Usage (about 4 minutes on 2 idle cores)::

    python benchmarks/bench_distributed.py --limit 8 --out docs/results/bench_distributed.json

On a 2-core machine shared with other work expect little speed-up; the point is that the merged
results are identical and how the time splits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=8, help="TruthfulQA questions")
    p.add_argument("--metrics", default="corrected_gxo,magnitude")
    p.add_argument("--ratios", default="0.3,0.5,1.0")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--configs", default="1x1,2x1,1x2", help="comma-separated PxT: P ranks, T threads each")
    p.add_argument("--extra", default="--no-mc1", help="more sweep arguments (one string)")
    p.add_argument("--keep", default=None, help="keep the sweep directories under this path")
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p.parse_args(argv)


def _sweep_args(args) -> list[str]:
    return ["--model", args.model, "--limit", str(args.limit), "--metrics", args.metrics,
            "--ratios", args.ratios, "--max-new-tokens", str(args.max_new_tokens), *args.extra.split()]


def _comparable(out: Path) -> str:
    results = json.loads((out / "results.json").read_text())
    for record in results["questions"]:
        record.pop("timings")
    return json.dumps(results)


def run_config(args, procs: int, threads: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "attrsparse", "sweep", *_sweep_args(args), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{procs}x{threads} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    ranks = [json.loads((out / "shards" / f"rank{r:03d}-of-{procs:03d}.json").read_text()) for r in range(procs)]
    shard = max(r["seconds"] for r in ranks)
    return {"config": f"{procs}x{threads}", "ranks": procs, "threads_per_rank": threads,
            "wall_s": wall, "shard_s": shard,
            "questions_per_min_wall": 60 * args.limit / wall, "questions_per_min_shard": 60 * args.limit / shard,
            "per_rank": [{"rank": r["rank"], "questions": len(r["computed"]), "seconds": r["seconds"],
                          "peak_rss_mb": r["peak_rss_mb"]} for r in ranks]}


def main(argv=None) -> int:
    import torch
    import transformers

    args = parse_args(argv)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",") if c.strip()]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    # convert the packaged GGUF once, so no configuration pays for it (or races over it)
    subprocess.run([sys.executable, "-m", "attrsparse", "info", "--model", args.model],
                   check=True, capture_output=True)
    rows, reference = [], None
    try:
        for procs, threads in configs:
            out = root / f"p{procs}t{threads}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"running {procs} rank(s) x {threads} thread(s) ...", flush=True)
            row = run_config(args, procs, threads, out)
            text = _comparable(out)
            reference = reference or (text, row)
            row["results_identical_to_first"] = text == reference[0]
            if text != reference[0]:
                mine = {(a["metric"], a["requested_ratio"]): a["bleu_vs_dense"]
                        for a in json.loads(text)["aggregates"]}
                first = {(a["metric"], a["requested_ratio"]): a["bleu_vs_dense"]
                         for a in json.loads(reference[0])["aggregates"]}
                row["max_bleu_difference_to_first"] = max(abs(mine[k] - first[k]) for k in first)
            row["speedup_wall_vs_first"] = reference[1]["wall_s"] / row["wall_s"]
            row["speedup_shard_vs_first"] = reference[1]["shard_s"] / row["shard_s"]
            rows.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'config':<7} {'wall s':>7} {'shard s':>8} {'q/min wall':>11} {'q/min shard':>12} "
          f"{'speed-up':>9} {'peak RSS MiB per rank':>24}  identical")
    for r in rows:
        rss = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in r["per_rank"])
        print(f"{r['config']:<7} {r['wall_s']:>7.1f} {r['shard_s']:>8.1f} {r['questions_per_min_wall']:>11.2f} "
              f"{r['questions_per_min_shard']:>12.2f} {r['speedup_shard_vs_first']:>8.2f}x {rss:>24}  "
              f"{r['results_identical_to_first']}")
    report = {
        "benchmark": "bench_distributed",
        "command": "python benchmarks/bench_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"model": args.model, "questions": args.limit, "metrics": args.metrics,
                     "ratios": args.ratios, "max_new_tokens": args.max_new_tokens, "extra": args.extra},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpus": os.cpu_count(),
                        "loadavg_1m_at_end": os.getloadavg()[0], "machine": platform.machine()},
        "notes": "speed-up = first configuration's seconds / this one's; shard_s = slowest rank on its "
                 "questions, wall_s = whole torchrun command (model loads, merge, report, plots)",
        "runs": rows,
    }
    if args.out:
        from attrsparse.core.io import atomic_write_json

        atomic_write_json(Path(args.out), report)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
