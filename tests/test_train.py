"""Training package (lazydiff.train): config validation, the CLI, exact resume, time boxes, exports that
load, corrupt checkpoints and PixArt-α initialisation. Tiny architectures at 32x32, a few steps each, CPU."""
import copy
import json
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lazydiff.train import MODELS, TrainConfig, train
from lazydiff.train import loop
from lazydiff.train.__main__ import main as cli_main
from lazydiff.train.image_folder import load_rows
from lazydiff.train.objectives import OBJECTIVES, AutoencoderObjective

REPO = Path(__file__).resolve().parent.parent

# 3 blocks = 4x down like the shipped autoencoder (32 px -> 8x8 latent -> 4x4 tokens of patch 2);
# norm_num_groups must divide every block width.
AE_ARCH = dict(block_out_channels=[8, 8, 16], down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=4, latent_channels=4)
LAZY_ARCH = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8,
                 encoder_layers=1, encoder_heads=2, encoder_head_dim=8)
REGEN_ARCH = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8)
CLIP_ARCH = dict(embed_dim=16,
                 vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
                 text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=1))
ARCH = {"autoencoder": AE_ARCH, "lazy": LAZY_ARCH, "regenerate_image": REGEN_ARCH, "shapes_clip": CLIP_ARCH}
BASE = dict(steps=2, batch_size=2, image_size=32, num_workers=0, log_every=1, checkpoint_every=1000, warmup_steps=2)


def _raw(model, out, autoencoder=None, **kw):
    raw = dict(BASE, model=model, output_dir=str(out), arch=copy.deepcopy(ARCH[model]))
    if model == "shapes_clip":
        raw["batch_size"] = 4  # the contrastive loss wants a few pairs
    if model in ("lazy", "regenerate_image"):
        raw["autoencoder"] = str(autoencoder)
    raw.update(kw)
    return raw


def _cfg(model, out, autoencoder=None, **kw) -> TrainConfig:
    return TrainConfig.from_dict(_raw(model, out, autoencoder, **kw))


def _ckpt(out, step) -> Path:
    return Path(out) / "checkpoints" / f"step-{step}"


def _state(out, step):
    with open(_ckpt(out, step) / "state.json") as f:
        return json.load(f)


def _log_values(log):
    """The log without wall-clock times."""
    return [(r["step"], r["loss"], r["lr"]) for r in log]


def _assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {len(diff)} tensors differ, e.g. {diff[:3]}"


def _assert_same_optimizer(path_a, path_b):
    a = torch.load(path_a, map_location="cpu", weights_only=True)
    b = torch.load(path_b, map_location="cpu", weights_only=True)
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][name]), f"optimizer state {k}.{name} differs"


# ----------------------------------------------------------------------------- shared tiny runs
REAL_PLOT_LOSS = loop.plot_loss


@pytest.fixture(scope="module", autouse=True)
def _no_loss_plots():
    """matplotlib costs ~0.3 s per checkpoint; only test_loss_csv_and_plot_are_written draws the plot."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "plot_loss", lambda log, path, title: None)
        yield


@pytest.fixture(scope="module")
def autoencoder_export(tmp_path_factory):
    """A tiny AutoencoderKL trained for 2 steps; its export feeds the latent-diffusion runs."""
    out = tmp_path_factory.mktemp("ae")
    export = train(_cfg("autoencoder", out, export_dtype="float32"))
    assert (export / "config.json").exists()
    return export


@pytest.fixture(scope="module")
def lazy_export(tmp_path_factory, autoencoder_export):
    out = tmp_path_factory.mktemp("lazy")
    return train(_cfg("lazy", out, autoencoder_export, export_raw=True))


@pytest.fixture(scope="module")
def regen_export(tmp_path_factory, autoencoder_export):
    out = tmp_path_factory.mktemp("regen")
    return train(_cfg("regenerate_image", out, autoencoder_export))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, autoencoder_export, lazy_export, regen_export):
    """The data/models layout of lazydiff.defaults, assembled from the tiny exports (symlinks)."""
    root = tmp_path_factory.mktemp("models")
    (root / "autoencoder").symlink_to(autoencoder_export, target_is_directory=True)
    (root / "lazy").symlink_to(lazy_export, target_is_directory=True)
    (root / "regenerate-image").symlink_to(regen_export, target_is_directory=True)
    return root


# ----------------------------------------------------------------------------- 1. config and CLI
def test_config_unknown_key_names_it_and_suggests_close_match(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'stpes' \(did you mean 'steps'\?\)"):
        TrainConfig.from_dict({"model": "autoencoder", "output_dir": str(tmp_path), "stpes": 10})
    path = tmp_path / "typo.yaml"
    path.write_text("model: autoencoder\noutput_dir: x\nbatch_sise: 4\n")
    with pytest.raises(ValueError) as err:
        TrainConfig.load(str(path))
    msg = str(err.value)
    assert str(path) in msg and "'batch_sise'" in msg and "did you mean 'batch_size'" in msg


def test_config_unknown_key_without_close_match_lists_allowed_keys():
    with pytest.raises(ValueError, match="unknown key 'zzzqqq'") as err:
        TrainConfig.from_dict({"model": "autoencoder", "output_dir": "x", "zzzqqq": 1})
    assert "did you mean" not in str(err.value) and "allowed keys:" in str(err.value)


@pytest.mark.parametrize("missing", ["model", "output_dir"])
def test_config_missing_required_key(missing):
    raw = {"model": "autoencoder", "output_dir": "x"}
    del raw[missing]
    with pytest.raises(ValueError, match=f"missing required key '{missing}'"):
        TrainConfig.from_dict(raw)


def test_config_bad_model_name():
    with pytest.raises(ValueError, match=r"model must be one of .*got 'lazzy'"):
        TrainConfig.from_dict({"model": "lazzy", "output_dir": "x"})


@pytest.mark.parametrize("model", ["lazy", "regenerate_image"])
def test_config_latent_diffusion_needs_autoencoder(model):
    with pytest.raises(ValueError, match=f"model '{model}' needs `autoencoder:`"):
        TrainConfig.from_dict({"model": model, "output_dir": "x"})
    assert TrainConfig.from_dict({"model": model, "output_dir": "x", "autoencoder": "ae"}).autoencoder == "ae"


@pytest.mark.parametrize("key,value,match", [("mixed_precision", "fp8", "mixed_precision"),
                                             ("steps", 0, "steps and batch_size"),
                                             ("batch_size", 0, "steps and batch_size"),
                                             ("lr_schedule", "linear", "'cosine' or 'constant'"),
                                             ("hole_crops", 1.5, "between 0 and 1"),
                                             ("hole_crops", 0.5, "applies to model"),
                                             ("data_echo", 0, "data_echo is how many steps"),
                                             ("snr_gamma", 5, "snr_gamma weights the diffusion loss"),
                                             ("object_loss_weight", -1.0, "non-negative weight"),
                                             ("object_loss_weight", 5.0, "for model 'autoencoder' only")])
def test_config_rejects_bad_values(key, value, match):
    model = "lazy" if (key, value) == ("object_loss_weight", 5.0) else "autoencoder"
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({"model": model, "output_dir": "x", "autoencoder": "a", key: value})


def test_config_missing_file_says_where_to_look(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/train"):
        TrainConfig.load(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("name", ["autoencoder", "lazy", "regenerate_image", "shapes_clip"])
def test_shipped_configs_validate_and_overrides_win(name):
    cfg = TrainConfig.load(str(REPO / "configs" / "train" / f"{name}.yaml"), {"steps": 7, "output_dir": "elsewhere"})
    assert cfg.model == name and cfg.model in MODELS
    assert cfg.steps == 7 and cfg.output_dir == "elsewhere"
    assert isinstance(cfg.lr, float) and cfg.lr > 0


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").rglob("*.yaml")), ids=lambda p: p.stem
                         if p.parent.name == "train" else f"{p.parent.name}/{p.stem}")
def test_every_config_in_the_repo_validates(path):
    cfg = TrainConfig.load(str(path))
    stem = path.stem.removesuffix("_continue").removesuffix("_stage3").removesuffix("_stage4").removesuffix("_stage5") \
        .removesuffix("_holes").removesuffix("_decoder_objects").removesuffix("_decoder").removesuffix("_own_images")
    assert cfg.model == stem
    base = TrainConfig.load(str(REPO / "configs" / "train" / f"{stem}.yaml"))
    assert cfg.arch == base.arch  # variants (CPU recipe, stage 2) train the shipped architecture
    if path.stem.endswith("_continue"):
        assert cfg.init_from and cfg.seed != base.seed  # fresh data, from the stage-1 export
    if path.stem.endswith("_stage3"):  # from the stage-2 export, on data neither earlier stage saw
        cont = TrainConfig.load(str(REPO / "configs" / "train" / f"{stem}_continue.yaml"))
        assert cfg.init_from == cont.output_dir + "/export" and cfg.seed not in (base.seed, cont.seed)
    if path.stem.endswith("_stage4"):  # an anneal of the stage-3 export, on data no earlier stage saw
        cont = TrainConfig.load(str(REPO / "configs" / "train" / f"{stem}_continue.yaml"))
        s3 = TrainConfig.load(str(REPO / "configs" / "train" / f"{stem}_stage3.yaml"))
        assert cfg.init_from == s3.output_dir + "/export" and cfg.seed not in (base.seed, cont.seed, s3.seed)
        assert cfg.lr_schedule == "cosine" and cfg.lr == s3.lr and cfg.batch_size == s3.batch_size
    if path.stem.endswith("_stage5"):  # one more cosine cycle from the stage-4 export, on unseen data
        earlier = [base] + [TrainConfig.load(str(REPO / "configs" / "train" / f"{stem}_{s}.yaml"))
                            for s in ("continue", "stage3", "stage4")]
        assert cfg.init_from == earlier[-1].output_dir + "/export" and cfg.seed not in {c.seed for c in earlier}
        assert cfg.lr_schedule == "cosine" and cfg.batch_size == earlier[-1].batch_size
    if path.stem.endswith(("_decoder", "_decoder_objects")):
        assert cfg.train_decoder_only and cfg.init_from and cfg.seed != base.seed
    if path.stem.endswith("_own_images"):   # fine-tunes the shipped model on the rows of `data`, which exist
        assert cfg.data and cfg.init_from == "data/models/" + stem.replace("_", "-")
        assert len(load_rows(str(REPO / cfg.data))) >= 1
        twin = TrainConfig.load(str(REPO / "configs" / "train" / "lazy_own_images.yaml"))   # same data and recipe
        same = ("data", "steps", "batch_size", "lr", "lr_schedule", "warmup_steps", "ema_decay", "image_size", "seed")
        assert all(getattr(cfg, k) == getattr(twin, k) for k in same)
    if path.stem.endswith("_holes"):
        assert cfg.init_from and cfg.hole_crops > 0 and cfg.seed != base.seed


def _tiny_yaml(tmp_path) -> Path:
    """A tiny autoencoder run, so that a CLI test that fails to reject its input trains for one tiny step
    (the CLI tests all pass --max-steps-this-run 1) instead of a full-size run."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw("autoencoder", tmp_path / "run", steps=3, warmup_steps=1)))
    return path


