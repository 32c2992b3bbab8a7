"""The main job end to end on a tiny model, and the evaluation arithmetic."""

import json
import os
import re
import shutil
import signal
import types

import _inception
import jax
import numpy as np
import pytest
from _train_helpers import REPO, one_line_error
from PIL import Image

from configs import inpaint_photos16
from stochinterp import evaluate, fid_eval, pipeline


def test_mean_fill_puts_each_images_known_mean_in_its_holes():
    x1 = np.zeros((2, 2, 2, 1), np.float32)
    x1[0, :, :, 0] = [[1.0, 3.0], [5.0, 7.0]]
    x1[1, :, :, 0] = [[-1.0, -1.0], [0.5, 2.0]]
    mask = np.ones((2, 2, 2, 1), np.float32)
    mask[0, 1, 1] = 0.0  # hole at 7: mean of 1, 3, 5 is 3
    mask[1, 0, :] = 0.0  # holes at the -1s: mean of 0.5, 2 is 1.25
    filled = evaluate.mean_fill(x1, mask)
    np.testing.assert_array_equal(filled[0, :, :, 0], [[1.0, 3.0], [5.0, 3.0]])
    np.testing.assert_array_equal(filled[1, :, :, 0], [[1.25, 1.25], [0.5, 2.0]])


def test_mean_fill_takes_each_channels_own_known_mean():
    x1 = np.zeros((1, 2, 2, 3), np.float32)
    x1[0, :, :, 0] = [[1.0, 3.0], [5.0, 7.0]]
    x1[0, :, :, 1] = 10.0
    x1[0, :, :, 2] = -2.0
    mask = np.ones((1, 2, 2, 1), np.float32)
    mask[0, 1, 1] = 0.0
    filled = evaluate.mean_fill(x1, mask)
    np.testing.assert_array_equal(filled[0, 1, 1], [3.0, 10.0, -2.0])
    np.testing.assert_array_equal(filled[0, 0, 0], [1.0, 10.0, -2.0])


def test_hidden_mse_is_pooled_over_all_hidden_pixels():
    truth = np.zeros((2, 1, 2, 1), np.float32)
    prediction = np.array([[[[1.0], [9.0]]], [[[2.0], [9.0]]]], np.float32)
    mask = np.array([[[[0.0], [1.0]]], [[[0.0], [1.0]]]], np.float32)
    # Hidden pixels: errors 1 and 4 -> pooled MSE 2.5; known pixels ignored.
    assert evaluate.hidden_mse(prediction, truth, mask) == 2.5
    # One hidden pixel with error 1 and three with error 4: pooled 13 / 4,
    # where the mean of the per-image MSEs would be 2.5.
    truth = np.zeros((2, 2, 2, 1), np.float32)
    prediction = np.stack([np.full((2, 2, 1), 1.0), np.full((2, 2, 1), 2.0)])
    mask = np.ones((2, 2, 2, 1), np.float32)
    mask[0, 0, 0] = 0.0
    mask[1].flat[:3] = 0.0
    assert evaluate.hidden_mse(prediction, truth, mask) == 3.25
    assert evaluate.psnr_from_mse(0.04) == pytest.approx(
        20.0
    )  # range 2: 10 log10(4/0.04)


def test_hidden_mse_without_holes_is_an_error():
    x = np.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match="no hidden pixels"):
        evaluate.hidden_mse(x, x, np.ones((1, 2, 2, 1)))


def test_errors_summed_over_batches_equal_the_metrics_of_all_at_once():
    rng = np.random.default_rng(0)
    x1 = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
    samples = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
    mask = (rng.uniform(size=(6, 4, 4, 1)) < 0.5).astype(np.float32)
    samples = np.where(mask > 0, x1, samples)  # known pixels kept
    whole = evaluate.inpainting_metrics(samples, x1, mask)
    errors = evaluate.InpaintingErrors()
    for part in (slice(0, 2), slice(2, 6)):  # batches of unequal size
        errors.update(samples[part], x1[part], mask[part])
    summed = errors.metrics()
    assert summed.keys() == whole.keys()
    for key, value in whole.items():
        assert summed[key] == pytest.approx(value, rel=1e-6), key
    hidden = np.broadcast_to(1 - mask, x1.shape)
    pooled = float((np.square(samples - x1) * hidden).sum() / hidden.sum())
    assert summed["mse_hidden_sample"] == pytest.approx(pooled, rel=1e-6)
    assert summed["hidden_fraction"] == pytest.approx(1 - mask.mean(), rel=1e-6)
    assert summed["known_pixels_exact"] is True
    # One known value one float32 step off, in a middle batch, is not exact.
    errors = evaluate.InpaintingErrors()
    off = samples.copy()
    known = np.argwhere(np.broadcast_to(mask, x1.shape)[2] > 0)[0]
    off[(2, *known)] = np.nextafter(x1[(2, *known)], np.float32(2))
    for part in (slice(0, 2), slice(2, 4), slice(4, 6)):
        errors.update(off[part], x1[part], mask[part])
    assert errors.metrics()["known_pixels_exact"] is False


