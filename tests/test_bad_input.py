"""Bad input (issue 16): every case of docs/bad-input.md, at the command line where a user meets it.

A refusal is exit code 2 and exactly one line on stderr starting ``attrsparse: error:``, with the
files already there left byte for byte as they were.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, tiny_tokenizer

from attrsparse.cli import args as cli_args
from attrsparse.cli.experiments import _sweep_config
from attrsparse.cli.main import build_parser, main
from attrsparse.core import hub
from attrsparse.core.decoding import masked_loglik
from attrsparse.core.distributed import DistContext, run_sharded
from attrsparse.core.errors import UserError
from attrsparse.core.finite import NonFiniteError, check_finite
from attrsparse.core.io import atomic_save_tensors, atomic_write_json, read_json
from attrsparse.data.tasks import mc_correct
from attrsparse.experiments.sweep import SweepConfig

FIXTURES = Path(__file__).parent / "fixtures"
TQA = str(FIXTURES / "truthfulqa_3.csv")
WIKI = str(FIXTURES / "wikitext_tiny.txt")
TINY_SWEEP = ["--data", TQA, "--template", "paper", "--metrics", "gxo", "--limit", "1",
              "--max-new-tokens", "3", "--no-mc1"]
CALIB = ["--calib", WIKI, "--n-seq", "2", "--seq-len", "16"]


PROGRESS = re.compile(r"\d+/\d+ \[\d\d:\d\d|^\s*\d+(it|item|win)? \[\d\d:\d\d")  # tqdm bars of the work done


def refused(capsys, argv, *fragments) -> str:
    """``main(argv)`` exits 2 with exactly one line on stderr (besides the progress bars of work
    done before a failure found during the run), holding every fragment."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not PROGRESS.search(line)]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("attrsparse: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory):
    """The tiny Llama of ``llama_dir`` with one NaN weight, saved as a checkpoint."""
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan-llama")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


# -- 0. a fresh machine: the bundled data --------------------------------------------------------

def test_a_damaged_bundled_copy_is_refused(tmp_path, monkeypatch):
    from attrsparse.data.tasks import common, load_task

    copy = tmp_path / "bundled" / "truthfulqa"
    copy.mkdir(parents=True)
    (copy / "TruthfulQA.csv").write_bytes((common.BUNDLED_DIR / "truthfulqa" / "TruthfulQA.csv").read_bytes()[:-9])
    monkeypatch.delenv("ATTRSPARSE_DATA_DIR", raising=False)
    monkeypatch.setattr(common, "BUNDLED_DIR", tmp_path / "bundled")
    with pytest.raises(UserError, match="bundled truthfulqa/TruthfulQA.csv is damaged.*reinstall"):
        load_task("truthfulqa_gen", limit=1)


# -- 1. non-finite outputs stop the run ------------------------------------------------------------

def test_check_finite_names_the_model_and_the_place():
    check_finite(torch.tensor([0.0, -math.inf]), None, "x")  # -inf rules a token out: allowed
    with pytest.raises(NonFiniteError, match=r"model 'm' produced non-finite .* in the logits \(1 of 2\)"):
        model = torch.nn.Linear(1, 1)
        model._attrsparse_spec = "m"
        check_finite(torch.tensor([0.0, math.nan]), model, "the logits")
    with pytest.raises(UserError, match="multiple-choice"):
        mc_correct([math.nan, -1.0, -2.0], 0)  # max(..., key=...) over NaN picked the gold choice


def test_nan_model_log_likelihood_is_refused():
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="log-likelihood"):
        masked_loglik(model, torch.tensor([1, 5, 6]), torch.tensor([7, 8]), None)


def test_nan_model_evaluate_mc1_is_refused(capsys, nan_dir):
    refused(capsys, ["evaluate", "--model", nan_dir, "--task", "truthfulqa_mc1", "--data", TQA, "--limit", "2"],
            nan_dir, "non-finite", "log-likelihoods under dense")


def test_nan_model_sweep_stops_before_any_result(capsys, nan_dir, tmp_path):
    refused(capsys, ["sweep", "--model", nan_dir, *TINY_SWEEP, "--ratios", "0.5", "--out", str(tmp_path)],
            "non-finite", "dense greedy decoding")
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "records").exists()


def test_nan_model_generate_is_refused(capsys, nan_dir):
    refused(capsys, ["generate", "--model", nan_dir, "--prompt", "w1 w2", "--template", "raw",
                     "--max-new-tokens", "4"], "non-finite", "greedy decoding")


# -- 2. nothing overwritten --------------------------------------------------------------------------