def test_cli_set_without_equals_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        cli_main([str(_tiny_yaml(tmp_path)), "--set", "steps=3", "--set", "steps", "--max-steps-this-run", "1"])
    assert err.value.code == 2
    assert "--set expects KEY=VALUE, got 'steps'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing ran


def _cli_error(argv, capsys) -> str:
    """A user error on the command line: exit status 2 and one `error:` line on stderr, no traceback."""
    capsys.readouterr()  # what earlier steps printed
    with pytest.raises(SystemExit) as err:
        cli_main(argv)
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert msg.startswith("error: ") and "Traceback" not in msg
    return msg


def test_cli_set_unknown_key_is_reported(tmp_path, capsys):
    msg = _cli_error([str(_tiny_yaml(tmp_path)), "--set", "stepz=3", "--max-steps-this-run", "1"], capsys)
    assert "--set stepz=3: unknown key 'stepz' (did you mean 'steps'?)" in msg  # names --set, not the file
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value,match", [("lr", "fast", "lr must be a number, got 'fast'"),
                                             ("steps", "2.5", "steps must be a whole number"),
                                             ("batch_size", "true", "batch_size must be a whole number"),
                                             ("export_dtype", "float8", "export_dtype must be one of"),
                                             ("export_raw", "maybe", "export_raw must be true or false"),
                                             ("arch", "3", "arch must be a mapping"),
                                             ("output_dir", "", "output_dir must be a non-empty string")])
def test_cli_bad_value_is_reported(tmp_path, capsys, key, value, match):
    assert match in _cli_error([str(_tiny_yaml(tmp_path)), "--set", f"{key}={value}", "--max-steps-this-run", "1"],
                               capsys)
    assert not (tmp_path / "run").exists()


def test_cli_missing_config_is_reported(tmp_path, capsys):
    assert "nope.yaml not found" in _cli_error([str(tmp_path / "nope.yaml")], capsys)


def test_cli_help_lists_the_config_keys_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert "model=(required)" in out and "steps=1000" in out and "export_dtype=float16" in out and "arch={}" in out


def test_cli_set_one_arch_key(tmp_path):
    cfg = TrainConfig.load(str(_tiny_yaml(tmp_path)), {"arch.latent_channels": 8})
    assert cfg.arch == dict(AE_ARCH, latent_channels=8)


