"""``attrsparse bench`` (the engine bench) on a tiny in-code Llama: every record and field, TEAL's
per-projection rule run by the native engine, a rule it cannot run (CATS) skipped with its note, llama.cpp skipped with a note, bad input refused in
one line before any work (no timing asserted)."""

from __future__ import annotations

import json
import time

import pytest

from attrsparse.cli.main import main
from attrsparse.core.models import load_model
from attrsparse.evaluation.engine_bench import EngineBench, EngineBenchConfig, quality_frontier

FIELDS = ("engine", "precision", "weights", "selector", "requested_ratio", "read_ratio", "total_read_ratio",
          "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max", "speedup_vs_dense",
          "speedup_vs_llamacpp", "ideal_speedup", "peak_rss_mb", "bytes_read_per_token", "floor_tokens_per_s",
          "wikitext2_ppl", "task_acc", "arc_easy_acc", "quality_source", "skipped", "within_tolerance")


def _text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(" ".join(f"w{(7 * i + 3 * j) % 61}" for j in range(40)) for i in range(40)))
    return str(path)


def _config(llama_dir, tmp_path, **kw):
    base = dict(model=llama_dir, engines=["native", "hf", "llamacpp"], precisions=["fp32", "int8"],
                selectors=["dense", "attr_channel", "teal", "cats"], ratios=[0.6], rounds=2, new_tokens=6, warmup=2,
                threads=1, task_items=2, ppl_tokens=48, calib=_text_file(tmp_path), calib_sequences=4,
                calib_len=24, bandwidth_mb=16, engine_dir=str(tmp_path / "engine"))
    return EngineBenchConfig(**{**base, **kw})


def test_engine_bench_writes_every_record_and_field(llama_dir, tmp_path):
    out = tmp_path / "bench"
    model, tok = load_model(llama_dir)
    results = EngineBench(_config(llama_dir, tmp_path), out, model, tok, command="attrsparse bench ...").run(
        progress=False)
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["records"] == json.loads(json.dumps(results["records"]))
    assert (out / "bench.png").is_file() and (out / "bench.md").is_file()
    assert on_disk["command"] == "attrsparse bench ..." and on_disk["bandwidth_read_gbs"] > 0
    records = {(r["engine"], r["precision"], r["selector"], r["requested_ratio"]): r for r in on_disk["records"]}
    assert len(records) == len(on_disk["records"]) == 3 * 2 * 4  # engines x precisions x (dense + 3 rules)
    for r in records.values():
        assert all(k in r for k in FIELDS), [k for k in FIELDS if k not in r]

    for p in ("fp32", "int8"):
        dense = records[("native", p, "dense", 1.0)]
        assert dense["skipped"] is None and dense["rounds"] == 2 and not dense["errors"]
        assert dense["decode_tokens_per_s_min"] <= dense["decode_tokens_per_s"] <= dense["decode_tokens_per_s_max"]
        assert dense["speedup_vs_dense"] == 1.0 and dense["ideal_speedup"] == 1.0 and dense["read_ratio"] == 1.0
        assert 0 < dense["total_read_ratio"] <= 1.0 and dense["peak_rss_mb"] > 0 and dense["floor_tokens_per_s"] > 0
        assert dense["torch_imported"] is False
        assert dense["speedup_vs_llamacpp"] is None  # no llama.cpp dense of this model
        sparse = records[("native", p, "attr_channel", 0.6)]
        assert sparse["skipped"] is None and sparse["decode_tokens_per_s"] > 0
        assert 0.3 < sparse["read_ratio"] < 0.9 and sparse["total_read_ratio"] < dense["total_read_ratio"]
        assert sparse["ideal_speedup"] == pytest.approx(dense["bytes_read_per_token"] / sparse["bytes_read_per_token"])
        assert sparse["ideal_speedup"] > 1 and sparse["speedup_vs_dense"] > 0
        # TEAL's thresholds per projection: the native engine runs them, each projection deciding on its own
        teal = records[("native", p, "teal", 0.6)]
        assert teal["skipped"] is None and teal["decode_tokens_per_s"] > 0 and 0.3 < teal["read_ratio"] < 0.9
        # CATS's gate decision: the native engine cannot run it; skipped with the converter's line
        cats = records[("native", p, "cats", 0.6)]
        assert "cannot run in the native engine" in cats["skipped"] and cats["decode_tokens_per_s"] is None
        assert "CATS gate" in cats["skipped"] and any("native cats@0.6 skipped" in n for n in on_disk["notes"])

    hf = records[("hf", "fp32", "cats", 0.6)]  # transformers runs it through the hooks
    assert hf["skipped"] is None and hf["decode_tokens_per_s"] > 0 and hf["read_ratio"] < 0.95
    hf_teal, native_teal = records[("hf", "fp32", "teal", 0.6)], records[("native", "fp32", "teal", 0.6)]
    assert abs(hf_teal["read_ratio"] - native_teal["read_ratio"]) < 0.1  # the same rule on the same tokens
    hf_attr, native_attr = records[("hf", "fp32", "attr_channel", 0.6)], records[("native", "fp32", "attr_channel", 0.6)]
    assert abs(hf_attr["read_ratio"] - native_attr["read_ratio"]) < 0.1  # the same rule on the same tokens
    assert records[("hf", "fp32", "dense", 1.0)]["read_ratio"] == 1.0
    assert "fp32, bf16 only" in records[("hf", "int8", "dense", 1.0)]["skipped"]
    for key, r in records.items():
        if key[0] == "llamacpp":  # no GGUF of an in-code model (or llama_cpp absent): skipped with a note
            assert r["skipped"].startswith("llamacpp skipped") and r["decode_tokens_per_s"] is None
    assert any(n.startswith("llamacpp skipped") for n in on_disk["notes"])

    # quality: once per selector and ratio, the same in every engine's record
    for selector in ("dense", "attr_channel", "teal", "cats"):
        rows = [r for k, r in records.items() if k[2] == selector]
        assert len({(r["wikitext2_ppl"], r["task_acc"]) for r in rows}) == 1
        assert rows[0]["wikitext2_ppl"] > 1 and 0 <= rows[0]["task_acc"] <= 1 and rows[0]["quality_source"]
    assert records[("native", "fp32", "dense", 1.0)]["wikitext2_ppl_relative"] == 1.0
    assert set(on_disk["frontier"]) <= {"attr_channel", "teal", "cats"}  # (dense accuracy 0 on 2 items: unknown)
    assert (out / "channels" / "attr_channel" / "channels.json").is_file()


