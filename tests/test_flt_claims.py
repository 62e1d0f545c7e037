"""The FLT-claims script's rules, on synthetic suite tables (no training, no run store)."""

import math

import numpy as np
import pandas as pd
import pytest
from benchmark_scripts import loaded

LRS = (3e-3, 1e-2, 3e-2, 1e-1)
LOOPS = (1, 2, 4, 6, 9, 12)


@pytest.fixture(scope="module")
def claims():
    yield from loaded("flt_claims.py", "flt_claims")


def runs(arch, loops=LOOPS, lrs=LRS, seeds=(0, 1), **fields):
    """Healthy runs with `suite_table`'s columns, one per (K, lr, seed)."""
    return [{"run_id": f"{arch}-k{k}-s{seed}-lr{lr:g}", "arch": arch, "n_loops": k, "lr": lr,
             "seed": seed, "status": "stable", "failure_step": math.nan, "final_val_loss": 2.0,
             "resid_growth_steps": 1.0, "oscillation": 0.01, "first_warning_step": math.nan, **fields}
            for k in loops for lr in lrs for seed in seeds]


def suite(*groups):
    return pd.DataFrame([row for group in groups for row in group])


def change(table, arch, n_loops, lr=None, seed=None, **fields):
    """Set `fields` on the runs of (arch, K), optionally one lr and one seed."""
    chosen = (table["arch"] == arch) & (table["n_loops"] == n_loops)
    if lr is not None:
        chosen &= np.isclose(table["lr"], lr)
    if seed is not None:
        chosen &= table["seed"] == seed
    for column, value in fields.items():
        table.loc[chosen, column] = value
    return table


def failures(judged):
    return {run.run_id: run.failure for run in judged[judged["failed"]].itertuples()}


# --- the FAILED rule -------------------------------------------------------------------

def test_failed_by_verdict_or_by_training_worse_than_one_loop(claims):
    table = suite(runs("looped", loops=(1, 4), lrs=(3e-3,), final_val_loss=1.0))
    change(table, "looped", 4, seed=0, final_val_loss=1.1)  # exactly 10% worse: failed to train
    change(table, "looped", 4, seed=1, final_val_loss=1.09, status="collapsed", failure_step=50.0)
    assert failures(claims.judge_runs(table)) == {"looped-k4-s0-lr0.003": "failed to train",
                                                  "looped-k4-s1-lr0.003": "collapsed"}


def test_just_under_ten_percent_worse_is_not_failed(claims):
    table = change(suite(runs("flt", loops=(1, 4), lrs=(3e-3,), final_val_loss=1.0)), "flt", 4, final_val_loss=1.09)
    assert not claims.judge_runs(table)["failed"].any()


@pytest.mark.parametrize("reference", ["collapsed", "missing", "nan"])
def test_without_a_sound_one_loop_reference_only_the_verdict_counts(claims, reference):
    table = change(suite(runs("looped", loops=(1, 4), lrs=(3e-3,), final_val_loss=1.0)),
                   "looped", 4, final_val_loss=5.0)
    if reference == "collapsed":
        change(table, "looped", 1, status="collapsed", failure_step=10.0)
    elif reference == "missing":
        table = table[table["n_loops"] == 4]
    else:
        change(table, "looped", 1, final_val_loss=math.nan)
    judged = claims.judge_runs(table)
    assert not judged.loc[judged["n_loops"] == 4, "failed"].any()


def test_one_loop_runs_are_judged_by_verdict_and_interrupted_runs_left_out(claims):
    table = change(suite(runs("flt", loops=(1,), lrs=(3e-3,))), "flt", 1, seed=1, status="interrupted")
    judged = claims.judge_runs(table)
    assert list(judged["run_id"]) == ["flt-k1-s0-lr0.003"] and not judged["failed"].any()