def test_cli_runs_with_yaml_typed_overrides(tmp_path):
    """--set values are YAML: lists/dicts for arch, and numbers written the usual ways (1e-3 included,
    which YAML 1.1 reads as a string)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "autoencoder", "output_dir": "unused"}))
    out = tmp_path / "run"
    cli_main([str(path), "--set", f"output_dir={out}", "--set", "steps=3", "--set", "batch_size=2",
              "--set", "image_size=32", "--set", "num_workers=0", "--set", "lr=1e-3", "--set", "warmup_steps=1",
              "--set", f"arch={json.dumps(AE_ARCH)}", "--max-steps-this-run", "1"])
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["steps"] == 3 and saved["lr"] == 1e-3 and saved["arch"] == AE_ARCH
    assert (_ckpt(out, 1) / "state.json").exists() and not (out / "export").exists()
    assert _state(out, 1)["log"][0]["lr"] == pytest.approx(1e-3)  # lr_at(0): warmup 1, cosine at its start


# ----------------------------------------------------------------------------- 2. exact resume
@pytest.mark.parametrize("model", ["lazy", "autoencoder", "regenerate_image", "shapes_clip"])
def test_resume_is_exact(model, tmp_path, autoencoder_export):
    """4 steps in one go == 2 steps, stop, resume for 2 more (weights, EMA, optimizer, losses, export)."""
    kw = dict(steps=4, warmup_steps=3, prompt_dropout=0.5)  # LR and prompt dropout vary over the steps
    ae = autoencoder_export if model in ("lazy", "regenerate_image") else None
    one, split = tmp_path / "one", tmp_path / "split"
    train(_cfg(model, one, ae, **kw))
    train(_cfg(model, split, ae, **kw), max_steps_this_run=2)
    assert (_ckpt(split, 2) / "state.json").exists() and not (split / "export").exists()
    half = load_file(str(_ckpt(split, 2) / "model.safetensors"))
    train(_cfg(model, split, ae, **kw))

    a, b = _ckpt(one, 4), _ckpt(split, 4)
    end = load_file(str(b / "model.safetensors"))
    assert any(not torch.equal(half[k], end[k]) for k in end), "the resumed run did not train"
    _assert_same_tensors(load_file(str(a / "model.safetensors")), end, "model")
    _assert_same_tensors(load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors")), "ema")
    _assert_same_optimizer(a / "optimizer.pt", b / "optimizer.pt")
    log_a, log_b = _state(one, 4)["log"], _state(split, 4)["log"]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]
    assert _log_values(log_a) == _log_values(log_b)
    assert len({r["lr"] for r in log_a}) == 4  # the schedule really varies across the split
    for f in sorted((one / "export").rglob("*.safetensors")):
        _assert_same_tensors(load_file(str(f)), load_file(str(split / "export" / f.relative_to(one / "export"))),
                             f"export {f.name}")


def test_no_resume_starts_over_and_sets_old_checkpoints_aside(tmp_path):
    """--no-resume: the new run starts from scratch, and a later resume continues the new run, not the
    old run's later checkpoints (which are kept, moved aside)."""
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    cfg = _cfg("autoencoder", out, steps=4)
    train(cfg, max_steps_this_run=3)
    train(cfg, resume=False, max_steps_this_run=1)
    assert loop.latest_checkpoint(out) == _ckpt(out, 1)
    assert [r["step"] for r in _state(out, 1)["log"]] == [1]
    assert (out / "checkpoints.old-1" / "step-3" / "state.json").exists()
    train(cfg, max_steps_this_run=1)  # resumes the new run at step 1
    assert [r["step"] for r in _state(out, 2)["log"]] == [1, 2]
    train(_cfg("autoencoder", fresh, steps=4), max_steps_this_run=2)
    _assert_same_tensors(load_file(str(_ckpt(out, 2) / "model.safetensors")),
                         load_file(str(_ckpt(fresh, 2) / "model.safetensors")), "model")


def test_loss_csv_and_plot_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "plot_loss", REAL_PLOT_LOSS)
    out = tmp_path / "run"
    train(_cfg("autoencoder", out, steps=3), max_steps_this_run=2)
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,wall_s" and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert [float(r.split(",")[1]) for r in rows[1:]] == pytest.approx(
        [r["loss"] for r in _state(out, 2)["log"]], abs=1e-6)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- 3. time boxes
def test_max_steps_this_run_without_export_at_stop_exports_nothing(tmp_path):
    out = tmp_path / "run"
    export = train(_cfg("autoencoder", out, steps=4), max_steps_this_run=1)
    assert export == out / "export" and not export.exists()
    assert not (out / "train_info.json").exists()
    assert (_ckpt(out, 1) / "state.json").exists()
    assert [r["step"] for r in _state(out, 1)["log"]] == [1]


