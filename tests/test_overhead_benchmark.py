"""The probe-overhead benchmark at a tiny size: both models timed, every K a row, bad input
refused before anything is timed."""

import pytest
from benchmark_scripts import BENCHMARKS, loaded

TINY = ["--d-model", "16", "--seq-len", "8", "--batch", "2", "--repeats", "1"]


@pytest.fixture(scope="module")
def overhead():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # it imports the user-model benchmark's model
        yield from loaded("overhead.py", "overhead_benchmark")


def test_ours_and_a_users_looped_model_each_get_a_ratio_per_loop_count(overhead, capsys):
    overhead.main([*TINY, "--loops", "1", "3"])
    lines = capsys.readouterr().out.splitlines()
    titles = [i for i, line in enumerate(lines) if line.startswith(("loopdiag's", "a user's"))]
    assert [lines[i].split()[0] for i in titles] == ["loopdiag's", "a"]
    for title in titles:
        rows = [line.split() for line in lines[title + 2:title + 4]]
        assert [row[0] for row in rows] == ["1", "3"]
        assert all(float(row[1]) > 0 and row[2].endswith("x") and row[3].endswith("x") for row in rows)


def test_with_dropout_the_users_table_times_the_probes_with_and_without_the_rerun(overhead, capsys):
    overhead.main([*TINY, "--loops", "2", "--dropout", "0.1"])
    lines = capsys.readouterr().out.splitlines()
    ours, users = (lines.index(title) for title in lines if title.startswith(("loopdiag's", "a user's")))
    assert "no rerun" not in lines[ours + 1]  # our models hold no dropout
    assert "no rerun" in lines[users + 1]
    row = lines[users + 2].split()
    assert row[0] == "2" and all(cell.endswith("x") for cell in row[2:5])


def test_phases_time_each_part_of_a_step_plain_and_probed(overhead, capsys):
    overhead.main([*TINY, "--loops", "1", "2", "--phases"])
    lines = capsys.readouterr().out.splitlines()
    titles = [i for i, line in enumerate(lines) if "median ms per phase" in line]
    assert len(titles) == 2 and all("K = 2" in lines[i] for i in titles)
    for title in titles:
        assert lines[title + 1].split() == [*overhead.PHASES, "step"]
        plain, probed = (lines[title + row].split() for row in (2, 3))
        assert plain[0] == "plain" and probed[0] == "probed"
        assert float(plain[3]) == float(plain[5]) == 0  # no recorder calls in the plain step
        assert float(probed[3]) > 0 and float(probed[5]) > 0


@pytest.mark.parametrize("argv, message", [
    (["--dropout", "1"], "--dropout must lie in [0, 1)"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--loops", "4", "0"], "--loops must be at least 1"),
    (["--d-model", "20"], "must be even for rotary embeddings"),
    (["--d-model", "18"], "must be divisible by n_heads"),
])
def test_bad_input_is_refused_with_the_reason(overhead, capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        overhead.main([*TINY, *argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