def test_stable_lrs_and_the_table_of_them(claims):
    table = suite(runs("looped", loops=(1, 12)), runs("flt", loops=(1,)))
    change(table, "looped", 12, lr=3e-2, seed=1, status="diverged")
    change(table, "looped", 12, lr=1e-1, status="collapsed")
    judged = claims.judge_runs(table)
    assert claims.stable_lrs(judged, "looped", 12) == {3e-3, 1e-2}
    shown = claims.stable_lr_table(judged).set_index("arch")
    assert shown.loc["looped", "K=12"] == "3e-3, 1e-2" and shown.loc["flt", "K=12"] == "not run"
    change(table, "flt", 1, status="collapsed")
    assert claims.stable_lr_table(claims.judge_runs(table)).set_index("arch").loc["flt", "K=1"] == "none"


# --- the claims ------------------------------------------------------------------------

def verdict(claims, table, claim, events=None, scaling=None, task=None):
    judged = claims.judge_runs(table)
    events = pd.DataFrame({"run_id": [], "detector": []}) if events is None else events
    return claims.judge_claims(judged, events, pd.DataFrame() if scaling is None else scaling, task)[claim]


def test_c1_looped_collapse(claims):
    table = suite(runs("looped", loops=(1, 12)))
    assert verdict(claims, table, "C1").verdict == "contradicted"
    half = change(table.copy(), "looped", 12, lr=3e-3, seed=0, status="collapsed", failure_step=40.0)
    assert verdict(claims, half, "C1").verdict == "supported"
    narrower = change(table.copy(), "looped", 12, lr=1e-2, seed=1, status="collapsed", failure_step=40.0)
    judgement = verdict(claims, narrower, "C1")
    assert judgement.verdict == "supported" and "⊂" in judgement.reason
    # K=12 loses 1e-2 but gains 3e-2, where K=1 fails: neither rule holds.
    shifted = change(narrower, "looped", 1, lr=3e-2, status="diverged")
    assert verdict(claims, shifted, "C1").verdict == "cannot tell"


def symptoms_suite(looped_growth, looped_oscillation, failed_seeds=(0, 1)):
    table = suite(runs("looped", loops=(12,), lrs=(3e-3,)), runs("flt", loops=(12,), lrs=(3e-3,)))
    table = change(table, "flt", 12, resid_growth_steps=2.0, oscillation=0.05)
    for seed in failed_seeds:
        change(table, "looped", 12, seed=seed, status="collapsed", failure_step=120.0, first_warning_step=60.0,
               resid_growth_steps=looped_growth, oscillation=looped_oscillation)
    return table


def test_c2_symptoms_of_the_looped_collapse(claims):
    plateau = pd.DataFrame({"run_id": ["looped-k12-s0-lr0.003"], "detector": ["collapse_plateau"]})
    judgement = verdict(claims, symptoms_suite(50.0, 0.3), "C2", events=plateau)
    assert judgement.verdict == "supported"
    text = claims.to_markdown(judgement.evidence)
    assert "2 of 2 looped K=12 runs FAILED; 1 of them had a collapse_plateau" in text
    assert "2 had a first warning before it" in text
    assert verdict(claims, symptoms_suite(1.0, 0.01), "C2").verdict == "contradicted"
    assert verdict(claims, symptoms_suite(50.0, 0.01), "C2").verdict == "cannot tell"
    assert verdict(claims, symptoms_suite(50.0, 0.3, failed_seeds=(0,)), "C2").verdict == "cannot tell"


def test_c3_flt_stable_to_twelve_loops(claims):
    table = suite(runs("flt", loops=(1, 12)), runs("looped", loops=(1,)))
    assert verdict(claims, table, "C3").verdict == "supported"
    lost = change(table.copy(), "flt", 12, lr=1e-2, seed=0, status="collapsed", failure_step=30.0)
    assert verdict(claims, lost, "C3").verdict == "cannot tell"
    change(lost, "flt", 12, lr=3e-3, seed=1, final_val_loss=2.5)  # failed to train at the default lr
    assert verdict(claims, lost, "C3").verdict == "contradicted"