def test_mse_trend_uses_first_and_last_tenth():
    history = [10.0] * 10 + [5.0] * 80 + [2.0] * 10
    trend = pipeline.mse_trend(history)
    assert trend["mse_first_10pct"] == 10.0
    assert trend["mse_last_10pct"] == 2.0
    assert trend["mse_ratio_last_first"] == 0.2


def tiny_config(data_dir):
    config = inpaint_photos16.get_config()
    config.data.data_dir = str(data_dir)
    config.model.dim = 8
    config.model.dim_mults = (1, 2)
    config.model.resnet_block_groups = 4
    config.train.global_batch = 8
    config.train.num_steps = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.async_checkpoint = False
    config.sampler.num_steps = 5
    config.eval.num_images = 8
    config.eval.grid_images = 4
    return config


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    config = tiny_config(tmp_path_factory.mktemp("data"))
    metrics = pipeline.train_and_evaluate(config, str(workdir))
    return config, str(workdir), metrics


def test_main_job_writes_its_outputs(main_job):
    config, workdir, metrics = main_job
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["steps_this_run"] == 4 and saved["first_step"] == 0
    assert saved["nfe"] == 5  # Euler: one model call per step
    assert saved["num_images"] == 8
    assert saved["known_pixels_exact"] is True
    assert saved["config"]["train"]["num_steps"] == 4
    for key in (
        "final_loss",
        "psnr_hidden_sample",
        "psnr_hidden_mean_fill",
        "mse_first_10pct",
        "mse_last_10pct",
        "wall_seconds",
    ):
        assert np.isfinite(saved[key]), key
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [2, 4]


def test_main_job_picture_has_three_rows_of_grid_images(main_job):
    _, workdir, _ = main_job
    image = Image.open(os.path.join(workdir, "samples", "inpaint.png"))
    scale, pad, size = 4, 2, 16
    assert image.size == (
        4 * (size * scale + pad) + pad,
        3 * (size * scale + pad) + pad,
    )


def test_restored_ema_weights_reproduce_the_evaluation(main_job):
    config, workdir, metrics = main_job
    mesh = pipeline.sharding.make_mesh()
    model, variables, step = pipeline.load_variables(
        config, workdir, mesh, use_ema=True
    )
    assert step == 4
    again = pipeline.evaluate_inpainting(config, model, variables, workdir, mesh)
    assert again["psnr_hidden_sample"] == pytest.approx(
        metrics["psnr_hidden_sample"], abs=1e-4
    )
    assert jax.device_count() == 2


def test_evaluation_in_batches_pools_the_batches_drawn_with_folded_keys(
    main_job, tmp_path
):
    config, workdir, _ = main_job
    config = config.copy_and_resolve_references()
    config.eval.batch = 4  # two batches of the 8 images
    mesh = pipeline.sharding.make_mesh()
    pipeline.validate_sampling(config, mesh)
    model, variables, _ = pipeline.load_variables(config, workdir, mesh, True)
    metrics = pipeline.evaluate_inpainting(
        config, model, variables, str(tmp_path), mesh, picture="b.png"
    )
    assert metrics["batch"] == 4 and metrics["num_images"] == 8
    assert metrics["nfe_per_batch"] == [5, 5] and metrics["nfe"] == 5

    # The same two batches by hand: batch c draws with fold_in(key(seed), c).
    key = jax.random.key(config.eval.seed)
    x1, samples, masks = [], [], []
    for c, start in enumerate((0, 4)):
        batch = pipeline.sample_test_images(
            config, model, variables, mesh, 4, 0, start, jax.random.fold_in(key, c)
        )
        x1.append(batch[0]), samples.append(batch[1])
        masks.append(evaluate.inpainting_mask(batch[2]))
    x1, samples, masks = map(np.concatenate, (x1, samples, masks))
    expected = evaluate.inpainting_metrics(samples, x1, masks)
    for key_name, value in expected.items():
        assert metrics[key_name] == pytest.approx(value, rel=1e-6), key_name
    assert not np.array_equal(masks[:4], masks[4:])  # other draws per batch

    # The picture shows the first grid_images (4) images: the first batch.
    shown = np.asarray(Image.open(tmp_path / "samples" / "b.png"))
    grid = tmp_path / "expected.png"
    rows = [evaluate.masked_input(x1[:4], masks[:4]), samples[:4], x1[:4]]
    evaluate.save_grid(str(grid), rows)
    np.testing.assert_array_equal(shown, np.asarray(Image.open(grid)))


def test_evaluation_in_one_batch_draws_with_the_seed_itself(main_job, tmp_path):
    config, workdir, _ = main_job
    mesh = pipeline.sharding.make_mesh()
    model, variables, _ = pipeline.load_variables(config, workdir, mesh, True)
    x1, samples, sample, _, _ = pipeline.sample_test_images(
        config, model, variables, mesh, 8, 0, key=jax.random.key(config.eval.seed)
    )
    expected = evaluate.inpainting_metrics(
        samples, x1, evaluate.inpainting_mask(sample)
    )
    for batch in (0, 8):  # all eval.num_images at once
        config = config.copy_and_resolve_references()
        config.eval.batch = batch
        metrics = pipeline.evaluate_inpainting(
            config, model, variables, str(tmp_path), mesh
        )
        assert "batch" not in metrics and "nfe_per_batch" not in metrics
        for name, value in expected.items():
            assert metrics[name] == value, (batch, name)


