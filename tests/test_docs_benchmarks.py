"""benchmarks/run.py turns the bench scripts' printed tables into docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


@pytest.mark.parametrize(
    ("target", "ratio", "expected"),
    [
        ("<= 1.10x", "1.09x", "yes"),
        ("<= 1.10x slower", "1.05x", "yes"),  # a time ratio functx / anchor
        ("<= 1.10x slower", "1.20x", "**miss**"),
        ("<= 1.10x", "1.11x", "**miss**"),
        (">= 10x at n=256", "13.67x", "yes"),
        (">= 5x at n=256", "4.9x", "**miss**"),
        ("speed-up", "0.16x", "yes"),
        ("speed-up", "1.20x", "**miss**"),
        ("faster than original vhp", "0.98x", ""),  # not machine-checkable: left blank
        ("", "1.00x", ""),
    ],
)
def test_target_met(target, ratio, expected):
    assert run.target_met(target, ratio) == expected


@pytest.mark.parametrize(
    ("target", "speedup", "expected"),
    [
        (">= 10x at n=256", "13.67x", "yes"),
        ("<= 1.10x slower", "0.95x", "yes"),  # 1.05x slower
        ("<= 1.10x slower", "0.71x", "**miss**"),  # 1.41x slower
        ("<= 1.10x slower", "1.13x", "yes"),  # faster
        ("speed-up", "2.0x", "yes"),
    ],
)
def test_target_met_on_a_speedup_column(target, speedup, expected):
    assert run.target_met(target, speedup, higher_is_better=True) == expected


def test_to_markdown_marks_targets_drops_progress_and_demotes_headings():
    stdout = (
        "# core benchmarks\n"
        "  jacrev vs torch.func.jacrev: 1 ms\n"
        "| task | ratio | target |\n|---|---|---|\n"
        "| a | 1.05x | <= 1.10x |\n| b | 1.30x | <= 1.10x |\n"
        "\n| case | time |\n|---|---|\n| c | 1 ms |\n"
    )
    out = run.to_markdown(stdout).splitlines()
    assert out[0] == "### core benchmarks"
    assert not any("jacrev vs" in line for line in out)
    assert out[1:5] == [
        "| task | ratio | target | met |",
        "|---|---|---|---|",
        "| a | 1.05x | <= 1.10x | yes |",
        "| b | 1.30x | <= 1.10x | **miss** |",
    ]
    assert out[6:] == ["| case | time |", "|---|---|", "| c | 1 ms |"]  # no target column: unchanged


def test_write_page_replaces_measured_sections_and_keeps_the_others(tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    monkeypatch.setattr(run, "PAGE", page)
    old = {name: f"{run.BEGIN.format(name)}\nold {name}\n{run.END.format(name)}\n" for name in ("bench_a", "bench_b")}
    run.write_page(old, ["bench_a", "bench_b"])
    run.write_page(
        {"bench_b": f"{run.BEGIN.format('bench_b')}\nnew b\n{run.END.format('bench_b')}\n"}, ["bench_a", "bench_b"]
    )
    text = page.read_text()
    assert text.startswith(run.INTRO)
    assert "old bench_a" in text and "new b" in text and "old bench_b" not in text
    assert text.index("old bench_a") < text.index("new b")


def test_page_is_generated():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.startswith(run.INTRO), "docs/benchmarks.md is written by `python benchmarks/run.py --write-docs`"
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        assert run.BEGIN.format(script.stem) in text, f"no section for {script.name}: rerun run.py --write-docs"


def test_write_headline_fills_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{run.HEADLINE_BEGIN}\nold\n{run.HEADLINE_END}\n\n## after\n")
    run.write_headline(
        "# core\n  progress\n| task | ratio | target |\n|---|---|---|\n| a | 0.5x | <= 1.10x |\n", readme
    )
    text = readme.read_text()
    assert "old" not in text and "| a | 0.5x | <= 1.10x | yes |" in text and text.endswith("\n## after\n")
    assert "torch " in text  # when and where it was measured
