import numpy as np
import pandas as pd
import pytest

from loopdiag.analysis import plots
from loopdiag.analysis.depth import (
    IDLE_UPDATE,
    depth_accuracy,
    depth_findings,
    depth_rows,
    idle_from,
    matched_seeds,
    useful_loops,
)


def scaling_rows(arch: str, train_loops: int, accuracy_at, seeds=(0, 1)) -> pd.DataFrame:
    """Loop-scaling rows for depths 1, 2, 4 and K' = 1..K+2; `accuracy_at(hops, k)`."""
    rows = []
    for seed in seeds:
        for k in range(1, train_loops + 3):
            rows.append({"run_id": f"{arch}-k{train_loops}-s{seed}", "arch": arch,
                         "train_loops": train_loops, "seed": seed, "lr": 1e-3, "eval_loops": k,
                         "metric": "val_loss", "value": 1.0})
            for hops in (1, 2, 4):
                rows.append({"run_id": f"{arch}-k{train_loops}-s{seed}", "arch": arch,
                             "train_loops": train_loops, "seed": seed, "lr": 1e-3,
                             "eval_loops": k, "metric": f"accuracy_{hops}hop",
                             "value": accuracy_at(hops, k)})
    return pd.DataFrame(rows)


def deepening(hops, k):
    """Solves h hops from K' = h on: each loop computes one more hop."""
    return 1.0 if k >= hops else 0.1


def settled(hops, k):
    """Solves 1 hop from K' = 1 and nothing deeper, however many loops it runs."""
    return 1.0 if hops == 1 else 0.1


def solves_all(hops, k):
    """A seed that solves every depth at every loop count."""
    return 1.0


def test_depth_rows_read_the_hop_count_from_the_metric():
    rows = depth_rows(scaling_rows("flt", 4, deepening))
    assert set(rows["hops"]) == {1, 2, 4} and set(rows["metric"]) != {"val_loss"}
    assert depth_rows(scaling_rows("flt", 4, deepening).query("metric == 'val_loss'")).empty


def test_useful_loops_is_where_accuracy_stops_improving():
    accuracy = depth_accuracy(depth_rows(pd.concat([scaling_rows("looped", 8, deepening),
                                                     scaling_rows("flt", 8, settled)])))
    assert useful_loops(accuracy, "looped", 8) == 4  # the deepest task needs 4 loops
    assert useful_loops(accuracy, "flt", 8) == 1
    assert useful_loops(accuracy, "flt", 12) is None  # never trained at 12
    control = depth_accuracy(depth_rows(scaling_rows("standard", 8, deepening).query("eval_loops == 8")))
    assert useful_loops(control, "standard", 8) is None  # run at its own depth only


def test_accuracy_means_take_only_the_seeds_trained_at_every_k():
    rows = depth_rows(pd.concat([scaling_rows("looped", 1, deepening),
                                 scaling_rows("looped", 1, solves_all, seeds=(2,)),  # under way
                                 scaling_rows("looped", 4, deepening),
                                 scaling_rows("flt", 1, settled, seeds=(0,)),
                                 scaling_rows("flt", 4, settled, seeds=(1,))]))
    matched, left_out = matched_seeds(rows)
    assert set(matched.loc[matched["arch"] == "looped", "seed"]) == {0, 1}
    accuracy = depth_accuracy(matched)
    one_loop = accuracy.query("arch == 'looped' and train_loops == 1 and eval_loops == 1")
    assert one_loop.set_index("hops")["accuracy"].to_dict() == {1: 1.0, 2: 0.1, 4: 0.1}
    assert left_out == ["Seed 2 of looped left out of the accuracy means: not yet trained at K = 4.",
                        "flt: no seed trained at every K, so its accuracy means mix seeds."]
    assert set(matched.loc[matched["arch"] == "flt", "seed"]) == {0, 1}
    whole = depth_rows(scaling_rows("looped", 4, deepening))
    assert matched_seeds(whole)[0].equals(whole) and matched_seeds(whole)[1] == []


def test_idle_from_reads_the_end_of_training():
    steps = 20
    moving = np.full((steps, 6), 0.2)
    table = pd.DataFrame(moving, columns=range(1, 7))
    assert idle_from(table) is None
    table.iloc[:, 3:] = IDLE_UPDATE / 10  # loops 4-6 idle all along
    assert idle_from(table) == 4
    early_only = table.copy()
    early_only.iloc[-2:, :] = 0.2  # idle loops woke up in the last 10 % of records
    assert idle_from(early_only) is None


def test_findings_say_plainly_when_a_stable_model_does_not_use_its_loops():
    accuracy = depth_accuracy(depth_rows(pd.concat([scaling_rows("looped", 8, deepening),
                                                     scaling_rows("flt", 8, settled)])))
    lines = depth_findings(accuracy, idle={("flt", 8): 2, ("looped", 8): None},
                           stable={("flt", 8): True, ("looped", 8): True})
    flt = next(line for line in lines if line.startswith("flt"))
    looped = next(line for line in lines if line.startswith("looped"))
    assert "loops 2–8 move the stream by < 1 %" in flt
    assert "stable, but loops 2–8 add no accuracy" in flt and "do not compute" in flt
    assert "stops improving after loop 4" in looped and "do not compute" in looped
    assert "loops 5–8 add no accuracy" in looped
    unstable = depth_findings(accuracy, idle={}, stable={("flt", 8): False})
    assert not any("do not compute" in line for line in unstable if line.startswith("flt"))


def test_depth_plots_draw_from_the_frames():
    accuracy = depth_accuracy(depth_rows(pd.concat([scaling_rows("looped", 4, deepening),
                                                     scaling_rows("looped", 1, deepening),
                                                     scaling_rows("flt", 4, settled)])))
    updates = pd.DataFrame({"arch": "flt", "train_loops": 4, "loop": [1, 2, 3, 4],
                            "value": [np.nan, 0.3, 0.001, 0.0]})
    heatmap = plots.plot_depth_accuracy(accuracy)
    assert len(heatmap.axes) == 3  # two archs and the colour bar
    usefulness = plots.plot_loop_usefulness(updates, accuracy, IDLE_UPDATE)
    assert len(usefulness.axes) == 4


@pytest.mark.parametrize("metric", ["accuracy", "accuracy_hop", "accuracy_xhop", "val_loss"])
def test_other_metrics_are_not_depths(metric):
    frame = pd.DataFrame({"metric": [metric], "value": [0.5]})
    assert depth_rows(frame).empty