def test_the_time_left_leaves_out_the_first_batch_which_compiles(monkeypatch, caplog):
    clock = iter([0.0, 100.0, 110.0, 120.0])  # the first batch takes 100 s
    monkeypatch.setattr(
        pipeline, "time", types.SimpleNamespace(time=lambda: next(clock))
    )
    monkeypatch.setattr(pipeline, "sample_test_images", lambda *args: None)
    with caplog.at_level("INFO", logger="stochinterp.pipeline"):
        batches = pipeline._sampled_batches(None, None, None, None, 12, 4, 0, True, "x")
        assert list(batches) == [None] * 3
    assert caplog.messages == [
        "x: 4 of 12 images, 100 s, about 200 s left",
        "x: 8 of 12 images, 110 s, about 10 s left",
        "x: 12 of 12 images, 120 s, about 0 s left",
    ]


def test_the_record_of_several_batches_keeps_the_most_calls_and_steps():
    config = tiny_config("unused")

    def info(nfe, accepted, rejected):
        return pipeline.samplers.SamplerInfo(
            nfe=np.int32(nfe),
            nfe_score=np.int32(0),
            t_final=np.float32(1.0),
            accepted_steps=np.int32(accepted),
            rejected_steps=np.int32(rejected),
            success=np.bool_(True),
        )

    record = pipeline._counts_of_batches(config, [info(7, 1, 1), info(5, 3, 0)])
    assert record["nfe"] == 7 and record["nfe_per_batch"] == [7, 5]
    assert record["accepted_steps"] == 3 and record["rejected_steps"] == 1
    assert record["nfe_score"] == 0 and record["sampler"] == "euler"
    single = pipeline._counts_of_batches(config, [info(5, 3, 0)])
    assert single["nfe"] == 5 and "nfe_per_batch" not in single


@pytest.mark.parametrize("batch", [-2, 3, True])
def test_a_bad_evaluation_batch_is_named(batch):
    config = tiny_config("unused")
    config.eval.batch = batch
    mesh = pipeline.sharding.make_mesh()
    expected = (
        "eval.batch must be 0 (all eval.num_images at once) or a positive "
        f"multiple of the number of devices (2), got {batch!r}"
    )
    with pytest.raises(ValueError) as raised:
        pipeline.validate_sampling(config, mesh)
    assert str(raised.value) == expected


def test_dopri5_can_be_chosen_from_a_config_that_sets_num_steps():
    config = inpaint_photos16.get_config()
    config.sampler.method = "dopri5"  # num_steps stays 20 from the experiment
    settings = pipeline.samplers.SamplerSettings.from_config(config.sampler)
    assert settings.method == "dopri5" and settings.num_steps is None
    pipeline.validate_sampling(config, pipeline.sharding.make_mesh())


def test_sampling_never_drops_the_given_labels():
    from stochinterp import couplings

    coupling = couplings.ClassConditioning(couplings.IndependentCoupling(), 10, 0.5)
    x1 = np.zeros((512, 4, 4, 1), np.float32)
    labels = np.arange(512) % 10
    trained = coupling(jax.random.key(0), x1, labels)
    assert (np.asarray(trained.labels) == 10).sum() > 200  # drops in training
    sampled = couplings.without_label_drop(coupling)(jax.random.key(0), x1, labels)
    np.testing.assert_array_equal(sampled.labels, labels)


def test_a_changed_config_on_a_trained_workdir_is_refused(main_job):
    config, workdir, _ = main_job
    other = tiny_config(config.data.data_dir)
    other.model.dim = 16
    with pytest.raises(ValueError, match=r"model.dim: 8 saved, 16 now"):
        pipeline.load_variables(other, workdir, pipeline.sharding.make_mesh(), True)
    with pytest.raises(ValueError, match=r"model.dim: 8 saved, 16 now"):
        pipeline.train.train(other, workdir)


def test_a_rerun_that_trains_nothing_keeps_the_metrics(main_job):
    config, workdir, _ = main_job
    path = os.path.join(workdir, "metrics.json")
    with open(path, "rb") as f:
        before = f.read()
    again = pipeline.train_and_evaluate(config, workdir)
    with open(path, "rb") as f:
        assert f.read() == before
    assert again == json.loads(before) and again["steps_this_run"] == 4


def test_a_rerun_that_trains_nothing_reads_damaged_metrics_with_a_warning(
    main_job, tmp_path, caplog
):
    config, workdir, _ = main_job
    copy = shutil.copytree(workdir, tmp_path / "run")
    damaged = (copy / "metrics.json").read_bytes()[:100]
    (copy / "metrics.json").write_bytes(damaged)
    with caplog.at_level("WARNING", logger="stochinterp.pipeline"):
        assert pipeline.train_and_evaluate(config, str(copy)) == {}
    assert (copy / "metrics.json").read_bytes() == damaged  # left for the user
    assert any("metrics.json cannot be read" in r.getMessage() for r in caplog.records)
    assert not list(copy.glob("*.tmp"))