def test_quality_frontier():
    def rec(selector, ratio, ok, engine="native"):
        return {"engine": engine, "selector": selector, "requested_ratio": ratio, "within_tolerance": ok,
                "quality_read_ratio": ratio + 0.01}

    recs = [rec("dense", 1.0, True), rec("a", 0.4, False), rec("a", 0.5, True), rec("a", 0.7, True),
            rec("a", 0.7, True, "hf"), rec("b", 0.5, True), rec("b", 0.7, False), rec("c", 0.5, None)]
    frontier = quality_frontier(recs)
    assert frontier["a"] == {"requested_ratio": 0.5, "quality_read_ratio": 0.51}
    assert frontier["b"] is None  # 0.7 is outside the tolerance: no ratio holds from there on
    assert "c" not in frontier  # quality unknown


def test_bad_bench_input_is_refused_in_one_line_before_any_work(capsys, tmp_path, llama_dir):
    chan = tmp_path / "chan"
    cases = [
        (["--engines", "native,vllm"], "unknown engine 'vllm'"),
        (["--precisions", "fp32,fp8"], "unknown precision 'fp8'"),
        (["--selectors", "dense,atr_channel"], "did you mean 'attr_channel'"),
        (["--selectors", "dense,corrected_gxo"], "unknown bench selector 'corrected_gxo'"),
        (["--engines", "native,native"], "--engines repeats native"),
        (["--ratios", "1.5"], "ratio must lie in (0, 1]"),
        (["--ratios", "1.0"], "below 1"),
        (["--rounds", "0"], "--rounds >= 1"),
        (["--channels-from", f"teal={chan}"], "not among the channel selectors"),
        (["--channels-from", f"attr_channel={chan}"], "no channel file"),
        (["--modes", "dense", "--engines", "native"], "--engines belong(s) to the engine bench"),
        (["--repeats", "2"], "--repeats belong(s) to the unit-mode bench"),
        (["--task", "wikitext2"], "multiple-choice task"),
    ]
    for argv, fragment in cases:
        out = tmp_path / "out"
        start = time.perf_counter()
        code = main(["bench", "--model", llama_dir, *argv, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], (argv, err)
        assert not out.exists() or not any(out.iterdir())
        assert time.perf_counter() - start < 5


def test_unit_mode_bench_still_runs_from_the_cli(capsys, tmp_path, llama_dir):
    out = tmp_path / "modes"
    assert main(["bench", "--model", llama_dir, "--modes", "dense", "--no-quality", "--repeats", "1",
                 "--speed-prompts", "1", "--new-tokens", "3", "--out", str(out)]) == 0
    records = json.loads((out / "bench.json").read_text())["records"]
    assert [r["mode"] for r in records] == ["dense"] and records[0]["decode_tokens_per_s"] > 0
