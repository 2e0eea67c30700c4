"""Tests for attrsparse.core.distributed and attrsparse.experiments.streaming.

In-process: round-robin sharding, resumable ``run_sharded`` records and manifests, the score
shards' memory budget and bitwise round trip, streamed sweep scores equal to ``score()``.
Multi-process (``torchrun --standalone``, gloo, 2 CPU ranks, one thread each) on a tiny Llama
saved to disk with its word-level tokenizer and a 6-question TruthfulQA CSV: the merged
``results.json`` and the streamed scores equal a single-process run's; a rank killed with SIGKILL
after its first question is completed by a re-run (or by torchrun's elastic restart) that
recomputes only the questions without records, with the same results.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attrsparse import score
from attrsparse.cli.main import main
from attrsparse.core import distributed
from attrsparse.core.distributed import DistContext, init_distributed, run_sharded
from attrsparse.core.errors import UserError
from attrsparse.experiments.streaming import ScoreReader, ScoreWriter
from attrsparse.experiments.sweep import Sweep, SweepConfig

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
SWEEP_ARGS = ["--template", "paper", "--metrics", "magnitude,corrected_gxo", "--ratios", "0.5,1.0",
              "--max-new-tokens", "5", "--limit", "6", "--stream-scores"]


# -- sharding and resumable records (one process) ------------------------------------------------
def test_round_robin_shards_cover_every_item_once():
    shards = [DistContext(rank=r, world_size=3).shard_positions(7) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert DistContext(rank=1, world_size=3).shard("abcdefg") == ["b", "e"]
    assert DistContext().shard_positions(4) == [0, 1, 2, 3] and DistContext().is_main


def test_without_torchrun_the_context_is_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_CONTEXT", None)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.distributed) == (0, 1, None, True, False)
    assert init_distributed() is ctx  # one context per process
    assert ctx.gather_to_main({"a": 1}) == [{"a": 1}]
    monkeypatch.setattr(distributed, "_CONTEXT", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(UserError, match="RANK=5, WORLD_SIZE=2"):
        init_distributed()
    monkeypatch.setattr(distributed, "_CONTEXT", None)


def test_run_sharded_resumes_and_rejects_invalid_records(tmp_path):
    items = [3, 1, 4, 1, 5]
    calls = []

    def work(pos, item):
        calls.append(pos)
        return {"pos": pos, "square": item * item}

    def key(pos, item):
        return f"item{pos}"

    first = run_sharded(items, key, work, tmp_path / "rec", manifest_dir=tmp_path / "man",
                        ctx=DistContext(), progress=False)
    assert first == [{"pos": i, "square": x * x} for i, x in enumerate(items)] and calls == [0, 1, 2, 3, 4]
    manifest = json.loads((tmp_path / "man" / "rank000-of-001.json").read_text())
    assert manifest["computed"] == [f"item{i}" for i in range(5)] and manifest["reused"] == []
    assert manifest["peak_rss_mb"] > 0 and manifest["world_size"] == 1

    (tmp_path / "rec" / "item1.json").unlink()  # missing
    (tmp_path / "rec" / "item2.json").write_text('{"pos": 2, "squ')  # truncated
    (tmp_path / "rec" / "item3.json").write_text('{"pos": 3, "square": -1}')  # stale
    calls.clear()
    again = run_sharded(items, key, work, tmp_path / "rec", manifest_dir=tmp_path / "man",
                        valid_fn=lambda pos, item, rec: rec["square"] >= 0, ctx=DistContext(),
                        progress=False)
    assert again == first and calls == [1, 2, 3]
    manifest = json.loads((tmp_path / "man" / "rank000-of-001.json").read_text())
    assert manifest["reused"] == ["item0", "item4"]
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left


# -- streamed score shards -----------------------------------------------------------------------
def test_score_writer_rolls_shards_at_the_budget_and_reads_back_bitwise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    entries = {f"q{i}": {"s.mlp": torch.randn(3, 2, 40, generator=gen),  # 960 bytes
                         "s.heads": torch.randn(3, 2, 4, generator=gen),  # 96 bytes
                         "ids": torch.arange(i + 1)} for i in range(5)}
    entry_bytes = [sum(t.numel() * t.element_size() for t in e.values()) for e in entries.values()]
    writer = ScoreWriter(tmp_path, prefix="rank000", max_memory_mb=2500 / 2**20)  # 2500 bytes
    for key, tensors in entries.items():
        writer.add(key, tensors)
        assert writer.buffered_bytes < 2500  # a full buffer is written at once
    writer.close()
    # 2 entries fit below 2500 bytes, a third would exceed it: shards of 2, 2 and 1 entries
    assert len(writer.shards) == 3 and all(p.is_file() for p in writer.shards)
    assert entry_bytes == [1064, 1072, 1080, 1088, 1096]  # 960 + 96 + 8 * (i + 1)
    assert writer.peak_buffered_bytes == 1080 + 1088  # the largest shard, q2 and q3
    reader = ScoreReader(tmp_path)
    assert reader.keys() == list(entries) and len(reader) == 5 and "q3" in reader
    assert [reader.shard_of(k) for k in entries] == [writer.shards[i] for i in (0, 0, 1, 1, 2)]
    for key, tensors in reader:
        assert set(tensors) == set(entries[key])
        assert all(torch.equal(tensors[n], entries[key][n]) for n in tensors)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    big = ScoreWriter(tmp_path / "big", max_memory_mb=100 / 2**20)  # one entry exceeds the budget
    big.add("q0", entries["q0"])
    assert len(big.shards) == 1 and big.buffered_bytes == 0  # written alone, at once
    with pytest.raises(ValueError, match="free of '/'"):
        big.add("a/b", entries["q0"])
    with pytest.raises(UserError, match="--max-memory"):
        ScoreWriter(tmp_path, max_memory_mb=0)


def test_reader_keeps_the_first_copy_of_a_recomputed_entry(tmp_path):
    for value in (1.0, 2.0):
        with ScoreWriter(tmp_path, prefix=f"r{int(value)}") as writer:
            writer.add("q0", {"x": torch.full((2,), value)})
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert ScoreReader(tmp_path).load("q0")["x"].tolist() == [1.0, 1.0]  # "r1-..." sorts first
    assert ScoreReader(tmp_path / "absent").keys() == []


def count_calls(monkeypatch) -> list[int]:
    """Record the question index of every ``Sweep.run_question`` call."""
    calls: list[int] = []
    original = Sweep.run_question
    monkeypatch.setattr(Sweep, "run_question",
                        lambda self, q_pos, item: calls.append(item.index) or original(self, q_pos, item))
    return calls


def _sweep(tiny_truthfulqa_lm, out, **overrides):
    model, tok = tiny_truthfulqa_lm()
    settings = dict(metrics=["magnitude", "corrected_gxo", "recommended"], ratios=[0.5, 1.0],
                    limit=3, template="paper", data=str(FIXTURES / "truthfulqa_3.csv"),
                    max_new_tokens=5, mc1=False, stream_scores=True)
    return Sweep(SweepConfig(**{**settings, **overrides}), out=out, model=model, tokenizer=tok)


def test_streamed_sweep_scores_equal_score_and_lost_scores_are_recomputed(tiny_truthfulqa_lm, tmp_path,
                                                                          monkeypatch):
    import attrsparse.experiments.plots

    monkeypatch.setattr(attrsparse.experiments.plots, "plot_curves", lambda results, out_dir: [])
    sweep = _sweep(tiny_truthfulqa_lm, tmp_path, max_memory_mb=1e-6)  # one shard per question
    results = sweep.run(progress=False)
    reader = ScoreReader(tmp_path / "scores")
    assert len(list((tmp_path / "scores").glob("*.safetensors"))) == 3
    assert [k.split("-")[0] for k in reader.keys()] == ["q0000", "q0001", "q0002"]
    for key, stored in reader:
        # the selector (progressive_gxo) has no scores of its own; the two metrics do
        assert set(stored) == {"prompt_ids", "target_ids", "magnitude.mlp", "magnitude.heads",
                               "corrected_gxo.mlp", "corrected_gxo.heads"}
        expected = score(sweep.model, stored["prompt_ids"], stored["target_ids"],
                         metrics=["magnitude", "corrected_gxo"])
        t = stored["target_ids"].numel()
        assert stored["corrected_gxo.mlp"].shape == (t, 2, 48) and stored["magnitude.heads"].shape == (t, 2, 4)
        for name, s in expected.items():
            assert torch.equal(stored[f"{name}.mlp"], s.mlp) and torch.equal(stored[f"{name}.heads"], s.heads)
    record = results["questions"][0]
    assert reader.load(reader.keys()[0])["target_ids"].numel() == record["dense_tokens"]

    reader.shard_of(reader.keys()[1]).unlink()  # question 1's scores are lost: not a finished question
    calls = count_calls(monkeypatch)
    again = _sweep(tiny_truthfulqa_lm, tmp_path).run(progress=False)
    assert calls == [1]
    assert json.dumps(again["aggregates"]) == json.dumps(results["aggregates"])
    assert ScoreReader(tmp_path / "scores").keys() == reader.keys()


@pytest.mark.parametrize("argv,match", [
    (["--max-memory", "64"], "--max-memory bounds the streamed scores; add --stream-scores"),
    (["--stream-scores", "--max-memory", "0"], "--max-memory must be a positive number of MB"),
])
def test_cli_bad_streaming_input_exits_2_with_one_line(tmp_path, capsys, argv, match):
    assert main(["sweep", *argv, "--out", str(tmp_path / "out")]) == 2  # before loading a model
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and match in lines[0]
    assert not (tmp_path / "out").exists()


# -- several processes (torchrun, gloo) ----------------------------------------------------------
@pytest.fixture(scope="module")
def dist_setup(tiny_truthfulqa_lm, tmp_path_factory):
    """(model dir, 6-question CSV, single-process output dir) shared by the torchrun tests."""
    root = tmp_path_factory.mktemp("dist")
    model, tok = tiny_truthfulqa_lm()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with (FIXTURES / "truthfulqa_3.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows += [{**r, "Question": r["Question"].replace("?", " in San Francisco?")} for r in rows]
    data = root / "truthfulqa_6.csv"
    with data.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    single = root / "single"
    torch.set_num_threads(1)  # the ranks run one thread each, as the autouse fixture does here
    assert main(["sweep", "--model", str(root / "model"), "--data", str(data), *SWEEP_ARGS,
                 "--out", str(single)]) == 0
    return root / "model", data, single


def torchrun(setup, out: Path, *, crash: str | None = None, max_restarts: int = 0,
             extra: tuple = ()) -> subprocess.CompletedProcess:
    model_dir, data, _ = setup
    env = {k: v for k, v in os.environ.items() if k != "ATTRSPARSE_TEST_CRASH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # needed by elastic restarts: docs/distributed.md
    if crash:
        env["ATTRSPARSE_TEST_CRASH"] = crash
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "-m", "attrsparse", "sweep", "--model", str(model_dir),
           "--data", str(data), *SWEEP_ARGS, *extra, "--out", str(out)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


def comparable(out: Path) -> str:
    results = json.loads((out / "results.json").read_text())
    results["config"].pop("max_memory_mb")  # the scores buffer's budget changes no result
    for record in results["questions"]:
        record.pop("timings")
    return json.dumps(results)  # text: NaN-safe (stderr of one question is NaN)


def assert_same_scores(a: Path, b: Path) -> None:
    ra, rb = ScoreReader(a / "scores"), ScoreReader(b / "scores")
    assert ra.keys() == rb.keys() and len(ra) == 6
    for key, tensors in ra:
        other = rb.load(key)
        assert set(other) == set(tensors)
        assert all(torch.equal(tensors[n], other[n]) for n in tensors), key  # bitwise (fp32, CPU)


def manifests(out: Path) -> list[dict]:
    return [json.loads((out / "shards" / f"rank{r:03d}-of-002.json").read_text()) for r in (0, 1)]


def records(out: Path) -> dict[str, Path]:
    return {p.stem: p for p in (out / "records").glob("q*.json")}


def test_two_ranks_merge_to_the_single_process_results(dist_setup, tmp_path, monkeypatch):
    out = tmp_path / "two"
    proc = torchrun(dist_setup, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report: ") == 1  # only rank 0 writes and reports the merged run
    assert comparable(out) == comparable(dist_setup[2])
    assert_same_scores(out, dist_setup[2])
    shard0, shard1 = manifests(out)
    assert [k.split("-")[0] for k in shard0["assigned"]] == ["q0000", "q0002", "q0004"]
    assert [k.split("-")[0] for k in shard1["assigned"]] == ["q0001", "q0003", "q0005"]
    assert shard0["computed"] == shard0["assigned"] and shard1["computed"] == shard1["assigned"]
    assert {p.name.split("-")[0] for p in (out / "scores").glob("*.safetensors")} == {"rank000", "rank001"}

    # records are keyed by question, not by rank: one process resumes the 2-rank run entirely
    calls = count_calls(monkeypatch)
    assert main(["sweep", "--model", str(dist_setup[0]), "--data", str(dist_setup[1]), *SWEEP_ARGS,
                 "--out", str(out)]) == 0
    assert calls == [] and comparable(out) == comparable(dist_setup[2])


def test_killed_ranks_are_completed_by_a_rerun_and_an_elastic_restart(dist_setup, tmp_path):
    out = tmp_path / "killed"
    # rank 1 (questions 1, 3, 5) dies by SIGKILL once question 1 is written; torchrun stops rank 0.
    # A budget below one question's scores flushes them before each record is written.
    proc = torchrun(dist_setup, out, crash="1:1", extra=("--max-memory", "1e-6"))
    assert proc.returncode != 0
    assert not (out / "results.json").exists()
    before = {key: path.read_bytes() for key, path in records(out).items()}
    done = {k.split("-")[0] for k in before}
    assert "q0001" in done and not {"q0003", "q0005"} & done

    # the re-run: rank 1 dies again after question 3; torchrun's elastic restart finishes the job
    proc = torchrun(dist_setup, out, crash="1:1", max_restarts=1, extra=("--max-memory", "1e-6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shard0, shard1 = manifests(out)
    assert shard0["restart"] == shard1["restart"] == 1  # written by the restarted attempt
    after = records(out)
    assert len(after) == 6
    assert all(after[key].read_bytes() == data for key, data in before.items())  # never redone
    reused = set(shard0["reused"]) | set(shard1["reused"])
    computed = set(shard0["computed"]) | set(shard1["computed"])
    assert before.keys() <= reused and not computed & reused
    assert computed | (reused - before.keys()) == set(after) - before.keys()  # only the missing ones
    assert [k.split("-")[0] for k in shard1["reused"]] == ["q0001", "q0003"]  # q3: before the restart
    assert [k.split("-")[0] for k in shard1["computed"]] == ["q0005"]
    assert comparable(out) == comparable(dist_setup[2])
    assert_same_scores(out, dist_setup[2])
