"""The ``medseg-jax`` command line. Each subcommand parses its flags, calls library functions, and
prints a short summary; a :class:`~medseg_jax.errors.MedsegError` becomes one ``error:`` line on stderr
and exit status 2. Heavy modules are imported inside the handlers so ``--help`` is instant."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from medseg_jax.errors import DataError, MedsegError, os_error_message


def config_argument(value: str) -> Path:
    """``--config``: a YAML file, or the name of a preset shipped with the package (``3d_fullres``), so
    that the presets work from an installed wheel too (:func:`medseg_jax.configs.resolve_config`)."""
    from medseg_jax.configs import resolve_config

    try:
        return resolve_config(value)
    except MedsegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_config_args(parser: argparse.ArgumentParser) -> None:
    from medseg_jax.configs import preset_names

    parser.add_argument(
        "--config",
        type=config_argument,
        default=None,
        metavar="FILE|PRESET",
        help=f"YAML run config: a file, or a preset name ({', '.join(preset_names())})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.learning_rate=3e-4 (repeatable)",
    )


def cmd_config(args) -> int:
    import yaml

    from medseg_jax.config import load_config, to_dict

    config = load_config(args.config, args.overrides)
    if args.plan is None:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    from medseg_jax.data.plan import read_plan
    from medseg_jax.train.setup import resolve_run

    plan_path = args.plan / "plan.json" if args.plan.is_dir() else args.plan
    run = resolve_run(config, read_plan(plan_path), device_count=args.devices, process_count=args.processes)
    print(f"# the run as it will be trained with {plan_path}")
    print(yaml.safe_dump(to_dict(run.config) | {"run": run.describe()}, sort_keys=False), end="")
    return 0


def cmd_synth(args) -> int:
    from medseg_jax.data.synthetic import write_synthetic_dataset

    shape = tuple(args.shape)
    out = write_synthetic_dataset(args.out, args.cases, seed=args.seed, shape=shape)
    print(f"wrote {args.cases} synthetic CT case(s) of shape {shape} to {out}")
    return 0


def cmd_plan(args) -> int:
    from medseg_jax.atomic import write_json_atomic
    from medseg_jax.data.dataset import load_dataset, validate_dataset
    from medseg_jax.data.fingerprint import compute_fingerprint
    from medseg_jax.data.plan import make_plan, write_plan
    from medseg_jax.data.planners import check_options, plan_file_name
    from medseg_jax.errors import ConfigError

    if args.voxel_budget is not None and not args.voxel_budget >= 1:  # checked before the long fingerprint
        raise ConfigError(f"--voxel-budget must be a number of voxels >= 1, got {args.voxel_budget:g}")
    dim, configuration, _, _ = check_options(
        args.dim, args.configuration, args.preset, args.voxel_budget, args.gpu_memory_gb
    )
    dataset = load_dataset(args.dataset)
    validate_dataset(dataset)
    fingerprint = compute_fingerprint(dataset, num_workers=args.workers)
    denoise = None
    if args.denoise == "gaussian":
        denoise = {"method": "gaussian", "sigma": args.denoise_strength}
    elif args.denoise == "median":
        denoise = {"method": "median", "size": int(args.denoise_strength)}
    plan = make_plan(
        fingerprint,
        dim=dim,
        configuration=configuration,
        preset=args.preset,
        gpu_memory_gb=args.gpu_memory_gb,
        voxel_budget=args.voxel_budget,
        hu_window=args.hu_window,
        denoise=denoise,
        clahe={"clip_limit": args.clahe} if args.clahe else None,
    )
    out = Path(args.out) if args.out else Path(args.dataset) / plan_file_name(configuration, args.preset)
    write_json_atomic(out.with_name("fingerprint.json"), fingerprint)
    write_plan(plan, out)
    lowres = f" (3d_fullres: {plan['fullres_spacing']})" if "fullres_spacing" in plan else ""
    print(
        f"plan ({configuration}, preset {args.preset}) for {len(dataset.cases)} case(s): target spacing "
        f"{plan['target_spacing']}{lowres}, patch {plan['patch_size']}, batch {plan['batch_size']}, "
        f"{plan['n_stages']} stages -> {out}"
    )
    return 0


def shard_argument(value: str) -> tuple[int, int]:
    """``--shard INDEX/COUNT`` (e.g. ``0/4``): this process preprocesses every COUNT-th case from INDEX."""
    import re

    from medseg_jax.data.preprocess import check_shard

    match = re.fullmatch(r"([0-9]+)/([0-9]+)", value)
    if match is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not INDEX/COUNT with two non-negative integers, e.g. 0/4")
    index, count = int(match[1]), int(match[2])
    try:
        check_shard(index, count)
    except MedsegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return index, count


def cmd_preprocess(args) -> int:
    from medseg_jax.cascade import bind_previous_stage, is_cascade
    from medseg_jax.data.dataset import load_dataset, validate_dataset
    from medseg_jax.data.plan import read_plan
    from medseg_jax.data.preprocess import preprocess_dataset
    from medseg_jax.data.store import CaseStore
    from medseg_jax.errors import ConfigError

    if args.finalize and args.shard is not None:
        raise ConfigError("--finalize checks the whole store: run it once, without --shard, after every shard is done")
    if not args.finalize and args.plan is None:
        raise ConfigError("preprocess needs --plan (the plan JSON from `medseg-jax plan`)")
    dataset = load_dataset(args.dataset)
    validate_dataset(dataset)
    plan = None if args.plan is None else read_plan(args.plan)
    previous_stage = None
    if plan is not None and (args.previous_stage is not None or is_cascade(plan)):
        if args.previous_stage is None:
            raise ConfigError(
                f"{args.plan} is a 3d_cascade_fullres plan: give --previous-stage CV_LOWRES, the 3d_lowres "
                "cross-validation (`medseg-jax cv`) whose predictions the cascade reads"
            )
        plan, previous_stage = bind_previous_stage(plan, args.previous_stage)
    store = CaseStore(args.out)
    if args.finalize:
        index = store.finalize([c.case_id for c in dataset.cases], plan)
        print(f"all {len(index['cases'])} case(s) are in {args.out}; index written to {store.location('index.json')}")
        return 0
    assert plan is not None  # checked above: only --finalize goes without a plan
    # the store records the plan before its first case and refuses another one (training reads it there)
    shard = args.shard or (0, 1)
    summary = preprocess_dataset(
        dataset,
        plan,
        store,
        num_workers=args.workers,
        progress=not args.quiet,
        shard=shard,
        previous_stage=previous_stage,
    )
    print(
        f"preprocessed {summary['written']} case(s), skipped {summary['skipped']} already in {args.out} "
        f"({summary['seconds']:.1f} s)"
    )
    if args.shard is not None:
        print(
            f"shard {shard[0]}/{shard[1]}: {summary['cases']} of {len(dataset.cases)} case(s); once every shard "
            "is done, run the same command with --finalize instead of --shard"
        )
    return 0


def cmd_train(args) -> int:
    import os

    from medseg_jax.config import load_config

    config = load_config(args.config, args.overrides)
    if args.init_from is not None:  # the network (features, encoder, blocks) is the source run's
        from medseg_jax.train.init_from import adopt_network

        config = adopt_network(config, args.init_from)
    if config.train.deterministic:  # must be set before JAX starts its backend
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true"
    from medseg_jax.train.loop import train
    from medseg_jax.train.setup import has_checkpoints

    if not args.resume and has_checkpoints(args.out):
        raise DataError(
            f"{args.out}: holds checkpoints of an earlier run; drop --no-resume to continue it, or choose another --out"
        )
    summary = train(
        config,
        args.data,
        args.out,
        fold=args.fold,
        resume=args.resume,
        progress=not args.quiet,
        log=print,
        autotune=args.autotune,
        init_from=args.init_from,
        final_validation=not args.no_final_validation,
    )
    pseudo_dice, final_loss = summary.pseudo_dice, summary.final_loss
    validation = summary.final_validation_dice
    print(
        f"step {summary.step}/{summary.steps}, final loss {'-' if final_loss is None else f'{final_loss:.4f}'}, "
        f"pseudo-Dice {pseudo_dice if pseudo_dice is None else round(pseudo_dice, 4)}, "
        + ("" if validation is None else f"final validation Dice {validation:.4f}, ")
        + f"{summary.seconds:.1f} s on mesh {summary.mesh} -> {args.out}"
    )
    return 0


def cmd_cv(args) -> int:
    from medseg_jax.config import load_config
    from medseg_jax.train import cross_validation

    summary: dict | None
    if args.summarize:
        summary = cross_validation.summarize(args.out, progress=not args.quiet)
    elif args.data is None:
        raise DataError("cv needs --data (the store from `medseg-jax preprocess`), or --summarize")
    else:
        config = load_config(args.config, args.overrides)
        summary = cross_validation.cross_validate(
            config, args.data, args.out, args.folds, progress=not args.quiet, log=print, autotune=args.autotune
        )
    if summary is None:
        return 0
    per_fold = ", ".join(f"fold {k} {v:.4f}" for k, v in summary["folds"].items())
    print(
        f"cross-validation of {summary['num_cases']} case(s): mean foreground Dice "
        f"{summary['foreground_mean']['dice']:.4f} ({per_fold}) -> {Path(args.out) / cross_validation.CROSSVAL_DIR}"
    )
    return 0


def cmd_find_best(args) -> int:
    from medseg_jax.find_best import find_best

    record = find_best(args.cv_dirs, args.out, allow_ensembles=not args.no_ensembles, log=print, workers=args.workers)
    steps = record["postprocessing"]["steps"]
    print(
        f"best: {record['best']['name']} (mean foreground Dice {record['best']['dice']:.4f}; after postprocessing "
        f"{record['postprocessing']['after']['foreground_dice']:.4f}, steps {steps}) -> {args.out}"
    )
    print(record["inference_instructions"], end="")
    return 0


def cmd_predict(args) -> int:
    from medseg_jax.errors import ConfigError
    from medseg_jax.inference.model_sets import build_predictor
    from medseg_jax.inference.predict import predict_input, prediction_mesh

    if args.report and args.output_format != "nifti":  # the pictures are drawn from the NIfTI masks
        raise ConfigError("--report needs --output-format nifti (the report is drawn from the NIfTI masks)")
    mesh = prediction_mesh(args.devices)  # before loading the run: a wrong --devices fails at once
    changes = {k: v for k, v in dict(step_size=args.step, batch_size=args.batch_size).items() if v is not None}
    if args.no_mirror:
        changes["mirror_axes"] = ()
    elif args.mirror_axes is not None:
        changes["mirror_axes"] = tuple(args.mirror_axes)
    postprocessing = None
    if args.postprocessing is not None:
        from medseg_jax.atomic import read_json

        record = read_json(args.postprocessing)
        postprocessing = record.get("postprocessing") if isinstance(record, dict) else None
        if postprocessing is None:
            raise DataError(f"{args.postprocessing}: no 'postprocessing' list (written by `medseg-jax find-best`)")
    predictor = build_predictor(
        args.model,
        args.checkpoint,
        changes,
        postprocessing=postprocessing,
        autotune=args.autotune,  # before anything is compiled: the sliding window runs the tuned implementations
        log=print,
        largest_component=False if args.largest_component is None else (args.largest_component or True),
        accumulate="host" if args.memory_bounded else "device",
        mesh=mesh,
        previous_stage_predictions=args.previous_stage_predictions,
    )
    plan = predictor.plan
    started = time.perf_counter()
    summaries = predict_input(
        args.input,
        args.output,
        None,
        None,
        plan,
        predictor=predictor,
        save_probabilities=args.save_probabilities,
        statistics=args.statistics,
        skip_existing=args.skip_existing,
        pipeline=not args.no_pipeline,
        progress=not args.quiet,
        output_format=args.output_format,
        series_uid=args.series_uid,
    )
    for summary in summaries:
        volumes = ", ".join(f"{name} {ml:.1f} mL" for name, ml in summary.get("volume_ml", {}).items())
        print(f"{summary.get('case', '?')}: {summary.get('seconds', 0):.1f} s; {volumes}")
    wall = time.perf_counter() - started
    device = sum(summary.get("device_seconds", 0.0) for summary in summaries)
    print(f"predicted {len(summaries)} case(s) in {wall:.1f} s (device {device:.1f} s) -> {args.output}")
    if args.report:
        names = {int(v): k for k, v in plan["labels"].items()}
        for image_path, label_path in predicted_pairs(args.input, args.output, len(plan["channel_names"])):
            picture = report_picture(label_path, names, image_path=image_path)
            print(f"report: {picture}")
    return 0


def cmd_ensemble(args) -> int:
    from medseg_jax.inference.ensemble_probabilities import ensemble_folders

    started = time.perf_counter()
    summary = ensemble_folders(
        args.inputs, args.out, save_probabilities=args.save_probabilities, progress=not args.quiet
    )
    if summary["unlabelled_files"]:  # written before predict stored the label set
        print(
            f"note: {summary['unlabelled_files']} file(s) hold no label set; for them only the number of classes "
            "was checked (predict again with --save-probabilities to store it)"
        )
    print(
        f"ensembled {summary['cases']} case(s) of {summary['inputs']} inputs ({summary['classes']} classes) in "
        f"{time.perf_counter() - started:.1f} s -> {args.out}"
    )
    return 0


def cmd_export(args) -> int:
    from medseg_jax.inference.export import EXAMPLE_NAME, export_run

    metadata = export_run(args.model, args.out, platforms=args.platforms, checkpoint_choice=args.checkpoint)
    patch = "x".join(str(p) for p in metadata["inference"]["patch_size"])
    print(
        f"exported {args.model} ({metadata['plan']['dim']}D, {len(metadata['labels'])} classes, patch {patch}, "
        f"{metadata['function']['parameters']} parameter arrays) for {' '.join(metadata['platforms'])} -> {args.out}"
    )
    print(f"predict without medseg-jax: python {Path(args.out) / EXAMPLE_NAME} -i SCAN.nii.gz -o MASK.nii.gz")
    return 0


def fold_argument(value: str):
    """``--folds``: a fold number or ``all``."""
    if value == "all" or value.isdigit():
        return value if value == "all" else int(value)
    raise argparse.ArgumentTypeError(f"a fold is a number or 'all', got {value!r}")


def cmd_import_nnunet(args) -> int:
    from medseg_jax.nnunet.importer import import_nnunet

    folds = "all" if args.folds == ["all"] else args.folds
    summary = import_nnunet(args.model_folder, args.out, folds=folds, checkpoint=args.checkpoint)
    mirror = summary["inference_allowed_mirroring_axes"]
    print(
        f"imported {summary['model_folder']} ({summary['dim']}D {summary['configuration']}, folds "
        f"{', '.join(summary['folds'])}, {summary['checkpoint']}, {summary['parameters']:,} parameters, mirroring "
        f"{'off' if not mirror else 'axes ' + ' '.join(str(a) for a in mirror)}) -> {args.out}"
    )
    print(f"predict with: medseg-jax predict --model {args.out} -i IMAGES -o OUTPUT")
    return 0


def predicted_pairs(input_path: Path, output_path: Path, num_channels: int):
    """(first-channel image, predicted label file) of each case ``predict`` wrote."""
    from medseg_jax.inference.predict import prediction_targets

    return [(paths[0], target) for target, paths in prediction_targets(input_path, output_path, num_channels)]


def report_picture(label_path: Path, class_names: dict, image_path=None, reference_path=None) -> Path:
    """Write ``<label folder>/report/<case>.png`` (three views per class) for one predicted label file."""
    from medseg_jax.data.image_io import read_image, read_nifti
    from medseg_jax.report import report_case

    case = label_path.name.removesuffix(".gz").removesuffix(".nii")
    target = label_path.parent / "report" / f"{case}.png"
    return report_case(
        read_nifti(label_path),
        target,
        image=None if image_path is None else read_image(image_path),
        reference=None if reference_path is None else read_nifti(reference_path),
        class_names=class_names,
        title=case,
    )


def cmd_evaluate(args) -> int:
    from medseg_jax.evaluation import evaluate_folders, format_table, read_labels, write_evaluation

    labels = read_labels(args.labels) if args.labels else None
    rows, summary = evaluate_folders(
        args.pred,
        args.ref,
        labels=labels,
        nsd_tolerance_mm=args.nsd_tolerance,
        num_workers=args.workers,
        progress=not args.quiet,
        empty=args.empty,
        surface=args.surface,
        inf_distance=args.inf_distance,
    )
    out = args.out or Path(args.pred) / "evaluation"
    written = write_evaluation(out, rows, summary, summary_format=args.format)
    print(format_table(summary))
    print("wrote " + ", ".join(str(path) for path in written.values()))
    if args.report:
        from medseg_jax.data.case_files import find_image_cases

        names = {v: k for k, v in (labels or {}).items()}
        images = find_image_cases(args.images, 1) if args.images else {}
        for case in sorted({row["case"] for row in rows}):
            image = images.get(case, [None])[0]
            picture = report_picture(
                Path(args.pred) / f"{case}.nii.gz",
                names,
                image_path=image,
                reference_path=Path(args.ref) / f"{case}.nii.gz",
            )
            print(f"report: {picture}")
    return 0


def cmd_benchmark(args) -> int:
    from medseg_jax.bench.command import run

    return run(args)


def cmd_demo(args) -> int:
    from medseg_jax.demo import run_demo

    summary = run_demo(
        args.out,
        cases=args.cases,
        steps=args.steps,
        dim=args.dim,
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        config_path=args.config,
        overrides=args.overrides,
        progress=not args.quiet,
        overwrite=args.overwrite,
        log=print,
    )
    for name, values in summary["metrics"].items():
        print(f"{name}: " + ", ".join(f"{metric} {value:.3f}" for metric, value in values.items()))
    det = summary["tumour_detection"]
    print(
        f"tumours found: {det['detected']}/{det['reference_lesions']}, false positives {det['false_positives']}; "
        f"{summary['seconds']['total']:.0f} s in total"
    )
    print(f"report: {summary['report_dir']}/README.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg-jax", description="Medical image segmentation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic CT -> plan -> preprocess -> train -> predict -> evaluate -> report")
    p.add_argument("--out", type=Path, default=Path("medseg_demo"), help="output folder (default: ./medseg_demo)")
    p.add_argument("--cases", type=int, default=None, help="synthetic cases (default from the demo config)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default from the demo config)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=None, help="2D or 3D network")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="synthetic grid size (default 96 96 32)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data synthesis and training")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo in --out (by default a demo of other settings is refused and one "
        "of the same settings resumes)",
    )
    add_config_args(p)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("synth", help="write a synthetic CT dataset (liver + tumours) in the nnU-Net layout")
    p.add_argument(
        "out",
        type=Path,
        help="parent folder; the dataset is written to OUT/Dataset001_SynthLiver (replacing an earlier "
        "synthetic dataset there, never other files)",
    )
    p.add_argument("--cases", type=int, default=10, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--shape", type=int, nargs="+", default=[64, 64, 32], help="grid size x y [z]")
    p.set_defaults(handler=cmd_synth)

    p = sub.add_parser("plan", help="fingerprint a dataset and write a plan (spacing, patch, topology)")
    p.add_argument("dataset", type=Path, help="nnU-Net v2 or MSD dataset folder (with dataset.json)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=None, help="2D or 3D plan (default 3)")
    p.add_argument(
        "--configuration",
        choices=("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"),
        default=None,
        help="nnU-Net configuration (default: 2d for --dim 2, else 3d_fullres); 3d_lowres: a coarser spacing for "
        "datasets whose 3d_fullres patch sees under 25%% of the median image (else an error); 3d_cascade_fullres: "
        "3d_fullres that also reads the 3d_lowres prediction (preprocess it with --previous-stage)",
    )
    p.add_argument(
        "--preset",
        choices=("default", "resenc-m", "resenc-l", "resenc-xl"),
        default="default",
        help="planner: default (nnU-Net's default planner, plain U-Net) or nnU-Net's residual-encoder "
        "nnUNetPlannerResEncM / L / XL (8 / 24 / 40 GB)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="plan file (default DATASET/plan_2d.json, plan_3d.json, plan_3d_lowres.json or "
        "plan_3d_cascade_fullres.json, with _PRESET for a ResEnc preset)",
    )
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="accelerator memory the patch is sized for (default: the preset's; 8 for default)",
    )
    p.add_argument(
        "--voxel-budget",
        type=float,
        default=None,
        metavar="VOXELS",
        help="voxels per batch (patch voxels x batch size) to size patch and batch for, instead of "
        "--gpu-memory-gb (the demo plans with its config's batch x patch)",
    )
    p.add_argument(
        "--hu-window",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="fixed CT window instead of dataset percentiles, e.g. -175 250",
    )
    p.add_argument("--denoise", choices=("gaussian", "median"), default=None, help="denoise before normalising")
    p.add_argument("--denoise-strength", type=float, default=1.0, help="gaussian sigma (mm) or median size (voxels)")
    p.add_argument("--clahe", type=float, default=None, metavar="CLIP", help="CLAHE contrast enhancement clip limit")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("preprocess", help="preprocess a dataset into a chunked zarr store (resumable)")
    p.add_argument("dataset", type=Path, help="dataset folder")
    p.add_argument(
        "--plan", type=Path, default=None, help="plan JSON from `medseg-jax plan` (optional with --finalize)"
    )
    p.add_argument(
        "--out", required=True, help="store: a folder, or a URL (gs://bucket/path, s3://bucket/path, memory://name)"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument(
        "--previous-stage",
        type=Path,
        default=None,
        metavar="CV_LOWRES",
        help="for a 3d_cascade_fullres plan: the 3d_lowres cross-validation folder (`medseg-jax cv`); each case's "
        "input gets its cross-validation prediction as one mask per foreground class",
    )
    p.add_argument(
        "--shard",
        type=shard_argument,
        default=None,
        metavar="INDEX/COUNT",
        help="preprocess only every COUNT-th case from INDEX (hosts or SLURM array tasks share a dataset)",
    )
    p.add_argument(
        "--finalize",
        action="store_true",
        help="preprocess nothing: check that every case is in the store, then write its index (after all shards)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_preprocess)

    p = sub.add_parser("train", help="train a U-Net on a preprocessed store (resumes from the run folder)")
    p.add_argument("--data", type=Path, required=True, help="store folder from `medseg-jax preprocess`")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics, curves)")
    p.add_argument("--fold", type=int, default=0, help="cross-validation fold, -1 = train on all cases")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest readable checkpoint in --out (default)",
    )
    p.add_argument(
        "--autotune",
        action="store_true",
        help="time the conv / upsampling implementations left at 'auto' for this run's layer shapes before "
        "compiling, and train with the fastest (timings cached; the choice is written to OUT/autotune.json)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="start from this run's weights and network (a trained or `import-nnunet` run folder); heads are "
        "re-initialised when the number of classes differs",
    )
    p.add_argument(
        "--no-final-validation",
        action="store_true",
        help="skip the validation at the end of the fold (default: the fold's validation cases are predicted as "
        "`predict` does, with mirroring, into OUT/validation/ with their metrics in OUT/validation/summary.json)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "cv", help="cross-validation: train and validate every fold (resumable), then a summary over all cases"
    )
    p.add_argument("--data", type=Path, help="store folder from `medseg-jax preprocess`")
    p.add_argument("--out", type=Path, required=True, help="cross-validation folder (fold_K/ runs, crossval/)")
    p.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="folds to train here (default: every fold of the store's splits); spread folds over machines or "
        "SLURM array tasks with one --folds K each",
    )
    p.add_argument(
        "--summarize",
        action="store_true",
        help="only write the summary over the folds' validations (an error names the folds still missing)",
    )
    p.add_argument("--autotune", action="store_true", help="as `train --autotune`, for each fold")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p)
    p.set_defaults(handler=cmd_cv)

    p = sub.add_parser(
        "find-best",
        help="choose the best configuration or pair ensemble and the postprocessing from cross-validations",
    )
    p.add_argument("cv_dirs", type=Path, nargs="+", metavar="CV_DIR", help="folders from `medseg-jax cv`")
    p.add_argument("--out", type=Path, required=True, help="new folder for the choice, its model folder and files")
    p.add_argument("--no-ensembles", action="store_true", help="compare single configurations only")
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes that ensemble, postprocess and evaluate the cases"
    )
    p.set_defaults(handler=cmd_find_best)

    p = sub.add_parser("predict", help="segment NIfTI files or a DICOM series with a trained run")
    p.add_argument(
        "--model",
        type=Path,
        nargs="+",
        required=True,
        help="training run folder (from `medseg-jax train` / `import-nnunet`); several: an ensemble averaging "
        "their probabilities on the scan's grid (folds, or configurations such as 2D and 3D); or a model folder "
        "from `medseg-jax find-best`",
    )
    p.add_argument(
        "-i",
        "--input",
        type=Path,
        required=True,
        help="a NIfTI file, a folder of NIfTI files ({case}_{XXXX}.nii.gz) or a DICOM series folder",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="output .nii.gz (one case) or folder")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest", help="which checkpoint to use")
    p.add_argument("--step", type=float, default=None, help="sliding-window step as a fraction of the patch")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--mirror-axes", type=int, nargs="+", default=None, help="axes mirrored at test time")
    p.add_argument("--no-mirror", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--save-probabilities", action="store_true", help="also write {case}.npz class probabilities")
    p.add_argument(
        "--statistics",
        action="store_true",
        help="also write {case}.statistics.json: per class the volume in mL and the mean scan intensity (HU for CT)",
    )
    p.add_argument(
        "--largest-component",
        type=int,
        nargs="*",
        default=None,
        metavar="CLASS",
        help="keep only the largest connected component of these classes (no value: every class)",
    )
    p.add_argument(
        "--postprocessing",
        type=Path,
        default=None,
        metavar="JSON",
        help="postprocessing.json from `medseg-jax find-best` (largest components of class groups, in order); "
        "replaces what a find-best model folder carries",
    )
    p.add_argument("--memory-bounded", action="store_true", help="accumulate windows on the host (large scans)")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="split the windows over the first N local devices (default: all; JAX_PLATFORMS picks cpu / cuda)",
    )
    p.add_argument("--skip-existing", action="store_true", help="skip cases whose output exists")
    p.add_argument(
        "--previous-stage-predictions",
        type=Path,
        default=None,
        metavar="DIR",
        help="for 3d_cascade_fullres runs: read each scan's 3d_lowres label map DIR/{case}.nii.gz (from an earlier "
        "`predict` with the 3d_lowres runs) instead of predicting it (nnU-Net's -prev_stage_predictions)",
    )
    p.add_argument(
        "--no-pipeline",
        action="store_true",
        help="for a folder: read, predict and write each case in turn (default: the next case is read and the "
        "previous one written while the device predicts)",
    )
    p.add_argument(
        "--autotune",
        action="store_true",
        help="time the conv / upsampling implementations left at 'auto' for one sliding-window call (forward "
        "only) before compiling, and predict with the fastest (timings cached)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="also write report/<case>.png: axial, coronal and sagittal views through each class",
    )
    p.add_argument(
        "--output-format",
        choices=("nifti", "dicom-seg"),
        default="nifti",
        help="nifti: {case}.nii.gz label maps; dicom-seg: {case}.dcm DICOM Segmentation objects referencing the "
        "input series, one segment per class (DICOM input only)",
    )
    p.add_argument(
        "--series-uid",
        default=None,
        metavar="UID",
        help="SeriesInstanceUID of the series to predict when the DICOM folder holds several",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser(
        "ensemble", help="average the probabilities that `predict --save-probabilities` saved in several folders"
    )
    p.add_argument(
        "-i",
        "--inputs",
        type=Path,
        nargs="+",
        required=True,
        metavar="PROB_DIR",
        help="folders of {case}.npz probability files (at least 2, the same cases in each)",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder for the {case}.nii.gz label maps")
    p.add_argument("--save-probabilities", action="store_true", help="also write the averaged {case}.npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_ensemble)

    p = sub.add_parser(
        "export", help="write a trained network as jax.export StableHLO + JSON + a predictor that needs no medseg-jax"
    )
    p.add_argument("--model", type=Path, required=True, help="training run folder (from `medseg-jax train`)")
    p.add_argument("--out", type=Path, required=True, help="export folder to write (must not exist or be empty)")
    p.add_argument(
        "--platforms",
        nargs="+",
        default=["cpu", "cuda", "tpu"],
        metavar="PLATFORM",
        help="platforms the exported function runs on: cpu, cuda, rocm, tpu (default: cpu cuda tpu)",
    )
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest", help="which checkpoint to export")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser(
        "import-nnunet", help="convert an nnU-Net v2 trained-model folder into a run folder predict and train use"
    )
    p.add_argument(
        "model_folder",
        type=Path,
        help="nnU-Net results folder Dataset.../Trainer__Plans__Configuration (with plans.json)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder to write (must not exist or be empty)")
    p.add_argument(
        "--folds",
        type=fold_argument,
        nargs="+",
        default=["all"],
        help="folds to import (several: an ensemble averaging their logits); default: all that have the checkpoint",
    )
    p.add_argument(
        "--checkpoint", choices=("final", "best"), default="final", help="checkpoint_final.pth or checkpoint_best.pth"
    )
    p.set_defaults(handler=cmd_import_nnunet)

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95, ASSD, NSD and volumes of predictions against references")
    p.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps (NIfTI)")
    p.add_argument("--ref", type=Path, required=True, help="folder of reference label maps, matched by file name")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="dataset.json naming the classes (default: every non-zero value in the references)",
    )
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1.0)")
    p.add_argument(
        "--empty",
        choices=("nnunet", "monai"),
        default="nnunet",
        help="empty-mask convention: nnunet = NaN only when both are empty (default); monai = NaN "
        "whenever the reference is empty",
    )
    p.add_argument(
        "--surface",
        choices=("element", "voxel"),
        default="element",
        help="surface definition: element = surface elements (DeepMind, default); voxel = MONAI edge voxels",
    )
    p.add_argument(
        "--inf-distance",
        default=None,
        metavar="MM|diagonal",
        help="replace the inf HD95/ASSD of a one-sided empty mask by this distance in mm (BraTS: "
        "373.13) or by each image's diagonal (default: keep inf)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default PRED/evaluation)")
    p.add_argument(
        "--format",
        choices=("medseg", "nnunet"),
        default="medseg",
        help="summary.json layout: medseg (default); nnunet = nnU-Net v2's (as nnUNetv2_evaluate_folder: "
        "metric_per_case, mean, foreground_mean; Dice, IoU, TP, FP, FN, TN, n_pred, n_ref per label), ours "
        "then in summary_medseg.json; metrics.csv either way",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="write PRED/report/<case>.png: prediction and reference contours in three views",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="with --report: the images folder ({case}_0000.nii.gz) to draw under the contours",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_evaluate)

    from medseg_jax.bench.command import DESCRIPTION
    from medseg_jax.bench.command import add_arguments as add_benchmark_arguments

    p = sub.add_parser("benchmark", help="time convs, upsampling, U-Net steps and inference", description=DESCRIPTION)
    add_benchmark_arguments(p)  # the suite's flags, shared with `python -m benchmarks`
    p.set_defaults(handler=cmd_benchmark)

    p = sub.add_parser(
        "config",
        help="print the run config (defaults + file + overrides); with --plan, the run "
        "as it will be trained (the plan's topology, patch, batch, crop and mesh)",
    )
    add_config_args(p)
    p.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="plan JSON (or a store folder holding plan.json) to resolve the config against",
    )
    p.add_argument(
        "--devices", type=int, default=None, help="with --plan: devices to plan the mesh for (default: this machine's)"
    )
    p.add_argument("--processes", type=int, default=None, help="with --plan: processes (hosts) (default: this run's)")
    p.set_defaults(handler=cmd_config)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable or missing path the command was given: a message, no traceback
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
