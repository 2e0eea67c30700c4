"""``attrsparse compare`` end to end on a tiny in-code model with 3-item fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attrsparse.cli.main import main
from attrsparse.core.errors import UserError
from attrsparse.evaluation import compare as compare_mod
from attrsparse.evaluation.compare import Compare, CompareConfig
from attrsparse.evaluation.compare_report import frontier
from attrsparse.evaluation.tolerance import within_tolerance

FIXTURES = Path(__file__).parent / "fixtures"


def _config(**kw):
    base = dict(models=["tiny"], tasks=["truthfulqa_mc1", "wikitext2"],
                selectors=["magnitude", "corrected_gxo"], ratios=[0.5, 0.9], limit=3,
                max_tokens=64, calib=str(FIXTURES / "wikitext_tiny.txt"), calib_sequences=2,
                calib_len=8, data={"truthfulqa_mc1": str(FIXTURES / "truthfulqa_3.csv"),
                                   "wikitext2": str(FIXTURES / "wikitext_tiny.txt")})
    return CompareConfig(**{**base, **kw})


def test_compare_writes_tables_and_resumes(tiny_truthfulqa_lm, tmp_path, monkeypatch):
    loaded = {"tiny": tiny_truthfulqa_lm()}
    results = Compare(_config(), tmp_path, loaded=loaded).run(progress=False)
    records = results["records"]
    assert len(records) == 2 * (1 + 2 * 2)  # per task: dense + selectors x ratios
    for name in ("compare.json", "compare.csv", "compare.md", "truthfulqa_mc1.png", "wikitext2.svg"):
        assert (tmp_path / name).is_file()
    dense = [r for r in records if r["selector"] == "dense"]
    assert all(r["executed_ratio"] == 1.0 for r in dense)
    assert [r["relative_to_dense"] for r in dense if r["task"] == "wikitext2"] == [1.0]
    sparse = [r for r in records if r["selector"] != "dense"]
    for r in sparse:
        assert 0 < r["executed_ratio"] < 1
        assert r["mode"] == "oracle" and r["n"] == 3 if r["task"] == "truthfulqa_mc1" else r["ppl"] > 1
    ppl = {(r["selector"], r["requested_ratio"]): r["ppl"] for r in records if r["task"] == "wikitext2"}
    assert ppl[("magnitude", 0.5)] != ppl[("dense", 1.0)]
    md = (tmp_path / "compare.md").read_text()
    assert "corrected_gxo's standing" in md and "| magnitude | oracle |" in md

    # a re-run reads every record back instead of recomputing
    monkeypatch.setattr(Compare, "run_job", lambda *a, **k: pytest.fail("recomputed a finished job"))
    again = Compare(_config(), tmp_path, loaded=loaded).run(progress=False)
    assert again["records"] == results["records"]


def test_frontier_and_tolerance():
    def rec(sel, ratio, value, metric="acc", dense=0.5):
        return {"model": "m", "task": "t", "selector": sel, "requested_ratio": ratio, "mode": "oracle",
                "executed_ratio": ratio, "primary_metric": metric, "value": value,
                "dense_value": dense, "relative_to_dense": value / dense}

    records = [rec("a", 0.3, 0.40), rec("a", 0.5, 0.48), rec("a", 0.7, 0.50),
               rec("b", 0.3, 0.49), rec("b", 0.5, 0.30), rec("b", 0.7, 0.49)]
    assert within_tolerance(rec("a", 0.5, 0.476)) and not within_tolerance(rec("a", 0.5, 0.47))
    assert within_tolerance(rec("p", 0.5, 10.9, "ppl", 10.0)) and not within_tolerance(rec("p", 0.5, 11.1, "ppl", 10.0))
    front = {f["selector"]: f for f in frontier(records, None)}
    assert front["a"]["lowest_ok_ratio"] == 0.5 and front["a"]["highest_failing_ratio"] == 0.3
    assert front["b"]["lowest_ok_ratio"] == 0.7  # 0.3 is fine but 0.5 is not: not "from 0.3 on"
    assert front["a"]["rank"] == 1 and front["b"]["rank"] == 2


def test_compare_bad_input_is_one_line(capsys, tmp_path):
    assert main(["compare", "--tasks", "arc_eazy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'arc_easy'" in err and "Traceback" not in err
    with pytest.raises(UserError, match="below 1.0"):
        _config(ratios=[1.0]).validate()
    with pytest.raises(UserError, match="IG"):
        _config(selectors=["ig"]).validate()
    assert main(["compare", "--data", "nonsense", "--out", str(tmp_path)]) == 2
    assert "TASK=PATH" in capsys.readouterr().err
    assert compare_mod.slug("Qwen/Qwen2.5 0.5B") == "Qwen_Qwen2.5_0.5B"
    assert json.loads(json.dumps(CompareConfig().__dict__))  # serialisable defaults
    dense_only = _config(selectors=["dense"]).validate()
    assert dense_only.selectors == [] and Compare(dense_only, tmp_path).jobs() == [
        ("tiny", "truthfulqa_mc1", "dense", 1.0), ("tiny", "wikitext2", "dense", 1.0)]


def test_compare_under_torchrun_equals_one_process(tiny_truthfulqa_lm, tmp_path):
    """2 gloo ranks shard the jobs round-robin; rank 0's merged compare.json equals one process's."""
    import os
    import subprocess
    import sys

    model, tok = tiny_truthfulqa_lm()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    args = ["compare", "--models", str(tmp_path / "model"), "--tasks", "truthfulqa_mc1,wikitext2",
            "--selectors", "magnitude,teal_units,wanda", "--ratios", "0.5", "--limit", "3", "--max-tokens", "48",
            "--calib", str(FIXTURES / "wikitext_tiny.txt"), "--calib-sequences", "2", "--calib-len", "8",
            "--data", f"truthfulqa_mc1={FIXTURES / 'truthfulqa_3.csv'},wikitext2={FIXTURES / 'wikitext_tiny.txt'}"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", "-m", "attrsparse", *args, "--out", str(tmp_path / "two")],
                          env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("table: ") == 1  # only rank 0 merges and reports

    def comparable(out):
        results = json.loads((out / "compare.json").read_text())
        results["config"]["models"] = ["m"]
        return json.dumps([{k: v for k, v in r.items() if k != "model"} for r in results["records"]])

    assert comparable(tmp_path / "two") == comparable(tmp_path / "one")
    assert len(list((tmp_path / "two" / "records").rglob("*.json"))) == 2 * (1 + 3)
