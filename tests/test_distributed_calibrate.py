"""``attrsparse calibrate`` sharded under torchrun and resumable per sequence (tiny model on disk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from attrsparse.cli.main import main
from attrsparse.core.io import load_tensors

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def _args(model_dir: Path, out: Path) -> list[str]:
    return ["calibrate", "--model", str(model_dir), "--calib", str(FIXTURES / "wikitext_tiny.txt"),
            "--n-seq", "3", "--seq-len", "6", "--ratios", "0.5,0.7", "--out", str(out)]


def _comparable(out: Path) -> tuple[dict, dict]:
    doc = json.loads((out / "static.json").read_text())
    for key in ("created", "timing_s", "written"):
        doc.pop(key, None)
    return doc, load_tensors(out / "static.safetensors")


def test_calibrate_two_ranks_equal_one_and_resume_per_sequence(tiny_truthfulqa_lm, tmp_path):
    model, tok = tiny_truthfulqa_lm()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(tmp_path / "model", one)) == 0
    parts = sorted((one / "parts").glob("seq*.safetensors"))
    assert len(parts) == 3  # the tiny text holds 3 windows of 6 tokens

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "attrsparse", *_args(tmp_path / "model", two)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sparsity file:") == 1  # rank 0 merges, chooses the masks and reports
    doc1, t1 = _comparable(one)
    doc2, t2 = _comparable(two)
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)  # bitwise (fp32, CPU)
    assert doc1["ratios"] == doc2["ratios"]
    assert sorted(p.name for p in (two / "parts").glob("*")) == [p.name for p in parts]

    # resume: a lost part is recomputed, the others are reused untouched; same result
    (one / "static.json").unlink()
    parts[2].unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in parts if p.exists()}
    assert main(_args(tmp_path / "model", one)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in parts if p.name in stamps} == stamps
    assert parts[2].exists()
    doc3, t3 = _comparable(one)
    assert all(torch.equal(t1[k], t3[k]) for k in t1) and doc3["ratios"] == doc1["ratios"]