def test_more_images_than_the_held_out_split_is_an_input_error(main_job):
    from stochinterp.input_errors import is_input_error

    config, _, _ = main_job
    info = pipeline.data_lib.dataset_info(config.data)
    held_out = info.split_sizes[info.eval_split]
    pipeline.check_held_out_size(config, held_out)
    with pytest.raises(ValueError, match=f"{held_out + 1} images .* holds {held_out}"):
        try:
            pipeline.check_held_out_size(config, held_out + 1)
        except ValueError as e:
            assert is_input_error(e)
            raise


def test_an_empty_held_out_split_points_to_the_training_split(monkeypatch):
    from configs import imagenet256_inpaint

    config = imagenet256_inpaint.get_config()  # imagenet_folder, 'validation'
    empty = pipeline.data_lib.DataInfo(
        "imagenet_folder",
        256,
        3,
        1000,
        {"train": 12, "validation": 0},
        "validation",
        (),
    )
    monkeypatch.setattr(pipeline.data_lib, "dataset_info", lambda data: empty)
    with pytest.raises(ValueError) as raised:
        pipeline.check_held_out_size(config, 4)
    assert str(raised.value) == (
        "4 images to sample (eval.num_images or --num_samples), but split "
        "'validation' of imagenet_folder holds 0 (its source gave no images for "
        "it; data.eval_split='train' samples training images instead)"
    )
    config.data.eval_split = "train"
    pipeline.check_held_out_size(config, 4)
    with pytest.raises(ValueError, match=r"split 'train' of imagenet_folder holds 12$"):
        pipeline.check_held_out_size(config, 13)


