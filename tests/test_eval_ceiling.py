"""`python -m eval ceiling`: ShapesCLIP's zero-shot accuracy on the ground truth, real and autoencoded."""
from pathlib import Path

import pandas as pd

from eval.cli import main

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "data" / "suites"


def test_ceiling_on_the_shipped_models_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "ceiling"
    assert main(["ceiling", "--suite", str(SUITES / "shapes.yaml"), "--limit", "16", "--out", str(out)]) == 0
    df = pd.read_csv(out / "ceiling.csv")
    assert 0 < len(df) <= 16 and set(df["size"]) <= {"small", "large"}
    for name in ("real", "autoencoder"):  # "correct" is exactly: the predicted pair is the prompted one
        match = (df[f"{name}_shape"] == df["shape"]) & (df[f"{name}_color"] == df["color"])
        assert (match == df[f"{name}_correct"]).all()
    assert df.real_correct.mean() > 0.3  # the shipped classifier is far above chance (1/48) on real renders
    text = (out / "ceiling.md").read_text()
    assert "--limit 16`" in text   # the report says which edits it read
    assert f"| all | {len(df)} | {100 * df.real_correct.mean():.1f}% | {100 * df.autoencoder_correct.mean():.1f}%" in text
    assert (out / "shape_confusion.png").stat().st_size > 0
    assert "| large |" in capsys.readouterr().out


def test_ceiling_needs_shapesworld_and_an_autoencoder(tmp_path, capsys):
    assert main(["ceiling", "--suite", str(SUITES / "folder_example.yaml"), "--out", str(tmp_path / "a")]) == 2
    assert "needs ShapesWorld ground truth" in capsys.readouterr().err
    assert main(["ceiling", "--suite", str(SUITES / "shapes.yaml"), "--autoencoder", str(tmp_path / "none"),
                 "--out", str(tmp_path / "b")]) == 2
    assert "pass --autoencoder FOLDER" in capsys.readouterr().err
    removals = tmp_path / "remove.yaml"
    removals.write_text("dataset: shapesworld\nsplit: val\nintents: [remove]\nnum_samples: 3\n")
    assert main(["ceiling", "--suite", str(removals), "--out", str(tmp_path / "c")]) == 2
    assert "has no object edits" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()