def test_zero_minute_time_box_exports_where_the_run_stands(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg("autoencoder", out, steps=4, export_dtype="float32")
    train(cfg, max_steps_this_run=1)
    export = train(cfg, max_minutes=0.0, export_at_stop=True)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-1"]  # no step was taken, so no new checkpoint
    assert (export / "config.json").exists() and (export / "diffusion_pytorch_model.safetensors").exists()
    info = json.loads((out / "train_info.json").read_text())
    assert info["steps"] == 1 and info["schedule_steps"] == cfg.steps == 4
    # the export is the EMA of that checkpoint, not the raw weights
    exported = load_file(str(export / "diffusion_pytorch_model.safetensors"))
    ema = {k.removeprefix("vae."): v for k, v in load_file(str(_ckpt(out, 1) / "ema.safetensors")).items()}
    _assert_same_tensors(exported, ema, "export vs EMA")


def test_zero_minute_time_box_on_fresh_run_trains_and_exports_nothing(tmp_path):
    out = tmp_path / "run"
    export = train(_cfg("autoencoder", out, steps=4), max_minutes=0.0, export_at_stop=True)
    assert not export.exists() and not (out / "checkpoints").exists()


def test_time_box_stops_mid_run_and_matches_max_steps_export(tmp_path, monkeypatch):
    """A fake clock that advances 60 s per training step: a 2.5-minute box stops after step 3 with a
    checkpoint and an export, identical to --max-steps-this-run 3 --export-at-stop."""
    clock = [1000.0]

    class Ticking(AutoencoderObjective):
        def loss(self, batch, step, rank):
            clock[0] += 60.0
            return super().loss(batch, step, rank)

    boxed, counted = tmp_path / "boxed", tmp_path / "counted"
    with monkeypatch.context() as m:
        m.setattr(loop, "time", types.SimpleNamespace(time=lambda: clock[0]))
        m.setitem(loop.OBJECTIVES, "autoencoder", Ticking)
        export = train(_cfg("autoencoder", boxed, steps=10, export_dtype="float32"), max_minutes=2.5,
                       export_at_stop=True)
    assert sorted(p.name for p in (boxed / "checkpoints").iterdir()) == ["step-3"]
    info = json.loads((boxed / "train_info.json").read_text())
    assert info["steps"] == 3 and info["schedule_steps"] == 10
    ref = train(_cfg("autoencoder", counted, steps=10, export_dtype="float32"), max_steps_this_run=3,
                export_at_stop=True)
    _assert_same_tensors(load_file(str(export / "diffusion_pytorch_model.safetensors")),
                         load_file(str(ref / "diffusion_pytorch_model.safetensors")), "time-boxed vs step-counted")
    assert json.loads((counted / "train_info.json").read_text())["steps"] == 3


# ----------------------------------------------------------------------------- 4. exports load
def _edit_task(seed=3):
    from lazydiff.shapesworld import make_task

    task = make_task(seed, size=(32, 32))
    assert task.mask.any() and not task.mask.all()
    return task, PIL.Image.fromarray(task.canvas), PIL.Image.fromarray(task.mask.astype(np.uint8) * 255, "L")


@pytest.mark.parametrize("kind", ["lazy", "regenerate-image", "regenerate-crop"])
def test_exports_load_with_load_default_and_edit(kind, models_dir):
    import lazydiff

    pipe = lazydiff.load_default(kind, device="cpu", models_dir=str(models_dir))
    pipe.set_progress_bar_config(disable=True)
    task, image, mask = _edit_task()
    out = pipe(task.prompt, image, mask, num_inference_steps=2, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert out.size == (32, 32) and out.mode == "RGB"
    o, i = np.asarray(out), np.asarray(image)
    assert np.array_equal(o[~task.mask], i[~task.mask]), "pixels outside the mask changed"
    assert (o[task.mask] != i[task.mask]).any(), "nothing was generated in the hole"


def test_lazy_export_holds_the_ema_weights(lazy_export):
    from lazydiff import ContextEncoder, LazyDecoder

    ema = load_file(str(_ckpt(lazy_export.parent, 2) / "ema.safetensors"))
    for name, cls in (("context_encoder", ContextEncoder), ("decoder", LazyDecoder)):
        shipped = load_file(str(lazy_export / name / "diffusion_pytorch_model.safetensors"))
        assert {v.dtype for v in shipped.values()} == {torch.float16}  # export_dtype
        assert shipped.keys() == {k[len(name) + 1:] for k in ema if k.startswith(name + ".")}
        for k, v in shipped.items():
            assert torch.equal(v, ema[f"{name}.{k}"].to(torch.float16)), f"{name}.{k}"
        assert cls.from_pretrained(lazy_export / name).config.num_layers == 1
    assert (lazy_export / "scheduler" / "scheduler_config.json").exists()


def test_export_raw_holds_the_last_weights_and_loads_as_a_model_folder(lazy_export, autoencoder_export):
    import lazydiff

    raw = lazy_export.parent / "export-raw"
    last = load_file(str(_ckpt(lazy_export.parent, 2) / "model.safetensors"))
    differs = False
    for name in ("context_encoder", "decoder"):
        weights = load_file(str(raw / name / "diffusion_pytorch_model.safetensors"))
        ema = load_file(str(lazy_export / name / "diffusion_pytorch_model.safetensors"))
        for k, v in weights.items():
            assert torch.equal(v, last[f"{name}.{k}"].to(torch.float16)), f"{name}.{k}"
            differs |= not torch.equal(v, ema[k])
    assert differs, "the raw export equals the EMA export"
    pipe = lazydiff.load_pipeline(str(raw), device="cpu", autoencoder=str(autoencoder_export))
    pipe.set_progress_bar_config(disable=True)
    task, image, mask = _edit_task()
    out = np.asarray(pipe(task.prompt, image, mask, num_inference_steps=2,
                          generator=torch.Generator().manual_seed(0)).images[0])
    assert np.array_equal(out[~task.mask], np.asarray(image)[~task.mask])


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    return train(_cfg("shapes_clip", out))


def test_shapes_clip_export_loads_in_eval_and_open_clip(clip_export):
    import open_clip

    from eval.metrics import load_clip_folder
    from lazydiff.shapesworld.scenes import render_scene

    image = render_scene(5, size=(32, 32)).image
    bundle = load_clip_folder(clip_export)
    assert bundle.image_size == 32
    feats = bundle.encode_images(torch.from_numpy(image).permute(2, 0, 1)[None])
    assert feats.shape == (1, 16) and torch.isfinite(feats).all()
    assert bundle.encode_texts(["a red circle"]).shape == (1, 16)

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(clip_export))
    model.eval()
    with torch.no_grad():
        direct = model.encode_image(preprocess(PIL.Image.fromarray(image))[None])
    assert direct.shape == (1, 16)
    torch.testing.assert_close(direct, feats, atol=1e-3, rtol=1e-3)  # same weights, same preprocessing
    ema = load_file(str(_ckpt(clip_export.parent, 2) / "ema.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k].to(torch.float16).float()), k


# ----------------------------------------------------------------------------- 5. corrupt checkpoints
def test_corrupt_checkpoint_names_the_folder_and_the_fix(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg("autoencoder", out, steps=4, checkpoint_every=1)
    train(cfg, max_steps_this_run=2)
    bad = _ckpt(out, 2)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RuntimeError) as err:
        train(cfg)
    msg = str(err.value)
    assert str(bad) in msg and "Delete that folder" in msg and "--no-resume" in msg
    # following the advice: without the corrupt folder the run resumes from the previous checkpoint
    import shutil

    shutil.rmtree(bad)
    train(cfg, max_steps_this_run=1)
    assert [r["step"] for r in _state(out, 2)["log"]] == [1, 2]


def test_checkpoint_from_another_architecture_is_reported(tmp_path):
    out = tmp_path / "run"
    train(_cfg("autoencoder", out, steps=4), max_steps_this_run=1)
    saved = (out / "config.json").read_text()
    wider = dict(AE_ARCH, block_out_channels=[8, 8, 32])
    with pytest.raises(ValueError, match=r"(?s)holds a run of another config \(checkpoint \S*step-1\): arch: .*--no-resume"):
        train(_cfg("autoencoder", out, steps=4, arch=wider))
    assert (out / "config.json").read_text() == saved  # the run's record is left as it was


@pytest.mark.parametrize("change", [dict(model="shapes_clip", arch=CLIP_ARCH, batch_size=4), dict(lr=1e-2),
                                    dict(steps=6)])
def test_resume_under_another_config_is_refused_before_touching_the_run(tmp_path, capsys, change):
    """Another model, or the same one with another lr or (cosine) schedule length, in a finished run's folder:
    the CLI names the folder, the differing keys and the fixes, and leaves the run, its export included, as it was."""
    out = tmp_path / "run"
    train(_cfg("autoencoder", out, steps=2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(dict(_raw("autoencoder", out, steps=2), **change)))
    msg = _cli_error([str(path)], capsys)
    assert f"{out} holds a run of another config" in msg and "--set output_dir=" in msg and "--no-resume" in msg
    assert f"{next(iter(change))}: " in msg
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_constant_schedule_run_may_raise_steps_and_harmless_keys_may_change(tmp_path):
    out = tmp_path / "run"
    train(_cfg("autoencoder", out, steps=2, lr_schedule="constant"), max_steps_this_run=1)
    train(_cfg("autoencoder", out, steps=3, lr_schedule="constant", log_every=2, checkpoint_every=5))
    assert _state(out, 3)["step"] == 3


def test_no_resume_sets_a_finished_runs_export_aside(tmp_path):
    out = tmp_path / "run"
    train(_cfg("autoencoder", out, steps=2))
    export = {p.relative_to(out / "export"): p.read_bytes() for p in (out / "export").rglob("*") if p.is_file()}
    train(_cfg("autoencoder", out, steps=2, seed=1), resume=False)
    kept = {p.relative_to(out / "export.old-1"): p.read_bytes() for p in (out / "export.old-1").rglob("*") if p.is_file()}
    assert kept == export and (out / "train_info.json.old-1").exists()
    assert (out / "checkpoints.old-1" / "step-2").exists() and (out / "export").exists()


def test_bad_init_from_is_a_cli_error_and_leaves_the_output_dir_alone(tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{")  # truncated
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw("autoencoder", tmp_path / "run", init_from=str(corrupt))))
    msg = _cli_error([str(path)], capsys)
    assert f"could not read {corrupt / 'diffusion_pytorch_model.safetensors'}" in msg and "`init_from:`" in msg
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    """The first SIGINT lets the step finish, checkpoints it, and raises KeyboardInterrupt saying how to
    resume; the resumed run equals an uninterrupted one."""
    import os
    import signal

    class Interrupted(AutoencoderObjective):
        def loss(self, batch, step, rank):
            if step == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return super().loss(batch, step, rank)

    out, ref = tmp_path / "run", tmp_path / "ref"
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        m.setitem(loop.OBJECTIVES, "autoencoder", Interrupted)
        with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 2: checkpoint \S*step-2; run the same"):
            train(_cfg("autoencoder", out, steps=4))
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert loop.latest_checkpoint(out) == _ckpt(out, 2) and not (out / "export").exists()
    train(_cfg("autoencoder", out, steps=4))
    train(_cfg("autoencoder", ref, steps=4))
    _assert_same_tensors(load_file(str(_ckpt(out, 4) / "model.safetensors")),
                         load_file(str(_ckpt(ref, 4) / "model.safetensors")), "model")


def test_interrupted_checkpoint_write_is_ignored_on_resume(tmp_path):
    """A run killed while writing a checkpoint leaves step-N.tmp behind; resuming must skip it."""
    out = tmp_path / "run"
    cfg = _cfg("autoencoder", out, steps=4)
    train(cfg, max_steps_this_run=1)
    for name in ("step-2.tmp", "step-3.tmp", "step-3.tmp-old"):   # killed while saving (or swapping in)
        partial = out / "checkpoints" / name
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"\0" * 10)
    train(cfg, max_steps_this_run=1)
    assert [r["step"] for r in _state(out, 2)["log"]] == [1, 2]
    assert not list((out / "checkpoints").glob("*.tmp*"))   # the next save removes what the kill left



def _files(folder: Path):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_interrupted_export_leaves_the_previous_export_or_none_and_the_same_command_exports(tmp_path, monkeypatch):
    """Ctrl-C or a crash halfway through the final export: export/ is absent (first export) or the previous
    export, whole, never a partial folder; the same command then exports from the finished checkpoint."""
    class HalfExport(AutoencoderObjective):
        def export(self, module, folder):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{")  # half written
            raise crash[0]

    out = tmp_path / "run"
    cfg = _cfg("autoencoder", out, steps=2, export_dtype="float32")
    crash = [KeyboardInterrupt()]
    with monkeypatch.context() as m:
        m.setitem(loop.OBJECTIVES, "autoencoder", HalfExport)
        with pytest.raises(KeyboardInterrupt, match=r"interrupted while exporting step 2 \(checkpoint \S*step-2 is "
                                                    r"complete\): run the same command again to export it"):
            train(cfg)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("export", "train_info"))) == []
    assert loop.latest_checkpoint(out) == _ckpt(out, 2)

    export = train(cfg)  # the same command: exports the finished checkpoint, trains nothing
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert json.loads((export / "config.json").read_text())["scaling_factor"] > 0
    assert json.loads((out / "train_info.json").read_text())["steps"] == 2
    before, info = _files(export), (out / "train_info.json").read_bytes()

    crash[0] = OSError("No space left on device")  # any crash, on a run that has an export
    with monkeypatch.context() as m:
        m.setitem(loop.OBJECTIVES, "autoencoder", HalfExport)
        with pytest.raises(OSError, match="No space left"):
            train(cfg)
    assert _files(export) == before and (out / "train_info.json").read_bytes() == info  # the previous one, whole
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("export")) == ["export"]


def test_resume_with_another_process_count_is_refused_before_touching_the_run(tmp_path, capsys):
    """Checkpoints record how many processes trained them; a resume with another count (data sharding and the
    effective batch would differ) is a one-line CLI error naming both counts and the fixes, with the run left
    as it was. Checkpoints from before the record resume with a warning."""
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw("autoencoder", out, steps=4)))
    cli_main([str(path), "--max-steps-this-run", "1"])
    state_file = _ckpt(out, 1) / "state.json"
    state = json.loads(state_file.read_text())
    assert state["num_processes"] == 1
    state_file.write_text(json.dumps(dict(state, num_processes=2)))  # as `accelerate launch --num_processes 2` writes
    before = _files(out)
    msg = _cli_error([str(path), "--max-steps-this-run", "1"], capsys)
    assert msg.count("\n") == 1 and str(_ckpt(out, 1)) in msg
    assert "trained with 2 processes, this run has 1 process" in msg
    assert "Resume with 2 processes (accelerate launch --num_processes 2" in msg
    assert "--no-resume" in msg and "--set output_dir=" in msg
    assert _files(out) == before

    del state["num_processes"]  # a checkpoint from before the record: unknown, so a warning, not a refusal
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    cli_main([str(path), "--max-steps-this-run", "1"])
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "does not record how many processes" in err
    assert [r["step"] for r in _state(out, 2)["log"]] == [1, 2] and _state(out, 2)["num_processes"] == 1