def test_a_second_run_on_a_busy_workdir_is_refused(main_job, tmp_path):
    import fcntl

    config, workdir, _ = main_job
    with open(os.path.join(workdir, ".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another run is training"):
            pipeline.train.train(config, workdir)


def test_uncoupled_baseline_is_evaluated_on_its_mask_channel(main_job, tmp_path):
    config, _, _ = main_job
    baseline = tiny_config(config.data.data_dir)
    baseline.coupling.name = "independent"
    baseline.coupling.baseline_condition = "inpainting"
    mesh = pipeline.sharding.make_mesh()
    _, _, model, _, optimizer = pipeline.train.setup(baseline, mesh)
    coupling = pipeline.couplings.from_config(baseline.coupling)
    state = pipeline.train.init_state(baseline, model, optimizer, coupling, mesh)
    metrics = pipeline.evaluate_inpainting(
        baseline, model, state.params, str(tmp_path), mesh
    )
    assert 0.0 < metrics["hidden_fraction"] < 1.0
    assert metrics["nfe"] == 5
    assert os.path.exists(tmp_path / "samples" / "inpaint.png")


def _launch(name, config, workdir, *overrides):
    """Runs launch.<name> on the tiny main job's workdir with its config."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        f"launch.{name}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={config.data.data_dir}",
        "--config.model.dim=8",
        "--config.model.dim_mults=(1, 2)",
        "--config.model.resnet_block_groups=4",
        "--config.eval.num_images=8",
        "--cpu_devices=2",
        *overrides,
    ]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_sampling_outputs_of_other_settings_are_kept_apart(main_job):
    config, workdir, _ = main_job
    evaluated = _launch(
        "evaluate",
        config,
        workdir,
        "--config.sampler.method=heun",
        "--config.sampler.num_steps=3",
        "--config.eval.use_ema=False",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    with open(os.path.join(workdir, "eval_heun_step4_raw_n8_seed1234.json")) as f:
        metrics = json.load(f)
    assert metrics["step"] == 4 and metrics["use_ema"] is False
    assert metrics["nfe"] == 5  # Heun with 3 steps: 2 x 3 - 1 calls
    assert metrics["sampler_settings"] == {
        "method": "heun",
        "num_steps": 3,
        "t_min": 0.0,
        "t_max": 1.0,
        "guidance_scale": 1.0,
    }
    assert (metrics["accepted_steps"], metrics["rejected_steps"]) == (3, 0)
    assert metrics["split"] == "test"  # the held-out split of photo_patches
    assert os.path.exists(
        os.path.join(workdir, "samples", "inpaint_heun_step4_raw_n8_seed1234.png")
    )
    # The training run's own picture is not replaced.
    assert os.path.exists(os.path.join(workdir, "samples", "inpaint.png"))

    for seed in ("1", "2"):  # a batch above the count samples all at once
        sampled = _launch(
            "sample",
            config,
            workdir,
            "--num_samples=4",
            f"--seed={seed}",
            "--tag=a",
            f"--batch={4 * (int(seed) - 1)}",
        )
        assert sampled.returncode == 0, sampled.stderr[-2000:]
    first, second = (
        np.load(
            os.path.join(workdir, "samples", f"samples_euler_step4_n4_seed{s}_a.npz")
        )
        for s in (1, 2)
    )
    record = json.loads(str(first["sampling"]))
    assert record["sampler_settings"]["num_steps"] == 20  # the config file
    assert json.loads(str(second["sampling"])) == record  # no batch recorded
    assert record["nfe"] == 20 and record["accepted_steps"] == 20
    assert first["samples"].shape == (4, 16, 16, 3)
    assert not np.array_equal(first["x0"], second["x0"])  # another seed's noise
    # The coupling's mask and conditioning come with the samples; known pixels
    # are the ground truth's, in the samples as in x0.
    assert first["mask"].shape == (4, 16, 16, 1) and "labels" not in first
    assert set(np.unique(first["mask"])) == {0.0, 1.0}
    known = np.broadcast_to(first["mask"], first["samples"].shape) == 1.0
    np.testing.assert_array_equal(first["samples"][known], first["x0"][known])
    np.testing.assert_array_equal(first["x0"][known], first["ground_truth"][known])
    assert first["cond"].shape[:3] == (4, 16, 16)

    bad = _launch("sample", config, workdir, "--tag=a/b")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: --tag may hold only letters, digits, '.', '_' and '-', got 'a/b'"
    )


def test_output_names_tell_the_settings_apart():
    from launch import _common

    config = inpaint_photos16.get_config()
    config.sampler.method = "heun"
    assert _common.output_name(config, 7, "") == "heun_step7"
    config.eval.use_ema = False
    config.sampler.guidance_scale = 2.5
    assert (
        _common.output_name(config, 7, "v2", seed=0, count=16)
        == "heun_step7_raw_w2.5_n16_seed0_v2"
    )
    config.sampler.guidance_scale = 1.0000001  # not rounded to "w1"
    assert _common.output_name(config, 7, "") == "heun_step7_raw_w1.0000001"
    config.sampler.guidance_scale = -0.0  # the same setting as 0
    assert _common.output_name(config, 7, "") == "heun_step7_raw_w0.0"
    config.data.eval_split = "train"  # other images
    assert (
        _common.output_name(config, 7, "", 0, 4) == "heun_step7_raw_w0.0_train_n4_seed0"
    )
    config.data.eval_split = "test"  # the held-out split, named: the same images
    assert _common.output_name(config, 7, "") == "heun_step7_raw_w0.0"
    # Evaluation in batches draws otherwise; one batch of all the images not.
    assert _common.output_name(config, 7, "t", 0, 16, batch=4) == (
        "heun_step7_raw_w0.0_n16_seed0_b4_t"
    )
    for batch in (0, 16):
        name = _common.output_name(config, 7, "", 0, 16, batch=batch)
        assert name == "heun_step7_raw_w0.0_n16_seed0"


def test_replacing_an_output_of_other_sampler_or_fid_settings_warns(tmp_path, caplog):
    config = inpaint_photos16.get_config()  # Euler, 20 steps
    settings = dict(method="euler", num_steps=20, t_min=0.0, t_max=1.0)
    record = {"sampler": "euler", "sampler_settings": settings, "nfe": 20}
    settings.update(guidance_scale=1.0)
    same = tmp_path / "same.json"
    same.write_text(json.dumps(record))
    settings.update(num_steps=40, t_max=0.99)
    other_json = tmp_path / "other.json"
    other_json.write_text(json.dumps(record))
    other_npz = str(tmp_path / "other.npz")
    np.savez(other_npz, samples=np.zeros(2), sampling=np.asarray(json.dumps(record)))
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 not a zip")
    with caplog.at_level("WARNING", logger="stochinterp.pipeline"):
        for path in (same, tmp_path / "absent.json", damaged):
            pipeline.warn_if_replacing(str(path), config)
        assert caplog.messages == []
        pipeline.warn_if_replacing(str(other_json), config)
        pipeline.warn_if_replacing(other_npz, config)
    changes = "(num_steps: 40 -> 20, t_max: 0.99 -> 1.0); pass --tag to keep both"
    assert caplog.messages == [
        f"replacing {path}, written with other settings {changes}"
        for path in (other_json, other_npz)
    ]

    # A setting recorded on one side only is a change too.
    settings.update(num_steps=20, t_max=1.0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="stochinterp.pipeline"):
        for extra in ({"noise": "old"}, {}):
            recorded = dict(settings, **extra)
            if not extra:
                del recorded["guidance_scale"]
            same.write_text(json.dumps({**record, "sampler_settings": recorded}))
            pipeline.warn_if_replacing(str(same), config)
    assert [m.split("(")[1].split(")")[0] for m in caplog.messages] == [
        "noise: 'old' -> None",
        "guidance_scale: None -> 1.0",
    ]

    # FID of other weights or against another reference, or none.
    fid_json = tmp_path / "fid.json"
    fid_json.write_text(
        json.dumps({**record, "fid_weights": "a.npz", "fid_reference": "ground truth"})
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="stochinterp.pipeline"):
        for weights, reference in (("a.npz", ""), ("b.npz", ""), ("a.npz", "s.npz")):
            config.eval.fid_weights, config.eval.fid_reference = weights, reference
            pipeline.warn_if_replacing(str(fid_json), config)
        config.eval.fid_weights, config.eval.fid_reference = "", ""
        pipeline.warn_if_replacing(str(fid_json), config)
    assert [m.split("(")[1].split(")")[0] for m in caplog.messages] == [
        "fid_weights: 'a.npz' -> 'b.npz'",
        "fid_reference: 'ground truth' -> 's.npz'",
        "fid_reference: 'ground truth' -> None, fid_weights: 'a.npz' -> None",
    ]


@pytest.mark.slow
def test_the_main_job_beats_the_mean_fill_baseline(tmp_path):
    """The README's main job as it runs (200 s of training), then its metrics.

    It runs as the README's command, in a process of its own with XLA's
    default settings (the tests' own compile at a lower optimization level,
    and would train fewer steps in the budget). Measured on an idle 2-core
    CPU: 24.2-24.7 dB against 19.2 dB; 22.4-23.4 dB on a loaded one. The
    bound leaves room for a loaded machine.
    """
    import subprocess
    import sys

    workdir = tmp_path / "workdir"
    command = [sys.executable, "-m", "launch.train", f"--workdir={workdir}"]
    command.append(f"--config.data.data_dir={tmp_path / 'data'}")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(workdir / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["known_pixels_exact"] is True
    assert metrics["num_images"] == 64 and metrics["nfe"] == 20
    gain = metrics["psnr_hidden_sample"] - metrics["psnr_hidden_mean_fill"]
    assert gain > 2.0, metrics
    assert metrics["mse_ratio_last_first"] < 0.5, metrics


def test_a_workdir_without_its_config_is_sampled_with_one_warning(
    main_job, tmp_path, caplog
):
    config, workdir, _ = main_job
    shutil.copytree(
        os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints", symlinks=True
    )
    mesh = pipeline.sharding.make_mesh()
    with caplog.at_level("WARNING", logger="stochinterp.pipeline"):
        pipeline.check_trained_workdir(config, str(tmp_path))
        _, _, step = pipeline.load_variables(config, str(tmp_path), mesh, True)
    assert step == config.train.num_steps
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path} has no config.json (training writes one): the config given "
        "here cannot be checked against the run's; sampling with another "
        "coupling or path gives wrong results without an error"
    ]
    caplog.clear()
    shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
    with caplog.at_level("WARNING", logger="stochinterp.pipeline"):
        pipeline.load_variables(config, str(tmp_path), mesh, True)
    assert caplog.records == []


def test_a_sigterm_during_the_final_save_ends_the_run_unevaluated(
    main_job, tmp_path, monkeypatch, caplog
):
    """The stop asked while the last checkpoint is written is honoured."""
    config = tiny_config(main_job[0].data.data_dir)  # the data built already
    config.train.num_steps = 2
    real_save = pipeline.train.checkpointing.save

    def save_then_sigterm(manager, step, *args, **kwargs):
        real_save(manager, step, *args, **kwargs)
        if step == config.train.num_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pipeline.train.checkpointing, "save", save_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    workdir = tmp_path / "workdir"
    with caplog.at_level("INFO"):
        assert pipeline.train_and_evaluate(config, str(workdir)) == {}
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert not (workdir / "metrics.json").exists()
    messages = [r.getMessage() for r in caplog.records]
    assert "stopped by SIGTERM or Ctrl-C at step 2; the checkpoint is saved" in messages
    assert "compiling the training step; the first progress line comes at step 2" in (
        messages
    )


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weight file of the FID network with random values."""
    folder = tmp_path_factory.mktemp("inception")
    return _inception.write_random_weights(str(folder / "inception.npz"))


@pytest.mark.slow  # compiles the sampler and the FID network in a launcher
def test_evaluation_measures_fid_when_given_the_weights(main_job, inception_weights):
    config, workdir, _ = main_job
    evaluated = _launch(
        "evaluate",
        config,
        workdir,
        f"--config.eval.fid_weights={inception_weights}",
        "--config.eval.fid_batch=3",
        "--tag=fid",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    with open(os.path.join(workdir, "eval_euler_step4_n8_seed1234_fid.json")) as f:
        metrics = json.load(f)
    assert metrics["fid_sample"] > 0 and metrics["fid_mean_fill"] > 0
    assert metrics["fid_sample"] != metrics["fid_mean_fill"]
    assert metrics["eval_settings"]["fid_batch"] == 3
    assert (metrics["fid_reference"], metrics["fid_images"]) == ("ground truth", 8)


def test_fid_settings_are_refused_before_sampling(main_job, inception_weights):
    config, workdir, _ = main_job
    evaluated = _launch(
        "evaluate",
        config,
        workdir,
        f"--config.eval.fid_weights={inception_weights}",
        "--config.eval.fid_reference=/absent/s.npz",
    )
    assert "'/absent/s.npz' is not a file" in one_line_error(evaluated)


def test_a_damaged_inception_file_is_refused_before_sampling(main_job, tmp_path):
    config, workdir, _ = main_job
    np.savez(tmp_path / "w.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="lacks 470 of the 470 arrays"):
        fid_eval.load(
            _with_fid(config, str(tmp_path / "w.npz")),
            pipeline.sharding.make_mesh(),
            8,
        )


def _with_fid(config, path):
    config = config.copy_and_resolve_references()
    config.eval.fid_weights = path
    return config


def test_held_out_fid_accumulates_the_batches_of_a_key_per_batch(
    main_job, inception_weights, tmp_path
):
    config, workdir, _ = main_job
    config = _with_fid(config, inception_weights)
    config.eval.fid_batch = 4  # the FID network compiled once, for 4 images
    mesh = pipeline.sharding.make_mesh()
    model, variables, _ = pipeline.load_variables(config, workdir, mesh, True)
    setup = fid_eval.load(config, mesh, 8)
    programs = evaluate._kept_program.cache_info()
    metrics, (x1, samples, x0) = pipeline.held_out_fid(
        config, model, variables, mesh, setup, 8, 4, seed=3
    )
    # One sampling program serves both batches.
    now = evaluate._kept_program.cache_info()
    assert now.misses - programs.misses <= 1 and now.hits - programs.hits >= 1
    assert metrics["nfe_per_batch"] == [5, 5] and metrics["fid_images"] == 8
    assert metrics["split"] == "test"

    # The same draws one batch at a time, then FID of the whole at once.
    key = jax.random.key(3)
    batches = [
        pipeline.sample_test_images(
            config, model, variables, mesh, 4, 3, start, jax.random.fold_in(key, c)
        )
        for c, start in enumerate((0, 4))
    ]
    truth = np.concatenate([b[0] for b in batches])
    expected = fid_eval.measure(
        setup,
        truth,
        sample=np.concatenate([b[1] for b in batches]),
        mean_fill=np.concatenate(
            [fid_eval.baselines(config, b[0], b[2])["mean_fill"] for b in batches]
        ),
    )
    for name in ("fid_sample", "fid_mean_fill"):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-9)
    np.testing.assert_array_equal(x1, batches[0][0])
    np.testing.assert_array_equal(samples, batches[0][1])
    np.testing.assert_array_equal(x0, batches[0][2].x0)
    assert not np.array_equal(batches[0][0], batches[1][0])  # other images

    # launch.sample in batches keeps the same batches and measures the same FID.
    stem = str(tmp_path / "s")
    record, _ = pipeline.sample_held_out(
        config, model, variables, mesh, setup, stem, 8, 4, seed=3
    )
    saved = np.load(stem + ".npz")
    assert json.loads(str(saved["sampling"])) == record
    assert record["batch"] == 4 and record["nfe_per_batch"] == [5, 5]
    assert record["fid_images"] == 8 and record["fid_reference"] == "ground truth"
    assert record["fid_weights"] == inception_weights
    assert {k for k in record if k.startswith("fid_")} == {
        "fid_sample",
        "fid_mean_fill",
        "fid_images",
        "fid_seconds",
        "fid_reference",
        "fid_weights",
    }
    for name in ("fid_sample", "fid_mean_fill"):
        assert record[name] == metrics[name], name
    for name, c in (("ground_truth", 0), ("samples", 1)):
        np.testing.assert_array_equal(
            saved[name], np.concatenate([b[c] for b in batches])
        )
    for name in ("x0", "mask", "cond"):
        parts = [np.asarray(getattr(b[2], name)) for b in batches]
        np.testing.assert_array_equal(saved[name], np.concatenate(parts), name)
    assert sorted(saved) == [
        "cond",
        "ground_truth",
        "mask",
        "samples",
        "sampling",
        "x0",
    ]
    # The picture shows the first batch; nothing else is left in the folder.
    assert sorted(os.listdir(tmp_path)) == ["s.npz", "s.png"]
    grid = str(tmp_path / "expected.png")
    evaluate.save_grid(grid, [np.clip(x0, -1, 1), samples, x1])
    np.testing.assert_array_equal(
        np.asarray(Image.open(stem + ".png")), np.asarray(Image.open(grid))
    )


def test_sampling_in_one_batch_draws_with_the_seed_itself(main_job, tmp_path):
    config, workdir, _ = main_job
    mesh = pipeline.sharding.make_mesh()
    model, variables, _ = pipeline.load_variables(config, workdir, mesh, True)
    x1, samples, sample, _, _ = pipeline.sample_test_images(
        config, model, variables, mesh, 4, 5
    )
    stem = str(tmp_path / "one")
    record, _ = pipeline.sample_held_out(
        config, model, variables, mesh, None, stem, 4, 4, seed=5
    )
    saved = np.load(stem + ".npz")
    np.testing.assert_array_equal(saved["samples"], samples)
    np.testing.assert_array_equal(saved["x0"], sample.x0)
    np.testing.assert_array_equal(saved["ground_truth"], x1)
    assert record["nfe"] == 5 and json.loads(str(saved["sampling"])) == record
    assert not {"batch", "nfe_per_batch", "fid_images"} & set(record)


def test_sampling_stopped_between_batches_leaves_the_earlier_file(
    main_job, tmp_path, monkeypatch
):
    config, workdir, _ = main_job
    mesh = pipeline.sharding.make_mesh()
    model, variables, _ = pipeline.load_variables(config, workdir, mesh, True)
    stem = str(tmp_path / "s")
    np.savez(stem + ".npz", samples=np.arange(3))
    sample_test_images = pipeline.sample_test_images

    def stopped_in_second_batch(config, model, variables, mesh, n, seed, start, key):
        if start:
            raise KeyboardInterrupt
        return sample_test_images(config, model, variables, mesh, n, seed, start, key)

    monkeypatch.setattr(pipeline, "sample_test_images", stopped_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.sample_held_out(config, model, variables, mesh, None, stem, 4, 2, 0)
    np.testing.assert_array_equal(np.load(stem + ".npz")["samples"], np.arange(3))
    assert os.listdir(tmp_path) == ["s.npz"]  # no parts, no picture


@pytest.mark.slow  # compiles the sampler and the FID network in a launcher
def test_launch_fid_writes_its_metrics_and_picture(main_job, inception_weights):
    config, workdir, _ = main_job
    ran = _launch(
        "fid",
        config,
        workdir,
        f"--config.eval.fid_weights={inception_weights}",
        "--num_samples=8",
        "--batch=4",
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    name = "fid_euler_step4_n8_seed0_b4"
    with open(os.path.join(workdir, f"{name}.json")) as f:
        metrics = json.load(f)
    assert metrics["nfe_per_batch"] == [20, 20] and metrics["fid_images"] == 8
    assert metrics["fid_sample"] > 0 and metrics["fid_mean_fill"] > 0
    assert metrics["step"] == 4 and metrics["fid_reference"] == "ground truth"
    assert "FID: 8 of 8 images" in ran.stderr
    image = Image.open(os.path.join(workdir, "samples", f"{name}.png"))
    assert image.size == (4 * (16 * 4 + 2) + 2, 3 * (16 * 4 + 2) + 2)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ((), "launch.fid needs --config.eval.fid_weights"),
        (("FID", "--batch=3"), "--batch=3 must be a positive multiple of the number"),
    ],
)
def test_launch_fid_refuses_bad_settings_in_one_line(
    main_job, inception_weights, overrides, words
):
    config, workdir, _ = main_job
    weights = f"--config.eval.fid_weights={inception_weights}"
    args = [weights if o == "FID" else o for o in overrides]
    assert words in one_line_error(_launch("fid", config, workdir, *args))


def test_the_sample_count_meets_the_devices_only_when_sampling_now(
    main_job, tmp_path, monkeypatch
):
    config = main_job[0].copy_and_resolve_references()
    config.eval.num_images = 7  # not a multiple of the 2 devices
    with pytest.raises(ValueError, match=r"\(7: eval.num_images .* devices \(2\)"):
        pipeline.train_and_evaluate(config, str(tmp_path / "run"))

    class Trained(Exception):
        pass

    def trained(*args):
        raise Trained

    monkeypatch.setattr(pipeline.train, "train", trained)
    with pytest.raises(Trained):
        pipeline.train_and_evaluate(config, str(tmp_path / "run"), False)
    config.eval.num_images = 0
    with pytest.raises(ValueError, match=r"\(0: eval.num_images"):
        pipeline.train_and_evaluate(config, str(tmp_path / "run"), False)


def test_the_main_job_reads_the_fid_files_before_training(main_job, tmp_path):
    config, _, _ = main_job
    np.savez(tmp_path / "w.npz", other=np.zeros(3))
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="lacks 470 of the 470"):
        pipeline.train_and_evaluate(
            _with_fid(config, str(tmp_path / "w.npz")), str(workdir)
        )
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("fid_reference", "/absent/s.npz", "needs eval.fid_weights"),
        ("fid_batch", 0, "eval.fid_batch must be a positive integer, got 0"),
        ("fid_weights", "/absent/w.npz", "'/absent/w.npz' is not a file"),
    ],
)
def test_fid_fields_are_checked_with_the_sampler_settings(
    main_job, field, value, words
):
    config = main_job[0].copy_and_resolve_references()
    setattr(config.eval, field, value)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(words)):
        pipeline.validate_sampling(config, pipeline.sharding.make_mesh())