def test_c4_flt_res_collapses(claims):
    table = suite(runs("flt-res"), runs("flt"))
    assert verdict(claims, table, "C4").verdict == "contradicted"
    broken = change(table.copy(), "flt-res", 6, lr=1e-2, seed=1, status="collapsed", failure_step=80.0)
    judgement = verdict(claims, broken, "C4")
    assert judgement.verdict == "supported" and "K=6, lr 1e-2" in judgement.reason
    # flt-res fails at K=12, lr 3e-3, but so does flt: no cell where only the ablation fails.
    both = change(table.copy(), "flt-res", 12, lr=3e-3, status="diverged")
    assert verdict(claims, change(both, "flt", 12, lr=3e-3, status="diverged"), "C4").verdict == "cannot tell"


def paired_suite(flt_offsets):
    table = suite(runs("looped", loops=(2, 4)), runs("flt", loops=(2, 4)))
    table.loc[table["arch"] == "flt", "final_val_loss"] = 2.0 + np.asarray(flt_offsets)
    return table


def test_c5_flt_better_where_looped_trains(claims):
    rng = np.random.default_rng(0)
    better = verdict(claims, paired_suite(-0.05 + rng.normal(0, 0.01, 16)), "C5")
    assert better.verdict == "supported" and "n = 16 pairs" in better.reason
    assert verdict(claims, paired_suite(0.05 + rng.normal(0, 0.01, 16)), "C5").verdict == "contradicted"
    assert verdict(claims, paired_suite(np.tile([-0.05, 0.05], 8)), "C5").verdict == "cannot tell"
    table = change(paired_suite(-0.05 + rng.normal(0, 0.01, 16)), "looped", 4, status="collapsed", failure_step=9.0)
    assert "n = 8 pairs" in verdict(claims, table, "C5").reason  # failed looped runs are not paired


def scaling(arch, ratio, metric="val_loss", value=2.0, lr=3e-3):
    rows = []
    for k in (2, 4, 6, 9):
        for seed in (0, 1):
            base = {"run_id": f"{arch}-k{k}-s{seed}", "arch": arch, "train_loops": k, "seed": seed, "lr": lr,
                    "metric": metric}
            rows += [{**base, "eval_loops": 1, "value": 9.0}, {**base, "eval_loops": k, "value": value},
                     {**base, "eval_loops": 12, "value": value * ratio}]
    return pd.DataFrame(rows)


def test_c6_loop_count_at_inference(claims):
    table = suite(runs("flt", loops=(1,)))
    fine = pd.concat([scaling("flt", 1.02), scaling("looped", 1.8), scaling("flt", 9.0, lr=1e-2)])
    task = pd.concat([scaling("flt", 0.9, "accuracy", 0.5), scaling("looped", 0.1, "accuracy", 0.5)])
    judgement = verdict(claims, table, "C6", scaling=fine, task=task)
    assert judgement.verdict == "supported" and "looped median 1.8" in judgement.reason
    assert "0.45" in claims.to_markdown(judgement.evidence)  # flt accuracy at K'=12
    assert verdict(claims, table, "C6", scaling=scaling("flt", 1.2)).verdict == "contradicted"
    assert verdict(claims, table, "C6", scaling=scaling("flt", 1.07)).verdict == "cannot tell"
    assert verdict(claims, table, "C6").verdict == "cannot tell"


def test_markdown_shows_each_rule_beside_its_verdict(claims):
    table = suite(runs("looped"), runs("flt"), runs("flt-res"))
    judged = claims.judge_runs(table)
    judgements = claims.judge_claims(judged, pd.DataFrame({"run_id": [], "detector": []}), pd.DataFrame())
    spec = {"model": {"d_model": 64, "n_heads": 4, "n_layers": 2, "seq_len": 64, "vocab_size": 256},
            "train": {"batch_size": 8}, "steps": 200, "archs": ["looped", "flt", "flt-res"],
            "loops": list(LOOPS), "lrs": list(LRS), "seeds": [0, 1]}
    text = claims.claims_markdown(judgements, judged, claims.scale_text(spec, table), "python benchmarks/flt_claims.py")
    assert "d_model 64" in text and "The grid plans 144 runs" in text
    for key, (claim, rule) in claims.RULES.items():
        assert f"## {key}. {claim}\n\nRule (fixed before the runs): {rule}\n\n**Verdict: " in text
    assert "## Stable learning rates per architecture and K" in text
    assert text.rstrip().endswith("`python benchmarks/flt_claims.py`.")