# ----------------------------------------------------------------------------- 6. PixArt-α initialisation
def _tiny_pixart(sample_size, seed=0):
    """A PixArt-α transformer like test_models' (learned sigma, ada_norm_single), with 4 latent channels
    and MiniLM's 384-d captions; sample_size 128 turns on the 1024-px resolution conditioning (its
    size embeddings split the width in 3: 3 heads x 8)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    pixart = PixArtTransformer2DModel(sample_size=sample_size, num_layers=1, patch_size=2, attention_head_dim=8,
                                      num_attention_heads=3, caption_channels=384, cross_attention_dim=24,
                                      in_channels=4, out_channels=8, norm_type="ada_norm_single",
                                      norm_elementwise_affine=False, norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in pixart.parameters():
            p.normal_(0, 0.3)
    return pixart


@pytest.fixture(scope="module", params=[8, 128], ids=["pixart-256", "pixart-1024-extra-conds"])
def pixart_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"pixart{request.param}")
    pixart = _tiny_pixart(request.param)
    pixart.save_pretrained(folder, safe_serialization=True)
    return folder, pixart


@pytest.mark.parametrize("model", ["lazy", "regenerate_image"])
def test_pixart_init_copies_trunk_then_trains(model, pixart_folder, autoencoder_export, tmp_path):
    folder, pixart = pixart_folder
    cfg = _cfg(model, tmp_path / "run", autoencoder_export, arch={"encoder_layers": 1, "encoder_heads": 2,
                                                                  "encoder_head_dim": 8}, pixart=str(folder))
    objective = OBJECTIVES[model](cfg, "cpu")
    decoder = objective.trainable["decoder"]
    assert decoder.config.num_layers == 1 and decoder.config.attention_head_dim == 8  # PixArt's, not the defaults
    assert decoder.config.use_additional_conditions == (pixart.config.sample_size == 128)
    added = objective.added_cond_kwargs(2)  # what the pipelines pass for a 32x32 canvas
    if decoder.config.use_additional_conditions:
        assert added["resolution"].tolist() == [[32.0, 32.0]] * 2 and added["aspect_ratio"].tolist() == [[1.0]] * 2
    else:
        assert added is None
    trunk = decoder.trunk.state_dict()
    ref = {k: v for k, v in pixart.state_dict().items() if not k.startswith("pos_embed.")}
    assert ref.keys() <= trunk.keys()
    for k, v in ref.items():
        assert torch.equal(trunk[k], v), k
    assert torch.equal(decoder.trunk.transformer_blocks[0].attn1.to_q.weight,
                       pixart.transformer_blocks[0].attn1.to_q.weight)
    patch_dim = pixart.pos_embed.proj.weight[0].numel()
    assert torch.equal(decoder.proj_in.weight[:, :patch_dim], pixart.pos_embed.proj.weight.flatten(1))
    assert not decoder.proj_in.weight[:, patch_dim:].any()  # inputs PixArt never had start at zero

    export = train(cfg)
    losses = [r["loss"] for r in _state(tmp_path / "run", 2)["log"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    cls_name = "LazyDecoder" if model == "lazy" else "FullCanvasDecoder"
    import lazydiff

    loaded = getattr(lazydiff, cls_name).from_pretrained(export / "decoder")
    assert loaded.config.num_layers == 1 and loaded.config.caption_channels == 384


@pytest.mark.slow
@pytest.mark.parametrize("model", ["autoencoder", "lazy", "regenerate_image"])
def test_two_process_data_parallel_training(model, tmp_path, autoencoder_export):
    """`accelerate launch` with 2 processes (gloo on CPU) wraps the Trainable in DDP: the loss must run
    through its forward, gradients are averaged, and both ranks end with the same weights."""
    import os
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    if not Path(launcher).exists():
        pytest.skip("accelerate CLI not installed")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_raw(model, tmp_path / "run", autoencoder_export, steps=2)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    run = subprocess.run([launcher, "launch", "--num_processes", "2", "--multi_gpu", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
                          "-m", "lazydiff.train", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert info["num_processes"] == 2 and info["steps"] == 2
    assert (tmp_path / "run" / "export").exists()



@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_checkpoints_and_resumes_with_the_same_process_count(tmp_path):
    """Ctrl-C reaches `accelerate launch`, which sends SIGINT to each process: they agree at the next step
    boundary, checkpoint that step together, and one line says how to resume. Resuming with 1 process is refused
    (the run folder untouched); with 2 it continues from that step."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    if not Path(launcher).exists():
        pytest.skip("accelerate CLI not installed")
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_raw("autoencoder", out, steps=10_000, checkpoint_every=2)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    launch = [launcher, "launch", "--num_processes", "2", "--multi_gpu", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", "29533", "-m", "lazydiff.train", str(cfg)]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(launch, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 240
            while not (_ckpt(out, 2) / "state.json").exists():  # training: both processes are in the loop
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)  # what the terminal's Ctrl-C sends the launcher
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / "log.txt").read_text()
    ckpt = loop.latest_checkpoint(out)
    step = _state(out, int(ckpt.name[len("step-"):]))["step"]
    assert 2 <= step < 1000, text[-3000:]
    assert text.count(f"interrupted at step {step}: checkpoint {ckpt}; run the same command again to resume") == 1, \
        text[-3000:]
    assert _state(out, step)["num_processes"] == 2 and not (out / "export").exists()

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one = subprocess.run([sys.executable, "-m", "lazydiff.train", str(cfg)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and one.stderr.startswith("error: ") and one.stderr.count("\n") == 1, one.stderr[-3000:]
    assert "trained with 2 processes, this run has 1 process" in one.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    two = subprocess.run(launch + ["--max-steps-this-run", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert [r["step"] for r in _state(out, step + 1)["log"]][-2:] == [step, step + 1]


def test_cli_set_mixed_precision_no_is_not_yaml_false(tmp_path):
    """`--set mixed_precision=no` parses as YAML false; it must still mean "no mixed precision"."""
    cfg = TrainConfig.from_dict(_raw("autoencoder", tmp_path, mixed_precision=yaml.safe_load("no")))
    assert cfg.mixed_precision == "no"


# ----------------------------------------------------------------------------- continuing from an export
@pytest.fixture(scope="module")
def exports(autoencoder_export, lazy_export, regen_export, clip_export):
    return {"autoencoder": autoencoder_export, "lazy": lazy_export, "regenerate_image": regen_export,
            "shapes_clip": clip_export}


@pytest.mark.parametrize("model", ["autoencoder", "lazy", "regenerate_image", "shapes_clip"])
def test_init_from_export_starts_from_its_weights(model, exports, autoencoder_export, tmp_path):
    export = exports[model]
    cfg = _cfg(model, tmp_path / "run", autoencoder_export, init_from=str(export))
    objective = OBJECTIVES[model](cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in objective.trainable.state_dict().items()}
    objective.init_from(cfg.init_from)
    after = objective.trainable.state_dict()
    shipped = {}
    for name, rel in objective.export_files.items():
        prefix = "" if name is None else name + "."
        shipped.update({prefix + k: v for k, v in load_file(str(export / rel)).items()})
    assert shipped.keys() == after.keys()
    for k, v in shipped.items():
        assert torch.equal(after[k], v.to(after[k].dtype)), k
    assert any(not torch.equal(before[k], after[k]) for k in after)  # really replaced the random init
    # and a run from it trains, and exports
    assert (train(cfg) / "..").exists()


def test_init_from_resume_takes_precedence(tmp_path, lazy_export, autoencoder_export, monkeypatch):
    out = tmp_path / "run"
    train(_cfg("lazy", out, autoencoder_export, steps=2), max_steps_this_run=1)
    calls = []
    monkeypatch.setattr(OBJECTIVES["lazy"], "init_from", lambda self, folder: calls.append(folder))
    train(_cfg("lazy", out, autoencoder_export, steps=2, init_from=str(lazy_export)))
    assert calls == []  # resumed from step-1, not re-initialised
    assert _state(out, 2)["step"] == 2


def test_init_from_mismatched_or_missing_export_is_reported(tmp_path, lazy_export, regen_export, autoencoder_export):
    wider = dict(LAZY_ARCH, attention_head_dim=16)
    cfg = _cfg("lazy", tmp_path / "a", autoencoder_export, arch=wider, init_from=str(lazy_export))
    with pytest.raises(ValueError, match=r"decoder/diffusion_pytorch_model.safetensors.*same `arch:`"):
        train(cfg)
    cfg = _cfg("lazy", tmp_path / "b", autoencoder_export, init_from=str(regen_export))
    with pytest.raises(FileNotFoundError, match="context_encoder/diffusion_pytorch_model.safetensors not found"):
        train(cfg)


# ----------------------------------------------------------------------------- precomputed text features
def test_edit_prompts_cover_the_task_generator():
    from lazydiff.shapesworld import edit_prompts, make_task

    vocab = edit_prompts()
    assert len(vocab) == len(set(vocab)) and "empty background" in vocab
    seen = {make_task(s, size=(64, 64)).prompt for s in range(1_000_000_000, 1_000_000_300)}
    assert seen <= set(vocab), sorted(seen - set(vocab))[:3]
    assert len({p for p in seen if "background" in p}) > 5  # background captions are exercised too


@pytest.fixture(scope="module")
def text_table(tmp_path_factory):
    from safetensors.torch import save_file

    from lazydiff.train.text_features import build_table

    prompts = ["a small green star", "empty background", "a navy and pink striped background", "a large red circle"]
    tensors, meta = build_table(prompts)
    path = tmp_path_factory.mktemp("text") / "features.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path, prompts


def test_text_feature_table_matches_the_encoder(text_table):
    from lazydiff.defaults import load_text_encoder
    from lazydiff.train.text_features import TextFeatureTable

    path, prompts = text_table
    table = TextFeatureTable(str(path))
    batch = [prompts[2], "", prompts[0], prompts[0]]
    feats, mask = table(batch, "cpu")
    encoder, tokenizer = load_text_encoder()
    tok = tokenizer(batch, padding=True, truncation=True, max_length=120, return_tensors="pt")
    with torch.no_grad():
        live = encoder(tok["input_ids"], attention_mask=tok["attention_mask"])[0]
    assert torch.equal(mask, tok["attention_mask"])
    m = mask.bool()
    torch.testing.assert_close(feats[m], live[m], atol=1e-4, rtol=1e-4)  # real tokens; padding is masked out
    assert (feats[~m] == 0).all()


def test_text_feature_table_trains_and_reports_unknown_prompts(text_table, autoencoder_export, tmp_path):
    from lazydiff.train.text_features import TextFeatureTable

    path, _ = text_table
    with pytest.raises(KeyError, match="not in the text-feature table"):
        TextFeatureTable(str(path))(["a purple heart"], "cpu")
    # the real training stream's prompts are covered by a table of edit_prompts(): use a monkeypatched tiny one
    cfg = _cfg("lazy", tmp_path / "run", autoencoder_export, text_features=str(path))
    objective = OBJECTIVES["lazy"](cfg, torch.device("cpu"))
    assert not hasattr(objective, "text_encoder") and objective.text_dim == 384
    text, mask = objective.encode_text(["a small green star", ""])
    assert text.shape[0] == 2 and mask[1].sum() == 2  # "" = [CLS] [SEP]


def test_missing_text_encoder_folder_names_the_key(tmp_path, autoencoder_export):
    with pytest.raises(OSError, match=r"`text_encoder: \S*nowhere`.*leave it out"):
        OBJECTIVES["lazy"](_cfg("lazy", tmp_path / "run", autoencoder_export, text_encoder=str(tmp_path / "nowhere")),
                           "cpu")


def test_text_features_cli_missing_encoder_folder_is_a_usage_error(tmp_path, capsys):
    from lazydiff.train.text_features import main as features_main

    with pytest.raises(SystemExit) as err:
        features_main([str(tmp_path / "f.safetensors"), "--text-encoder", str(tmp_path / "nowhere")])
    assert err.value.code == 2 and "nowhere: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "f.safetensors").exists()


def test_bad_text_feature_file_names_it(tmp_path, autoencoder_export):
    bad = tmp_path / "features.safetensors"
    bad.write_bytes(b"not a table")
    with pytest.raises(ValueError, match=r"features.safetensors.*python -m lazydiff.train.text_features"):
        OBJECTIVES["lazy"](_cfg("lazy", tmp_path / "run", autoencoder_export, text_features=str(bad)), "cpu")


def test_constant_lr_schedule_holds_lr_after_warmup(tmp_path):
    out = tmp_path / "run"
    train(_cfg("autoencoder", out, steps=4, warmup_steps=2, lr=1e-3, lr_schedule="constant", log_every=1))
    assert [round(r["lr"], 9) for r in _state(out, 4)["log"]] == [5e-4, 1e-3, 1e-3, 1e-3]


def test_shapes_clip_hole_crops_are_the_evaluations_crops():
    """hole_crops = 1: every sample is an edit task's ground truth cropped the way eval/quality.py
    crops it (crop_box around the hole), captioned with the edit prompt; 0 keeps the old stream."""
    from lazydiff.pipelines.pipeline_regenerate import crop_box
    from lazydiff.shapesworld.tasks import make_task
    from lazydiff.train.data import TRAIN_SEED_BASE, TrainingStream, caption_batch, hole_crop_pair

    seeds = np.arange(TRAIN_SEED_BASE, TRAIN_SEED_BASE + 6)
    batch = caption_batch(seeds, 64, hole_crops=1.0)
    tasks = [make_task(int(s), size=(64, 64)) for s in seeds]
    assert batch["caption"] == [t.prompt for t in tasks]
    for s, t, img in zip(seeds, tasks, batch["image"]):
        crop, _ = hole_crop_pair(int(s), 64)
        assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(np.array(crop)).permute(2, 0, 1))
        y0, y1, x0, x1 = crop_box(t.mask, 0.4, min_side=8)  # the widest margin drawn
        if (y1 - y0, x1 - x0) != (64, 64):  # a crop, not the canvas: the image is not the full target
            assert not torch.equal(img, torch.from_numpy(t.target).permute(2, 0, 1))
    plain = caption_batch(seeds, 64)
    assert torch.equal(plain["image"], caption_batch(seeds, 64, hole_crops=0.0)["image"])
    mixed = TrainingStream("shapes_clip", 32, 64, 0, 0, hole_crops=0.5)
    captions = next(iter(mixed))["caption"]
    prompts = set(caption_batch(mixed.seeds(0), 64, hole_crops=1.0)["caption"])
    n_task = sum(c in prompts for c in captions)
    assert 8 <= n_task <= 32  # about half are task prompts (scene/object captions can coincide)


def _fake_python(tmp_path) -> Path:
    """Stands in for `python` in scripts/train_shapesworld.sh: logs its arguments and writes what a
    finished run leaves (export folder and logs) in the output_dir it was given."""
    fake = tmp_path / "fake_python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "echo \"$@\" >> \"$FAKE_LOG\"\n"
                    "out=$(printf '%s\\n' \"$@\" | sed -n 's/^output_dir=//p')\n"
                    "mkdir -p \"$out/export\" && echo w > \"$out/export/weights\"\n"
                    "for f in train_info.json loss.csv loss.png config.json; do echo x > \"$out/$f\"; done\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("stage,configs,published", [
    ("clip", ["shapes_clip_holes.yaml"], ["shapes-clip"]),
    ("diffusion", ["lazy_stage3.yaml", "regenerate_image_stage3.yaml"], ["lazy", "regenerate-image"]),
    ("stage4", ["lazy_stage4.yaml", "regenerate_image_stage4.yaml"], ["lazy", "regenerate-image"]),
    ("stage5", ["lazy_stage5.yaml", "regenerate_image_stage5.yaml"], ["lazy", "regenerate-image"]),
    ("continue", ["lazy_continue.yaml", "regenerate_image_continue.yaml", "shapes_clip_continue.yaml"],
     ["lazy", "regenerate-image", "shapes-clip"])])
def test_training_script_stages_run_their_configs_and_publish(tmp_path, stage, configs, published):
    import os
    import subprocess

    log = tmp_path / "log"
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path)), FAKE_LOG=str(log), RUNS=str(tmp_path / "runs"),
               MODELS=str(tmp_path / "models"), INIT_DIR="data/models")
    subprocess.run(["bash", str(REPO / "scripts" / "train_shapesworld.sh"), stage], env=env, check=True, cwd=REPO)
    calls = log.read_text().splitlines()
    assert sorted(c.split()[2].rsplit("/", 1)[1] for c in calls) == sorted(configs)
    for c in calls:  # every continued run starts from the shipped export of its own model
        assert "init_from=data/models/" in c
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(published)
    for name in published:
        assert (tmp_path / "models" / name / "weights").exists() and (tmp_path / "models" / name / "training" / "loss.csv").exists()