def test_a_folder_in_place_of_an_output_file_is_refused_before_sampling(
    main_job, inception_weights
):
    config, workdir, _ = main_job
    blocked = os.path.join(workdir, "fid_euler_step4_n8_seed0_b8_blocked.json")
    os.makedirs(blocked)
    try:
        result = _launch(
            "fid",
            config,
            workdir,
            "--tag=blocked",
            f"--config.eval.fid_weights={inception_weights}",
            "--num_samples=8",
            "--batch=16",  # the name tells the batch used: 8
        )
        assert one_line_error(result) == (
            f"error: {blocked!r} is a folder, where an output file is to be "
            "written; move it out of the way or choose another --tag"
        )
    finally:
        os.rmdir(blocked)


def test_output_files_are_checked_before_any_work(tmp_path):
    from stochinterp.input_errors import is_input_error

    pipeline.check_output_files(str(tmp_path / "a.json"), str(tmp_path / "new/b.png"))
    assert (tmp_path / "new").is_dir()  # made ready, and proven writable
    (tmp_path / "taken.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="taken.npz' is a folder") as caught:
        pipeline.check_output_files(
            str(tmp_path / "a.json"), str(tmp_path / "taken.npz")
        )
    assert is_input_error(caught.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file' is a file, not a folder"):
        pipeline.check_output_files(str(tmp_path / "file" / "c.json"))
