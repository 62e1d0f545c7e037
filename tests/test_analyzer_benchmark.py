"""The analyzer benchmark's synthetic store, at a small size."""

import pytest
from benchmark_scripts import loaded

from loopdiag.analysis import suite_table
from loopdiag.store import load_suite, read_records


@pytest.fixture(scope="module")
def bench():
    yield from loaded("analyzer.py", "analyzer_benchmark")


def test_the_synthetic_store_holds_the_recorders_keys(bench, tmp_path):
    store = bench.build_store(tmp_path / "runs", runs=5, steps=30, loops=6)
    template = bench.template_records()[0]
    records = read_records(store / "looped-k06-s0")
    assert len(records) == 30 and set(records[0]) == set(template)
    assert len(records[0]["resid_norm"]) == 6
    table = suite_table(load_suite(store))
    assert len(table) == 5 and set(table["status"]) == {"stable"}
    assert table["final_loss"].notna().all() and table["resid_growth_steps"].notna().all()


@pytest.mark.slow
def test_a_small_benchmark_runs_end_to_end(bench, tmp_path):
    results = bench.main(["--runs", "4", "--steps", "50", "--loops", "4", "--jobs", "2",
                          "--cache", str(tmp_path)])
    assert set(results) == {"cold report, --jobs 1", "cold report, --jobs 2", "warm report",
                            "warm analyze"}
    assert all(wall > 0 and peak > 50 for wall, peak in results.values())  # MiB: a Python with pandas