def test_training_script_gives_both_diffusion_runs_the_same_step_budget(tmp_path):
    import os
    import subprocess

    log = tmp_path / "log"
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path)), FAKE_LOG=str(log), RUNS=str(tmp_path / "runs"),
               MODELS=str(tmp_path / "models"), INIT_DIR="data/models", STEPS_DIFFUSION="1234")
    subprocess.run(["bash", str(REPO / "scripts" / "train_shapesworld.sh"), "diffusion"], env=env, check=True, cwd=REPO)
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all("--max-steps-this-run 1234 --export-at-stop" in c for c in calls)


def test_training_script_defaults_to_the_repos_venv_python(tmp_path):
    """README installs into .venv without activating it: the script must not need a `python` on PATH."""
    import os
    import shutil
    import subprocess

    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "train_shapesworld.sh", tmp_path / "scripts")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    shutil.move(_fake_python(tmp_path), tmp_path / ".venv" / "bin" / "python")
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(PATH="/usr/bin:/bin", FAKE_LOG=str(log), RUNS=str(tmp_path / "runs"), MODELS=str(tmp_path / "models"))
    subprocess.run(["bash", str(tmp_path / "scripts" / "train_shapesworld.sh"), "clip"], env=env, check=True)
    assert "shapes_clip_holes.yaml" in log.read_text()


