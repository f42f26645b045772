"""`python -m eval gate`: the shipped models' quality targets, read from a quality run's summary.csv."""
import pandas as pd
import pytest

from eval.cli import main
from eval.gate import evaluate


def _summary(tmp_path, lazy_acc, full_acc, lazy_bg, full_bg):
    base = dict(n=500, n_object_edits=300, prompt_acc_ceiling=0.9, n_remove=100, bg_mae_input=90.0)
    rows = [dict(base, method="lazy", prompt_acc=lazy_acc, bg_mae=lazy_bg),
            dict(base, method="regenerate-image", prompt_acc=full_acc, bg_mae=full_bg),
            dict(base, method="regenerate-crop", prompt_acc=0.5, bg_mae=9.0)]
    pd.DataFrame(rows).to_csv(tmp_path / "summary.csv", index=False)
    return str(tmp_path)


def test_gate_passes_and_writes_table(tmp_path, capsys):
    run = _summary(tmp_path, 0.70, 0.75, 5.0, 4.5)
    assert main(["gate", run]) == 0
    md = (tmp_path / "gate.md").read_text()
    assert md.count("PASS") == 3 and "regenerate-crop" in md and "90.0%" in md  # ceiling reported


@pytest.mark.parametrize("lazy_acc,full_acc,lazy_bg,full_bg,failing", [
    (0.59, 0.60, 5.0, 5.0, 0),     # below 60%
    (0.65, 0.80, 5.0, 5.0, 1),     # 15 points behind RegenerateImage
    (0.70, 0.70, 6.5, 5.0, 2),     # background error 1.3x
])
def test_gate_fails_each_criterion(tmp_path, lazy_acc, full_acc, lazy_bg, full_bg, failing):
    checks, _ = evaluate(_summary(tmp_path, lazy_acc, full_acc, lazy_bg, full_bg))
    assert [ok for *_, ok in checks] == [i != failing for i in range(3)]
    assert main(["gate", str(tmp_path)]) == 1


def test_gate_without_a_run_says_what_to_do(tmp_path, capsys):
    assert main(["gate", str(tmp_path / "missing")]) == 2
    assert "python -m eval quality" in capsys.readouterr().err


def test_gate_reports_paired_bootstrap_intervals(tmp_path):
    import numpy as np

    from eval.gate import intervals

    rng = np.random.default_rng(1)
    n = 400
    lazy_ok, full_ok = rng.random(n) < 0.4, rng.random(n) < 0.5
    lazy_bg, full_bg = rng.uniform(5, 25, n), rng.uniform(5, 20, n)
    per = pd.concat([pd.DataFrame({"method": m, "sample_id": [f"s{i}" for i in range(n)],
                                   "prompt_correct": np.where(np.arange(n) < 250, ok, None),
                                   "bg_mae": np.where(np.arange(n) >= 250, bg, None)})
                     for m, ok, bg in (("lazy", lazy_ok, lazy_bg), ("regenerate-image", full_ok, full_bg))])
    per.to_csv(tmp_path / "per_sample.csv", index=False)
    acc_l, acc_f = lazy_ok[:250].mean(), full_ok[:250].mean()
    ratio = lazy_bg[250:].mean() / full_bg[250:].mean()
    ci = intervals(tmp_path / "per_sample.csv", "lazy", "regenerate-image")
    assert ci["prompt_acc"][0] < acc_l < ci["prompt_acc"][1] and ci["prompt_acc"][1] - ci["prompt_acc"][0] < 0.15
    assert ci["acc_gap"][0] < acc_f - acc_l < ci["acc_gap"][1]
    assert ci["bg_ratio"][0] < ratio < ci["bg_ratio"][1]
    checks, md = evaluate(_summary(tmp_path, acc_l, acc_f, lazy_bg[250:].mean(), full_bg[250:].mean()))
    assert "95% interval" in md and f"{ci['bg_ratio'][0]:.2f}x" in md
    assert intervals(tmp_path / "none.csv", "lazy", "regenerate-image") == {}
    (tmp_path / "per_sample.csv").write_text("")   # truncated: the gate still runs, without intervals
    with pytest.warns(UserWarning, match="unreadable"):
        checks2, _ = evaluate(str(tmp_path))
    assert checks2 == checks


def test_gate_refuses_a_run_without_shapesworld_columns(tmp_path, capsys):
    pd.DataFrame([dict(method=m, n=4, fid=1.0) for m in ("lazy", "regenerate-image")]).to_csv(
        tmp_path / "summary.csv", index=False)   # a folder suite's run: no prompt accuracy, no background error
    assert main(["gate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a run of a ShapesWorld suite" in err and "Traceback" not in err
    assert not (tmp_path / "gate.md").exists()


def test_gate_says_which_edits_it_read(tmp_path):
    import json

    run = _summary(tmp_path, 0.70, 0.75, 5.0, 4.5)
    (tmp_path / "run.json").write_text(json.dumps({"suite": "data/suites/shapes.yaml", "limit": 8,
                                                   "suite_raw": {"name": "shapesworld-test", "split": "test"}}))
    _, md = evaluate(run)
    assert "500 edits (--limit 8); the targets are set for the 500 edits of the test split" in md
    (tmp_path / "run.json").write_text(json.dumps({"suite": "data/suites/shapes.yaml", "limit": None,
                                                   "suite_raw": {"name": "shapesworld-test", "split": "test"}}))
    _, md = evaluate(run)
    assert "`data/suites/shapes.yaml` (shapesworld-test, split test), 500 edits\n" in md