def test_sweep_refuses_a_folder_of_another_configuration(capsys, llama_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["sweep", "--model", llama_dir, *TINY_SWEEP, "--ratios", "0.5,1.0", "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    refused(capsys, ["sweep", "--model", llama_dir, *TINY_SWEEP, "--ratios", "0.3,1.0", "--out", str(out)],
            "another configuration", "ratios 0.5,1.0 there, 0.3,1.0 now")
    refused(capsys, ["sweep", "--model", llama_dir, *TINY_SWEEP, "--ratios", "0.5,1.0", "--metrics", "magnitude",
                     "--out", str(out)], "metrics gxo there, magnitude now")
    assert snapshot(out) == before
    assert main(["sweep", "--model", llama_dir, *TINY_SWEEP, "--ratios", "0.5,1.0", "--out", str(out)]) == 0
    records = [p for p in snapshot(out) if p.startswith("records/")]
    assert {p: snapshot(out)[p] for p in records} == {p: before[p] for p in records}  # resumed, not redone


def test_sweep_refuses_a_folder_written_before_the_run_file(capsys, tmp_path):
    """Folders of earlier versions hold results.json only; its configuration is compared."""
    atomic_write_json(tmp_path / "results.json", {"config": {"model": "gemma3-270m", "requested_template": "auto",
                                                             "template": "chat", "ratios": [0.5]}})
    refused(capsys, ["sweep", "--ratios", "0.5", "--out", str(tmp_path)], "model gemma3-270m there, smollm2-135m now")


def test_calibrate_refuses_another_metric_unless_overwrite(capsys, llama_dir, tmp_path):
    out = tmp_path / "static"
    assert main(["calibrate", "--model", llama_dir, "--ratios", "0.5", "--metric", "gxo", *CALIB,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    refused(capsys, ["calibrate", "--model", llama_dir, "--ratios", "0.5", "--metric", "magnitude", *CALIB,
                     "--out", str(out)], "another configuration", "metric gxo there, magnitude now", "--overwrite")
    assert snapshot(out) == before
    assert main(["calibrate", "--model", llama_dir, "--ratios", "0.7", "--metric", "gxo", *CALIB,
                 "--out", str(out)]) == 0  # the same configuration: extended
    assert main(["calibrate", "--model", llama_dir, "--ratios", "0.5", "--metric", "magnitude", *CALIB,
                 "--overwrite", "--out", str(out)]) == 0
    assert json.loads((out / "static.json").read_text())["metric"] == "magnitude"


def test_export_over_an_earlier_export_keeps_the_users_files(capsys, llama_dir, tmp_path):
    static, out = tmp_path / "static", tmp_path / "export"
    assert main(["calibrate", "--model", llama_dir, "--ratios", "0.5", *CALIB, "--out", str(static)]) == 0
    # calibrated during the export: its calibration/ is written beside the model
    assert main(["export", "--model", llama_dir, "--ratio", "0.5", *CALIB, "--eval-seqs", "0",
                 "--out", str(out)]) == 0
    assert (out / "calibration" / "static.json").is_file()
    (out / "my-notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "data.bin").write_bytes(b"\x00")
    assert main(["export", "--model", llama_dir, "--ratio", "0.5", "--sparsity-from", str(static),
                 "--eval-seqs", "0", "--out", str(out)]) == 0
    assert (out / "my-notes.txt").read_text() == "mine" and (out / "mine" / "data.bin").read_bytes() == b"\x00"
    assert not (out / "calibration" / "static.json").exists()  # written by the tool, not by this export
    info = json.loads((out / "attrsparse_export.json").read_text())
    assert "config.json" in info["files"] and "my-notes.txt" not in info["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    capsys.readouterr()
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    refused(capsys, ["export", "--model", llama_dir, "--ratio", "0.5", "--sparsity-from", str(static),
                     "--eval-seqs", "0", "--out", str(other)], "not an attrsparse export")
    assert snapshot(other) == {"keep.txt": b"x"}


# -- 3. list options and selections --------------------------------------------------------------------

@pytest.mark.parametrize("argv,fragment", [
    (["compare", "--ratios", "0.5,1.5,nan,inf", "--out", "{out}"], "ratio must lie in (0, 1], got 1.5"),
    (["sweep", "--ratios", "0.5,,0.3", "--out", "{out}"], "empty item"),
    (["sweep", "--questions", "0,0", "--out", "{out}"], "--questions repeats"),
    (["sweep", "--questions", "0,1,2", "--limit", "2", "--out", "{out}"], "would drop 1 of the 3 questions"),
    (["sweep", "--questions", "0,1", "--offset", "1", "--out", "{out}"], "--offset"),
    (["score", "--prompt", "x", "--metrics", "gxo,,gxo"], "--metrics has an empty item"),
    (["train-predictor", "--eval-tasks", "wikitext2,,arc_easy", "--out", "{out}"], "--eval-tasks has an empty item"),
])
def test_bad_lists_are_refused_in_one_line(capsys, tmp_path, argv, fragment):
    out = tmp_path / "out"
    refused(capsys, [a.replace("{out}", str(out)) for a in argv], fragment)
    assert not out.exists()


def test_questions_without_limit_are_all_honoured():
    args = build_parser().parse_args(["sweep", "--questions", "4,0,30", "--out", "x"])
    config = _sweep_config(args)
    assert config.questions == [4, 0, 30] and config.limit is None
    assert _sweep_config(build_parser().parse_args(["sweep", "--out", "x"])).limit == 25
    with pytest.raises(UserError, match="would drop"):
        SweepConfig(questions=[1, 2, 3], limit=2).validate()


# -- 4. prompts longer than the model's context --------------------------------------------------------

LONG = " ".join(f"w{i % 60}" for i in range(100))  # 100 tokens; the tiny models' context is 64


def test_generate_refuses_a_prompt_past_the_context(capsys, llama_dir):
    refused(capsys, ["generate", "--model", llama_dir, "--prompt", LONG, "--template", "raw", "--max-new-tokens", "4"],
            "the prompt has 10", "context of model", "(64 tokens)", "--truncate left")


def test_generate_truncates_on_the_left_when_asked(capsys, llama_dir):
    assert main(["generate", "--model", llama_dir, "--prompt", LONG, "--template", "raw", "--max-new-tokens", "4",
                 "--truncate", "left", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "keeping its last 60" in err and json.loads(out)["new_tokens"][0] <= 4


@pytest.fixture
def long_question_csv(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("Question,Best Answer,Correct Answers,Incorrect Answers\n"
                    f"{LONG},w1,w1,w2\nw3 w4,w5,w5,w6\n")
    return str(path)


def test_sweep_refuses_a_long_question_before_any_work(capsys, llama_dir, tmp_path, long_question_csv):
    refused(capsys, ["sweep", "--model", llama_dir, "--data", long_question_csv, "--template", "paper",
                     "--metrics", "gxo", "--ratios", "0.5", "--max-new-tokens", "3", "--no-mc1",
                     "--out", str(tmp_path / "out")], "question 0 has", "--truncate left")
    assert not (tmp_path / "out" / "records").exists()


def test_evaluate_generation_refuses_or_truncates(capsys, llama_dir, long_question_csv):
    argv = ["evaluate", "--model", llama_dir, "--task", "truthfulqa_gen", "--data", long_question_csv,
            "--max-new-tokens", "3", "--limit", "2"]
    refused(capsys, argv, "question 0 has", "exceeds the context")
    assert main([*argv, "--truncate", "left"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 2 and "question 0 has" in err and "keeping its last" in err
    refused(capsys, [*argv, "--truncate", "right"], "--truncate must be one of none, left")


# -- 5. offline hub look-ups -------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """No hub: the probe connects to a local port nothing listens on (refused at once)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_PROBED", {})


@pytest.mark.parametrize("argv,fragments", [
    (["info", "--model", "no-such-org/no-such-model-xyz"], ["hub cannot be reached", "pass a local copy"]),
    (["info", "--model", "runs/my-export"], ["no such file or directory: runs/my-export"]),
    (["info", "--model", "./my-export"], ["no such file or directory"]),
    (["sweep", "--data", "my_truthfulqa", "--out", "{out}"], ["TruthfulQA 'my_truthfulqa'", "--data PATH"]),
    (["sweep", "--data", "data/my_truthfulqa.csv", "--out", "{out}"], ["not found", "no such file or directory"]),
])
def test_offline_lookups_fail_at_once_in_one_line(capsys, offline, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/my-export is then a path, not a hub id
    start = time.perf_counter()
    refused(capsys, [a.replace("{out}", str(tmp_path / "out")) for a in argv], *fragments)
    assert time.perf_counter() - start < 10  # in-process: no retries (the CLI's startup is in docs/bad-input.md)


def test_offline_wikitext_and_hub_offline_variable(capsys, llama_dir, offline, monkeypatch):
    refused(capsys, ["evaluate", "--model", llama_dir, "--task", "wikitext2", "--data", "my_wikitext"],
            "WikiText-2 'my_wikitext'", "--data PATH")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set"


# -- 6. output paths -------------------------------------------------------------------------------

COMMANDS_WITH_OUT = [
    ["sweep"], ["dependency"], ["demo"], ["compare"], ["bench"], ["calibrate"],
    ["export", "--ratio", "0.5"], ["train-predictor"],
]


@pytest.mark.parametrize("command", COMMANDS_WITH_OUT, ids=lambda c: c[0])
def test_out_naming_a_file_is_refused_before_any_work(capsys, tmp_path, command):
    target = tmp_path / "results.txt"
    target.write_text("precious")
    refused(capsys, [*command, "--out", str(target)], "exists and is not a directory")
    assert target.read_text() == "precious"


@pytest.mark.parametrize("out", ["/proc/attrsparse/run", "/proc/self"])
def test_out_under_proc_is_refused(capsys, out):
    refused(capsys, ["sweep", "--out", out], "cannot be written")


def test_out_on_a_read_only_filesystem_is_refused(capsys, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli_args.tempfile, "mkstemp", read_only)
    refused(capsys, ["calibrate", "--out", str(tmp_path / "a" / "b")], "cannot be written (Read-only file system)")
    assert list(tmp_path.iterdir()) == []  # the folders made for the probe are gone again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(capsys, tmp_path):
    tmp_path.chmod(0o555)
    try:
        refused(capsys, ["compare", "--out", str(tmp_path / "cmp")], "cannot be written")
    finally:
        tmp_path.chmod(0o755)


# -- 7. records that are valid JSON but lack a field -------------------------------------------------

def test_read_json_names_a_record_lacking_a_field(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text('{"mode": "dense"}')
    assert read_json(path) == {"mode": "dense"}
    assert read_json(path, required=("mode", "requested_ratio")) is None
    assert f"{path} lacks requested_ratio; recomputing it" in capsys.readouterr().err
    path.write_text("[1, 2]")
    assert read_json(path, required=("mode",)) is None


def test_run_sharded_recomputes_a_record_lacking_a_required_field(tmp_path, capsys):
    """The path of every resumable command's records (sweep, compare, and others on run_sharded)."""
    def work(pos, item):
        return {"pos": pos, "value": item}

    run_sharded([7, 8], lambda pos, item: f"r{pos}", work, tmp_path, ctx=DistContext(), progress=False)
    (tmp_path / "r1.json").write_text('{"pos": 1}')
    assert run_sharded([7, 8], lambda pos, item: f"r{pos}", work, tmp_path, ctx=DistContext(), progress=False,
                       required=("pos", "value")) == [{"pos": 0, "value": 7}, {"pos": 1, "value": 8}]
    assert f"{tmp_path / 'r1.json'} lacks value; recomputing it" in capsys.readouterr().err


def test_sweep_recomputes_a_record_lacking_a_field(capsys, llama_dir, tmp_path):
    argv = ["sweep", "--model", llama_dir, *TINY_SWEEP, "--ratios", "0.5,1.0", "--out", str(tmp_path)]
    assert main(argv) == 0
    (record,) = (tmp_path / "records").glob("q*.json")
    original = json.loads(record.read_text())
    for damage in ({k: v for k, v in original.items() if k != "dense_truth"},
                   {**original, "variants": [{k: v for k, v in original["variants"][0].items() if k != "metric"}]}):
        record.write_text(json.dumps(damage))
        capsys.readouterr()
        assert main(argv) == 0
        assert str(record) in capsys.readouterr().err
        assert json.loads(record.read_text()).keys() == original.keys()


# -- 8. durable, unpredictable temporary files -----------------------------------------------------

def test_atomic_tensor_save_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    import attrsparse.core.io as io

    atomic_save_tensors(tmp_path / "t.safetensors", {"x": torch.ones(2)})
    calls = []
    monkeypatch.setattr(io.os, "fsync", lambda fd: calls.append(fd))
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert calls  # flushed before the rename

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError):
        atomic_save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.safetensors"]
    assert io.load_tensors(tmp_path / "t.safetensors")["x"].tolist() == [1.0, 1.0]  # the old file stays


def test_atomic_tensor_save_takes_tensors_shared_between_keys(tmp_path):
    """A channel file stores a rule per ratio; attr_channel's scale is one tensor shared by all
    of them (and views of one storage), which safetensors alone refuses to save."""
    import attrsparse.core.io as io

    scale, base = torch.arange(3.0), torch.arange(6.0)
    atomic_save_tensors(tmp_path / "t.safetensors", {"r0.5/scale": scale, "r0.6/scale": scale,
                                                     "a": base[:3], "b": base[3:]})
    loaded = io.load_tensors(tmp_path / "t.safetensors")
    assert loaded["r0.5/scale"].tolist() == loaded["r0.6/scale"].tolist() == [0.0, 1.0, 2.0]
    assert loaded["b"].tolist() == [3.0, 4.0, 5.0]
