"""``attrsparse bench`` on a tiny in-code model: records, accounting, resume (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from attrsparse.core.errors import UserError
from attrsparse.evaluation.bench import Bench, BenchConfig, macs_per_token, quality_frontier


def _config(**kw):
    base = dict(model="tiny", ratios=[0.5], modes=["dense", "static", "predictor", "oracle"],
                speed_prompts=1, new_tokens=3, repeats=1, gen_questions=2, mc1_items=2, task_items=2,
                ppl_tokens=48, calib_sequences=4, predictor_sequences=4)
    return BenchConfig(**{**base, **kw})


def test_bench_records_every_mode_and_resumes(tiny_truthfulqa_lm, tmp_path, monkeypatch):
    model, tok = tiny_truthfulqa_lm()
    results = Bench(_config(), tmp_path, model=model, tokenizer=tok).run(progress=False)
    records = {(r["mode"], r["requested_ratio"]): r for r in results["records"]}
    assert set(records) == {("dense", 1.0), ("static", 0.5), ("predictor", 0.5), ("oracle", 0.5)}
    keys = ("mode", "requested_ratio", "executed_ratio", "decode_tokens_per_s", "speedup", "ideal_speedup",
            "bleu_vs_dense", "mc1", "wikitext2_ppl", "peak_rss_mb")
    for r in records.values():
        assert all(k in r for k in keys)
    dense = records[("dense", 1.0)]
    assert dense["executed_ratio"] == 1.0 and dense["bleu_vs_dense"] == 100.0
    assert dense["wikitext2_ppl_relative"] == 1.0
    for mode in ("static", "predictor"):
        r = records[(mode, 0.5)]
        assert 0.3 < r["executed_ratio"] < 0.75
        assert r["decode_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["achieved_over_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    assert records[("static", 0.5)]["ideal_speedup"] > 1.0
    # on a 32-wide toy model the predictor costs more than the units it saves: counted, not hidden
    assert records[("predictor", 0.5)]["predictor_params_per_token"] > 0
    assert records[("predictor", 0.5)]["ideal_speedup"] < records[("static", 0.5)]["ideal_speedup"]
    assert records[("oracle", 0.5)]["decode_tokens_per_s"] is None  # quality only
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert len(on_disk["records"]) == 4 and (tmp_path / "bench.png").is_file() and (tmp_path / "bench.md").is_file()

    monkeypatch.setattr(Bench, "measure_quality", lambda *a: pytest.fail("re-measured a finished record"))
    monkeypatch.setattr(Bench, "measure_speed", lambda *a: pytest.fail("re-measured a finished record"))
    Bench(_config(), tmp_path, model=model, tokenizer=tok).run(progress=False)


def test_macs_count_lm_head_and_predictor(make_tiny):
    model = make_tiny("llama")
    dense = macs_per_token(model, 1.0)
    half = macs_per_token(model, 0.5)
    head = model.get_output_embeddings().weight.numel()
    from attrsparse import unit_map

    assert dense - half == pytest.approx(0.5 * unit_map(model).maskable_params)
    assert half > head  # the LM head caps the ideal speed-up
    assert macs_per_token(model, 0.5, 100) == half + 100


def test_frontier_and_bad_config():
    recs = [{"mode": "static", "requested_ratio": r, "mc1_relative": m, "task_acc_relative": 1.0,
             "wikitext2_ppl_relative": p, "executed_ratio": r} for r, m, p in
            ((0.3, 0.5, 3.0), (0.5, 0.97, 1.08), (0.7, 1.0, 1.01))]
    assert quality_frontier(recs)["static"]["requested_ratio"] == 0.5
    with pytest.raises(UserError, match="unknown bench mode"):
        _config(modes=["dense", "fast"]).validate()
    with pytest.raises(UserError):
        _config(ratios=[1.5]).validate()
