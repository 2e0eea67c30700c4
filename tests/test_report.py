import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from attrsparse.experiments.plots import metric_colors, normalised_errors, plot_curves, plot_dependency
from attrsparse.experiments.report import PAPER_TABLE2, ordering_agreement, table2, write_csv, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "results_small.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results():
    return json.loads(FIXTURE.read_text())


@pytest.fixture
def dependency():
    rng = np.random.default_rng(0)
    bound = np.abs(rng.normal(1.0, 0.3, 500))
    err = np.clip(rng.normal(0.5, 0.2, 500), 0, 1) * bound
    return {"ratios": [0.1, 0.5, 0.9], "mlp_change_pct": [42, 62, 525],
            "heads_change_pct": [9, 8, 61],
            "error_samples": {"gxo_error": err.tolist(), "corrected_error": (err - bound / 2).tolist(),
                              "bound": bound.tolist()}}


def _md_table_after(text: str, heading: str) -> list[list[str]]:
    """Cells of the first markdown table after ``heading`` (separator row dropped)."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_write_report_creates_files(results, tmp_path, dependency):
    path = write_report(results, tmp_path, dependency)
    assert path == tmp_path / "report.md" and path.is_file()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    text = path.read_text()
    assert "smollm2-135m" in text and "`chat`" in text
    assert "25.0% of the maskable parameters" in text
    assert "![curves](curves.png)" in text
    assert "## Dependency analysis" in text and "within [0, bound]" in text
    assert "## Dependency analysis" not in write_report(results, tmp_path / "b").read_text()


def test_table2_layout(results, tmp_path):
    header, rows = table2(results)
    assert header == ["Metric", "30%", "50%", "100%", "n"]
    assert [r[0] for r in rows] == ["Magnitude", "GxO", "Corrected GxO"]  # paper's row order
    assert all(r[-1] == "3" for r in rows)
    assert [float(r[3].split()[0]) for r in rows] == [100.0, 100.0, 100.0]  # dense column
    text = write_report(results, tmp_path).read_text()
    table = _md_table_after(text, "## Table 2 layout")
    assert table[0] == header and [r[0] for r in table[1:]] == ["Magnitude", "GxO", "Corrected GxO"]
    assert table[3][1].startswith("55.6") and "±" in table[3][1]
    assert "Warning" not in text
    paper = _md_table_after(text, "The paper's own Table 2")
    assert paper[0][1:] == [f"AR={p}%" for p in (10, 20, 30, 40, 50, 60, 80, 100)]
    assert paper[-1] == ["Corrected GxO", "85.5", "92.0", "93.6", "94.7", "95.1", "96.3", "98.0",
                         "98.0"]
    assert len(paper) == 1 + len(PAPER_TABLE2)


def test_missing_cells_and_differing_n(results):
    results["aggregates"].append(dict(results["aggregates"][0], metric="ig", n_questions=2))
    results["aggregates"].append(dict(results["aggregates"][0], metric="recommended"))
    header, rows = table2(results, "bleu_vs_dense", "bleu_vs_dense_stderr")
    assert [r[0] for r in rows] == ["Magnitude", "IG", "GxO", "Corrected GxO", "recommended"]
    ig = rows[1]
    assert ig[1] == "21.4 ± 15.2" and ig[2] == ig[3] == "–" and ig[-1] == "2"


def test_mc1_null_shown_as_dash(results):
    _, rows = table2(results, "mc1", nd=3)
    assert rows[1][0] == "GxO" and rows[1][1] == "–"


@pytest.mark.parametrize("scores, verdict", [
    ({"corrected_gxo": 90, "gxo": 70, "ig": 72, "magnitude": 50, "snip": 40, "gradient": 5},
     "agrees"),
    ({"corrected_gxo": 90, "gxo": 72, "ig": 70, "magnitude": 50, "snip": 40, "gradient": 5},
     "agrees"),  # GxO ≈ IG agrees either way
    ({"corrected_gxo": 1, "gxo": 2, "magnitude": 3, "gradient": 4}, "disagrees"),
    ({"corrected_gxo": 60, "gxo": 10, "magnitude": 20}, "partly agrees (2 of 3 pairs)"),
    ({"corrected_gxo": 60, "gxo": 60}, "disagrees"),  # an observed tie is no agreement
    ({"corrected_gxo": 60, "recommended": 99}, "not comparable"),  # extras do not count
    ({"corrected_gxo": 60, "gxo": None, "magnitude": 20}, "agrees"),
])
def test_ordering_agreement(scores, verdict):
    assert ordering_agreement(scores).verdict == verdict


def test_ordering_agreement_counts():
    res = ordering_agreement({"corrected_gxo": 60, "gxo": 10, "ig": 5, "magnitude": 20})
    assert (res.agree, res.pairs) == (4, 6)  # cg>gxo, cg>ig, cg>mag, gxo~ig agree


def test_ranking_section(results, tmp_path):
    text = write_report(results, tmp_path).read_text()
    section = text[text.index("## Ranking"):text.index("## Statistical noise")]
    assert "**30%**: Corrected GxO 55.6 > Magnitude 21.4 > GxO 12.9" in section
    assert "partly agrees (2 of 3 pairs)" in section
    assert "**100%**" not in section
    assert "partly agrees (4 of 6 pairs)" in section


def test_write_csv(results, tmp_path):
    path = write_csv(results, tmp_path)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results["aggregates"]) == 9
    assert {"metric", "requested_ratio", "executed_ratio", "bleu_vs_dense_stderr", "mc1",
            "n_questions"} <= set(rows[0])
    assert sum(r["mc1"] == "" for r in rows) == 1


def test_plot_curves(results, tmp_path):
    paths = plot_curves(results, tmp_path)
    assert [p.name for p in paths] == ["curves.png", "curves.svg"]
    png, svg = (p.read_bytes() for p in paths)
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert b"<svg" in svg[:2000] and len(svg) > 10_000


def test_plot_dependency(dependency, tmp_path):
    paths = plot_dependency(dependency, tmp_path)
    assert [p.name for p in paths] == ["dependency.png", "dependency.svg"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC)
    only_change = {k: dependency[k] for k in ("ratios", "mlp_change_pct")}
    assert plot_dependency(only_change, tmp_path / "a")[0].read_bytes().startswith(PNG_MAGIC)
    only_errors = {"error_samples": dependency["error_samples"]}
    assert len(plot_dependency(only_errors, tmp_path / "b")) == 2
    assert plot_dependency({}, tmp_path / "c") == []


def test_normalised_errors(dependency):
    errs = normalised_errors(dependency)
    assert set(errs) == {"before", "after"}
    np.testing.assert_allclose(errs["after"], errs["before"] - 0.5)
    assert normalised_errors({"error_samples": {"gxo_error": [1.0]}}) == {}


def test_metric_colors_fixed_for_paper_metrics():
    a = metric_colors(["gxo", "foo", "corrected_gxo"])
    b = metric_colors(["corrected_gxo", "bar", "gxo", "foo"])
    assert a["gxo"] == b["gxo"] and a["corrected_gxo"] == b["corrected_gxo"]
    assert len({b["bar"], b["foo"], b["gxo"], b["corrected_gxo"]}) == 4
