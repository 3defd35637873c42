"""The training loop end to end on a tiny synthetic store: resume after kill -9, SIGTERM, NaN stop,
damaged checkpoints, and the files a run leaves."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from medseg_jax import checkpoint
from medseg_jax.config import load_config
from medseg_jax.data.dataset import load_dataset
from medseg_jax.data.fingerprint import compute_fingerprint
from medseg_jax.data.plan import make_plan
from medseg_jax.data.preprocess import preprocess_dataset
from medseg_jax.data.store import CaseStore
from medseg_jax.data.synthetic import write_synthetic_dataset
from medseg_jax.errors import TrainingError
from medseg_jax.train.loop import train

STEPS = 8
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.checkpoint_every=2",
    "train.val_every=4",
    "train.log_every=1",
    "train.keep_checkpoints=2",
    "model.base_features=4",
    "data.batch_size=2",
    "data.patch_size=[32, 32]",
]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    dataset = load_dataset(write_synthetic_dataset(root / "raw", 5, seed=3, shape=(32, 32, 12)))
    plan = make_plan(compute_fingerprint(dataset), dim=2, voxel_budget=2 * 32 * 32, max_stages=3)
    store = CaseStore(root / "store", chunk_shape=(32, 32, 1))
    preprocess_dataset(dataset, plan, store, progress=False)  # records the plan in the store
    return root / "store"


def train_command(store_dir, run_dir, *extra):
    args = [
        sys.executable,
        "-m",
        "medseg_jax.cli",
        "train",
        "--data",
        str(store_dir),
        "--out",
        str(run_dir),
        "--quiet",
        *extra,
    ]
    for override in OVERRIDES:
        args += ["--set", override]
    return args


def final_params(run_dir, config_overrides=OVERRIDES):
    """The params of the newest checkpoint, restored on one device (no model building needed)."""
    manager = checkpoint.make_manager(Path(run_dir) / "checkpoints")
    step = max(manager.all_steps())
    restored = manager.restore(step)  # restore as saved (numpy / single device): fine for comparison
    return step, jax.tree_util.tree_leaves(restored["state"]["params"])


@pytest.fixture(scope="module")
def uninterrupted(store_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    summary = train(load_config(None, OVERRIDES), store_dir, run_dir, progress=False)
    return run_dir, summary


def test_run_folder_contents(uninterrupted):
    run_dir, summary = uninterrupted
    assert summary.step == STEPS and not summary.stopped_early
    for name in ("config.yaml", "plan.json", "environment.json", "metrics.jsonl", "training_curve.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == list(range(1, STEPS + 1))
    assert [e["step"] for e in entries if "val_dice" in e] == [4, 8]
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["jax"] == jax.__version__ and environment["seed"] == 0
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-2:] == [6, 8]  # latest two kept (plus the best validation one, which may be 4)


def logged(metrics_path: Path) -> int:
    """Training steps logged so far in a run's metrics.jsonl (one line per step in these tests)."""
    if not metrics_path.is_file():
        return 0
    return sum('"loss"' in line for line in metrics_path.read_text().splitlines())


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of ``folder`` (TFRecord framing: length, its CRC,
    the Event protobuf, its CRC), by tag."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_events_and_the_log_file(uninterrupted):
    run_dir, _ = uninterrupted
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/seconds_per_step"):
        assert [step for step, _ in scalars[tag]] == list(range(1, STEPS + 1)), tag
    losses = [e["loss"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses, rel=1e-6)
    for tag in ("val/dice/liver", "val/dice/tumour", "val/pseudo_dice"):
        assert [step for step, _ in scalars[tag]] == [4, 8], tag
    lines = (run_dir / "log.txt").read_text().splitlines()
    validations = [line for line in lines if "val Dice" in line]
    assert len(validations) == 2 and f"step 4/{STEPS}" in validations[0] and "pseudo-Dice" in validations[0]
    assert "steps/s" in validations[0] and "ETA" in validations[0] and "liver" in validations[0]


def test_the_step_loop_makes_no_hidden_transfers(store_dir, tmp_path):
    """Under jax.transfer_guard("disallow") every implicit host/device transfer in the step loop is an
    error; only the explicit batch transfer and the one-step-late metric read remain."""
    config = load_config(None, [*OVERRIDES, "train.steps=4", "train.val_every=2"])
    summary = train(config, store_dir, tmp_path / "guarded", progress=False, transfer_guard="disallow")
    assert summary.step == 4


def test_a_finished_run_can_be_trained_longer_but_not_shorter(store_dir, uninterrupted, tmp_path):
    import shutil

    from medseg_jax.errors import ConfigError

    run_dir = tmp_path / "longer"
    shutil.copytree(uninterrupted[0], run_dir)
    with pytest.raises(ConfigError, match=rf"train\.steps=4 is below step {STEPS} of the checkpoint"):
        train(load_config(None, [*OVERRIDES, "train.steps=4"]), store_dir, run_dir, progress=False)
    messages = []
    summary = train(
        load_config(None, [*OVERRIDES, f"train.steps={STEPS + 2}"]),
        store_dir,
        run_dir,
        progress=False,
        log=messages.append,
    )
    assert summary.step == STEPS + 2 and any(f"resuming from step {STEPS}" in m for m in messages)
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == list(range(1, STEPS + 3))


def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(store_dir, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    metrics = run_dir / "metrics.jsonl"
    for _ in range(3):
        proc = subprocess.Popen(train_command(store_dir, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # a random moment measured in training progress, not seconds (machines differ in speed): once a
        # random number of steps is logged (0: still starting up), plus up to half a second
        logged_steps = rng.randint(0, STEPS - 1)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and logged(metrics) < logged_steps:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=120)
    finish = subprocess.run(train_command(store_dir, run_dir), capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert kills >= 1
    step, params = final_params(run_dir)
    ref_step, ref_params = final_params(uninterrupted[0])
    assert step == ref_step == STEPS
    # bit-identical: same rng, schedule position, data stream and arithmetic on CPU
    for a, b in zip(params, ref_params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_and_exits_cleanly_then_resumes(store_dir, tmp_path):
    run_dir = tmp_path / "term"
    proc = subprocess.Popen(
        train_command(
            store_dir,
            run_dir,
            "--set",
            "train.steps=400",
            "--set",
            "train.checkpoint_every=100",
            "--set",
            "train.val_every=1000",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Resume with the same command" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] and 3 <= summary["step"] < 400
    manager = checkpoint.make_manager(run_dir / "checkpoints")
    assert max(manager.all_steps()) == summary["step"]


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(store_dir, uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "damaged"
    shutil.copytree(uninterrupted[0], run_dir)
    newest = run_dir / "checkpoints" / str(STEPS)
    for path in newest.rglob("*"):
        if path.is_file() and path.parent.name != "meta":
            path.write_bytes(b"\0garbage")
    messages = []
    summary = train(load_config(None, OVERRIDES), store_dir, run_dir, progress=False, log=messages.append)
    assert any(f"checkpoint {STEPS} is unreadable" in m for m in messages), messages
    assert any("resuming from step 6" in m for m in messages), messages
    assert summary.step == STEPS


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(store_dir, tmp_path):
    config = load_config(
        None, [*OVERRIDES, "train.learning_rate=1e12", "train.grad_clip_norm=null", "train.optimizer=sgd"]
    )
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step \d+") as info:
        train(config, store_dir, tmp_path / "nan", progress=False)
    assert "last good checkpoint" in str(info.value)


def test_resume_refuses_a_different_model(store_dir, uninterrupted, tmp_path):
    import shutil

    from medseg_jax.errors import ConfigError

    run_dir = tmp_path / "other"
    shutil.copytree(uninterrupted[0], run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"different model config \(model\.base_features, model\.features\)"):
        train(load_config(None, [*OVERRIDES, "model.base_features=8"]), store_dir, run_dir, progress=False)
    # refused before anything was written: the run can still be predicted from
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_run_folder_inside_the_store_is_refused(store_dir, capsys):
    from medseg_jax.cli import main

    cases_before = sorted(p.name for p in store_dir.iterdir())
    for out in (store_dir, store_dir / "run"):
        assert main(train_command(store_dir, out)[3:]) == 2
        assert "inside the store" in capsys.readouterr().err
    assert sorted(p.name for p in store_dir.iterdir()) == cases_before


def test_train_into_a_path_that_is_a_file_is_one_error_line(store_dir, tmp_path, capsys):
    from medseg_jax.cli import main

    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert main(train_command(store_dir, target)[3:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "taken" in err and "Traceback" not in err
    assert target.read_text() == "not a folder"


def test_predict_with_an_edited_config_names_config_yaml(store_dir, uninterrupted, tmp_path):
    import shutil

    import yaml

    run_dir = tmp_path / "edited"
    shutil.copytree(uninterrupted[0], run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["features"] = [8, 16, 32]  # a wider network than the checkpoint holds
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    image = sorted((store_dir.parent / "raw" / "Dataset001_SynthLiver" / "imagesTr").iterdir())[0]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medseg_jax.cli",
            "predict",
            "--model",
            str(run_dir),
            "-i",
            str(image),
            "-o",
            str(tmp_path / "mask.nii.gz"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "config.yaml disagrees with the checkpoint" in result.stderr and "model.features" in result.stderr
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "mask.nii.gz").exists()


def test_predict_and_evaluate_with_the_trained_run(store_dir, uninterrupted, tmp_path, capsys):
    from medseg_jax.cli import main
    from medseg_jax.data.image_io import read_nifti_header

    dataset = store_dir.parent / "raw" / "Dataset001_SynthLiver"
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--model",
                str(uninterrupted[0]),
                "-i",
                str(dataset / "imagesTr"),
                "-o",
                str(out),
                "--quiet",
                "--mirror-axes",
                "0",
                "--largest-component",
                "1",
                "--report",
            ]
        )
        == 0
    )
    assert "predicted 5 case(s)" in capsys.readouterr().out
    from scipy import ndimage

    from medseg_jax.data.image_io import read_nifti

    for path in out.glob("*.nii.gz"):  # class 1 kept to one component (full connectivity)
        liver = read_nifti(path).array == 1
        assert ndimage.label(liver, np.ones((3, 3, 3)))[1] <= 1
    for label in sorted((dataset / "labelsTr").iterdir()):
        shape, affine = read_nifti_header(out / label.name)
        ref_shape, ref_affine = read_nifti_header(label)
        assert shape == ref_shape
        np.testing.assert_allclose(affine, ref_affine, atol=1e-5)
    assert len(list((out / "report").glob("*.png"))) == 5
    (out / "report").rename(tmp_path / "predict_report")
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(out),
                "--ref",
                str(dataset / "labelsTr"),
                "--labels",
                str(dataset / "dataset.json"),
                "--quiet",
                "--report",
                "--images",
                str(dataset / "imagesTr"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / "report").glob("*.png")) == sorted(
        p.name.replace(".nii.gz", ".png") for p in (dataset / "labelsTr").iterdir()
    )
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert "liver" in json.dumps(summary)


def test_predict_with_a_folder_that_is_not_a_run(tmp_path, capsys):
    from medseg_jax.cli import main

    assert main(["predict", "--model", str(tmp_path), "-i", str(tmp_path), "-o", str(tmp_path / "out.nii.gz")]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists()


def test_cpu_side_augmentation_mode_trains(store_dir, tmp_path):
    config = load_config(None, [*OVERRIDES, "train.steps=2", "train.val_every=2", "augment.mode=cpu"])
    summary = train(config, store_dir, tmp_path / "cpu_aug", progress=False)
    assert summary.step == 2 and np.isfinite(summary.final_loss)


def test_patch_validation_mode_validates_on_patches(store_dir, tmp_path):
    config = load_config(
        None, [*OVERRIDES, "train.steps=2", "train.val_every=2", "train.val_mode=patches", "train.val_batches=1"]
    )
    train(config, store_dir, tmp_path / "patch_val", progress=False)
    entries = [json.loads(line) for line in (tmp_path / "patch_val" / "metrics.jsonl").read_text().splitlines()]
    validations = [e for e in entries if "val_dice" in e]
    assert [e["step"] for e in validations] == [2]
    assert np.isfinite(validations[0]["val_loss"]) and len(validations[0]["val_dice_per_class"]) == 3


def test_the_curve_names_every_validation_mode():
    import typing

    from medseg_jax.config import TrainConfig
    from medseg_jax.train.hooks import VALIDATION_LABELS

    modes = typing.get_args(typing.get_type_hints(TrainConfig)["val_mode"])
    assert set(VALIDATION_LABELS) == set(modes) == {"sliding_window", "patches"}


@pytest.mark.parametrize(
    "error, damaged",
    [
        (FileNotFoundError("no such file: 8/state/d/abc"), True),
        (ValueError("Error reading chunk: unexpected end of data"), True),
        (ValueError("Failed to decode zstd frame"), True),
        (json.JSONDecodeError("Expecting value", "x", 0), True),
        (MemoryError(), False),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB"), False),
        (RuntimeError("UNAVAILABLE: storage backend temporarily unreachable"), False),
        (ValueError("Requested shape: (5, 3) is not compatible with the stored shape: (4, 3). Truncating..."), False),
        (ValueError("Topology mismatch detected. The checkpoint was saved with a different topology"), False),
    ],
)
def test_only_damage_makes_a_checkpoint_be_passed_over(error, damaged):
    assert checkpoint.is_damage(error) is damaged


def test_a_restore_error_that_is_not_damage_is_reported_and_nothing_set_aside(tmp_path):
    import jax.numpy as jnp

    from medseg_jax.errors import CheckpointError

    manager = checkpoint.make_manager(tmp_path / "checkpoints")
    checkpoint.save(manager, 1, {"w": jnp.ones((4, 3))}, {"next_index": 0}, {"config": {}})
    manager.wait_until_finished()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    other_network = {"w": jax.ShapeDtypeStruct((5, 3), jnp.float32, sharding=device)}
    with pytest.raises(CheckpointError, match="does not look like damaged files, so it was not set aside"):
        checkpoint.restore_latest_good(manager, other_network)
    manager.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_autotune_trains_records_the_choice_resumes_without_it_and_predicts_alike(
    store_dir, tmp_path, monkeypatch, capsys
):
    """--autotune times the implementations for one device's batch and trains with them; the choice is
    recorded in the run folder but never in the run's config, so the run resumes without --autotune;
    predict --autotune (forward-only timings of a sliding-window call) segments like predict without."""
    from medseg_jax.cli import main
    from medseg_jax.data.image_io import read_nifti
    from medseg_jax.kernels.select import implementations

    monkeypatch.setenv("MEDSEG_JAX_CACHE", str(tmp_path / "cache"))
    run_dir, messages = tmp_path / "tuned", []
    overrides = [*OVERRIDES, "train.val_every=2"]
    summary = train(  # fold -1: every case trains, nothing validates (no validation program to compile)
        load_config(None, [*overrides, "train.steps=2"]),
        store_dir,
        run_dir,
        fold=-1,
        progress=False,
        log=messages.append,
        autotune=True,
    )
    assert summary.step == 2
    assert any(m.startswith("autotune: timing ") and "conv shapes x" in m for m in messages), messages
    assert any(m.startswith("autotune: conv -> ") for m in messages), messages
    record = json.loads((run_dir / "autotune.json").read_text())
    chosen = record["implementations"]
    assert chosen["conv_implementation"] in implementations("conv")
    assert chosen["upsample_implementation"] in implementations("upsample")
    assert record["operations"]["conv"]["chosen"] == chosen["conv_implementation"]
    assert record["timed"] == "forward and backward" and record["from_step"] == 0
    assert record["input_shape"] == [2 // summary.mesh["data"], 32, 32, 1]  # one device's rows of the batch
    assert load_config(run_dir / "config.yaml").model.conv_implementation == "auto"  # the user's config, as written
    entries = json.loads((tmp_path / "cache" / "autotune.json").read_text())["entries"]
    assert any("|conv|" in key for key in entries) and any("|upsample|" in key for key in entries)
    assert not any(key.endswith("|forward") for key in entries)

    messages.clear()  # resumed without --autotune: same parameters, the "auto" implementations
    config = load_config(None, [*overrides, "train.steps=4"])
    summary = train(config, store_dir, run_dir, fold=-1, progress=False, log=messages.append)
    assert summary.step == 4 and any("resuming from step 2" in m for m in messages), messages
    assert not any(m.startswith("autotune") for m in messages)
    assert not (run_dir / "autotune.json").exists()  # what ran now is what config.yaml says

    image = sorted((store_dir.parent / "raw" / "Dataset001_SynthLiver" / "imagesTr").iterdir())[0]
    predicted = {}
    for name, extra in (("plain", []), ("tuned", ["--autotune"])):
        out = tmp_path / name
        command = ["predict", "--model", str(run_dir), "-i", str(image), "-o", str(out / "case.nii.gz")]
        assert main([*command, "--quiet", "--mirror-axes", "0", "--save-probabilities", *extra]) == 0
        predicted[name] = (read_nifti(out / "case.nii.gz").array, np.load(out / "case.npz")["probabilities"])
    printed = capsys.readouterr().out
    assert "(forward, input (4, 32, 32, 1) float32" in printed  # batch 2 x 2 mirrorings, the plan's patch
    assert "autotune: conv -> " in printed
    entries = json.loads((tmp_path / "cache" / "autotune.json").read_text())["entries"]
    assert any(key.endswith("|forward") for key in entries)
    (labels, probabilities), (tuned_labels, tuned_probabilities) = predicted["plain"], predicted["tuned"]
    np.testing.assert_allclose(tuned_probabilities, probabilities, atol=1e-4)  # implementations differ in rounding
    top_two = np.sort(probabilities, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-3  # voxels whose winning class no rounding can change
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(tuned_labels[clear], labels[clear])