def test_training_script_rejects_an_unknown_stage(tmp_path):
    import subprocess

    res = subprocess.run(["bash", str(REPO / "scripts" / "train_shapesworld.sh"), "stage3"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown stage 'stage3'" in res.stderr
    res = subprocess.run(["bash", str(REPO / "scripts" / "train_shapesworld.sh"), "--help"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "Usage:" in res.stdout and "STEPS_DIFFUSION" in res.stdout and not res.stderr


def test_decoder_only_autoencoder_keeps_the_latent_space(autoencoder_export, tmp_path):
    """train_decoder_only: the decoder changes; encoder, quant_conv and scaling factor stay bit-identical
    (including through the EMA and a resume), so diffusion models trained on the latents stay valid."""
    before = load_file(str(autoencoder_export / "diffusion_pytorch_model.safetensors"))
    cfg = _cfg("autoencoder", tmp_path / "dec", init_from=str(autoencoder_export), train_decoder_only=True,
               steps=3, checkpoint_every=2, lr=1e-2, export_dtype="float32")
    train(cfg, max_steps_this_run=2)
    export = train(cfg)  # resumes from the step-2 checkpoint
    after = load_file(str(export / "diffusion_pytorch_model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    old, new = (json.loads((p / "config.json").read_text())["scaling_factor"] for p in (autoencoder_export, export))
    assert new == old


@pytest.mark.parametrize("raw,match", [
    (dict(model="autoencoder", train_decoder_only=True), "needs model: autoencoder and init_from"),
    (dict(model="shapes_clip", train_decoder_only=True, init_from="x"), "needs model: autoencoder and init_from")])
def test_decoder_only_config_errors(raw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(dict(raw, output_dir="x"))


def test_decoder_only_from_a_folder_without_config_is_reported(tmp_path):
    with pytest.raises(ValueError, match="could not read the scaling_factor"):
        train(_cfg("autoencoder", tmp_path / "o", init_from=str(tmp_path), train_decoder_only=True))


def test_batches_travel_as_uint8_and_become_the_training_floats():
    """Workers send uint8 images and a bool mask (a quarter of the bytes); to_unit gives [-1, 1]."""
    from lazydiff.shapesworld.tasks import make_task
    from lazydiff.train.data import edit_batch, to_unit

    batch = edit_batch([5, 6], 32)
    assert batch["canvas"].dtype == batch["target"].dtype == torch.uint8 and batch["mask"].dtype == torch.bool
    assert batch["canvas"].shape == (2, 3, 32, 32) and batch["canvas"].is_contiguous()
    task = make_task(6, size=(32, 32))
    unit = to_unit(batch["target"], "cpu")
    assert unit.dtype == torch.float32 and torch.equal(unit[1], torch.from_numpy(task.target).permute(2, 0, 1).float() / 127.5 - 1.0)
    assert torch.equal(batch["mask"][1, 0], torch.from_numpy(task.mask))


def test_data_echo_reuses_each_batch_and_its_latents_and_resumes_exactly(tmp_path, autoencoder_export, monkeypatch):
    """data_echo 2: steps 2d and 2d+1 train on data batch d (VAE run once for it) with fresh noise;
    5 steps in one go == 3 steps, stop mid-echo, resume for 2 more."""
    import diffusers

    from lazydiff.train import data as data_mod

    made, encodes = [], []
    maker = data_mod.MAKERS["lazy"]
    monkeypatch.setitem(data_mod.MAKERS, "lazy", lambda seeds, size: made.append(int(seeds[0])) or maker(seeds, size))
    encode = diffusers.AutoencoderKL.encode
    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", lambda self, x, **kw: encodes.append(1) or encode(self, x, **kw))
    kw = dict(steps=5, warmup_steps=1, data_echo=2)
    one, split = tmp_path / "one", tmp_path / "split"
    train(_cfg("lazy", one, autoencoder_export, **kw))
    base = data_mod.TRAIN_SEED_BASE
    assert made == [base, base + 2, base + 4]  # data steps 0, 1, 2 (batch size 2) for steps 0-4
    assert len(encodes) == 2 * 3  # target and masked canvas, once per data batch
    losses = [r["loss"] for r in _state(one, 5)["log"]]
    assert losses[0] != losses[1]  # same batch, fresh noise and timesteps

    made.clear()
    train(_cfg("lazy", split, autoencoder_export, **kw), max_steps_this_run=3)
    train(_cfg("lazy", split, autoencoder_export, **kw))
    assert made == [base, base + 2, base + 2, base + 4]  # the resume at step 3 remakes batch 1
    _assert_same_tensors(load_file(str(_ckpt(one, 5) / "model.safetensors")),
                         load_file(str(_ckpt(split, 5) / "model.safetensors")), "model")
    assert _log_values(_state(one, 5)["log"]) == _log_values(_state(split, 5)["log"])


def test_min_snr_weighting(tmp_path, autoencoder_export):
    """snr_gamma weights sample i by min(SNR, gamma) / SNR; a gamma above every SNR is the plain loss."""
    from lazydiff.train.data import edit_batch
    from lazydiff.train.objectives import OBJECTIVES

    def objective(gamma):
        return OBJECTIVES["lazy"](_cfg("lazy", tmp_path, autoencoder_export, snr_gamma=gamma), torch.device("cpu"))

    obj = objective(5.0)
    t = torch.tensor([0, 100, 500, 999])
    ab = obj.noise_scheduler.alphas_cumprod[t]
    snr = ab / (1 - ab)
    w = obj.min_snr_weights(t)
    assert torch.allclose(w, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    assert w[0] < 0.01 and w[-1] == 1.0  # low noise down-weighted, high noise untouched

    batch = edit_batch([1, 2], 32)
    losses = {}
    for gamma in (None, 1e12, 1e-3):
        o = objective(gamma)
        with torch.no_grad():
            losses[gamma] = float(o.loss(batch, 0, 0))
    assert losses[1e12] == losses[None] and losses[1e-3] < losses[None]


def test_stage5_gave_both_diffusion_models_the_same_total_steps():
    """The shipped models' stage logs say how many steps each stage ran. Stage 5 (shipped) made up the
    difference that the time-boxed stages 2 and 3 left, so both models end with the same number of steps,
    and its configs are the runs that were logged."""
    total = {}
    for model, config in (("lazy", "lazy"), ("regenerate-image", "regenerate_image")):
        logs = sorted((REPO / "data/models" / model / "training").glob("stage*/train_info.json"))
        assert [f.parent.name for f in logs] == [f"stage{i}" for i in range(1, 6)], logs
        total[model] = sum(json.loads(f.read_text())["steps"] for f in logs)
        stage5 = json.loads(logs[-1].read_text())
        assert stage5["steps"] == stage5["schedule_steps"] == \
            TrainConfig.load(str(REPO / f"configs/train/{config}_stage5.yaml")).steps
    assert total["lazy"] == total["regenerate-image"] == 15_901, total


def test_object_masks_cover_the_objects_and_their_outline():
    from lazydiff.shapesworld.scenes import render_scene
    from lazydiff.train.data import image_batch

    seeds = np.arange(3, 9)
    plain, with_masks = image_batch(seeds, 64), image_batch(seeds, 64, object_masks=True)
    assert torch.equal(plain["image"], with_masks["image"]) and "objects" not in plain
    masks = with_masks["objects"]
    assert masks.dtype == torch.bool and masks.shape == (6, 1, 64, 64)
    for s, m in zip(seeds, masks[:, 0].numpy()):
        scene = render_scene(int(s), size=(64, 64))
        inside = np.logical_or.reduce([o.mask for o in scene.objects]) if scene.objects else np.zeros((64, 64), bool)
        assert m[inside].all()                      # every object pixel
        assert m.sum() > inside.sum() or not inside.any()  # and a rim around them
        assert m.sum() < 64 * 64                    # not the whole canvas


def test_object_loss_weight_weights_object_pixels(autoencoder_export, tmp_path):
    """0 keeps the plain loss; with a weight the loss is a weighted MEAN: a uniform mask (no objects, or
    all objects) gives the plain loss back, a real one moves it."""
    from lazydiff.train.data import image_batch

    batch = image_batch(np.arange(20, 24), 64, object_masks=True)
    assert batch["objects"].any() and not batch["objects"].all()

    def loss(weight, objects):
        cfg = _cfg("autoencoder", tmp_path / f"w{weight}", init_from=str(autoencoder_export), train_decoder_only=True,
                   object_loss_weight=weight, image_size=64)
        with torch.no_grad():  # same seed: same weights and the same sampled latents in every call
            return float(AutoencoderObjective(cfg, torch.device("cpu")).loss(dict(batch, objects=objects), step=0, rank=0))

    plain = loss(0.0, batch["objects"])
    assert loss(10.0, torch.zeros_like(batch["objects"])) == pytest.approx(plain, rel=1e-5)
    assert loss(10.0, torch.ones_like(batch["objects"])) == pytest.approx(plain, rel=1e-5)
    assert loss(10.0, batch["objects"]) != pytest.approx(plain, rel=1e-3)
