"""``mithril train --checkpoint`` and ``--resume DIR``: a run's checkpoint, and continuing a
run from it exactly as if it had not stopped.

``--checkpoint`` adds ``checkpoint.safetensors`` to the run folder (written with
:func:`mithril.utils.checkpoint.save_checkpoint`): the parameters, the optimizer's state (its
moments, step counts, ``--ema`` average), BatchNorm's running statistics, and in its metadata
the run's flags and configuration, a fingerprint of the data, where the loop stands (epoch,
batches done, the data-order generator's state at the start of the epoch, the epoch's sums so
far) and the compiled model's random-step counter (Dropout's masks). It is written where the
run stops: at its end, or after the step under way when Ctrl-C came.

``--resume DIR`` takes the flags of the run in ``DIR``; flags given with it replace them (a
larger ``--epochs`` continues the run further; ``--backend``, ``--threads`` and the output
flags may change too). Anything else that differs (the optimizer, its settings, the schedule,
the model, the data) is refused, naming what differs, before anything is written. The
learning-rate schedule is replayed over the logged steps (``metrics.csv``, ``epochs.csv``: the
learning rate of every step must come out the same, so a schedule whose shape depends on the
run's length cannot be stretched), the state is loaded, the epoch's batches are drawn again
and those done skipped; the logs continue where they stopped. The result is the run that did
not stop, bit for bit (on the same backend).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .argtypes import bounded_int, in_path, look
from .errors import CLIError
from .runtime import Position

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "mithril-train-resume-1"
#: flags a resumed run does not take from its checkpoint (where to write, how to show it)
NOT_KEPT = frozenset({"out", "name", "resume", "checkpoint", "dry_run", "no_plot",
                      "no_progress", "func", "parser", "argv", "snapshot",
                      "resumed_checkpoint"})
#: configuration keys a resumed run may change: the length (a schedule replayed over the
#: steps done must agree), where it runs, the data file's name (its content is checked), and
#: charlm's --temperature (it shapes the sample after training only, as --sample-chars)
MAY_CHANGE = frozenset({"epochs", "threads", "backend", "task_settings.data",
                        "task_settings.steps", "task_settings.temperature"})
#: what a refusal of a changed setting says
KEPT = ("a resumed run keeps them (only --epochs (charlm: --steps, and --temperature and "
        "--sample-chars, which shape its sample), --backend, --threads and the output flags "
        "may change)")
#: metrics.csv / epochs.csv columns that hold integers
INT_FIELDS = frozenset({"step", "epoch", "skipped"})


def add_resume_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint and resume")
    g.add_argument("--checkpoint", action="store_true",
                   help=f"also write {CHECKPOINT_FILE} into the run folder (parameters, "
                        f"optimizer state, EMA, schedule position, data order), so that "
                        f"--resume can continue the run")
    g.add_argument("--checkpoint-every", type=bounded_int(1, 10**9), metavar="N",
                   help=f"also save {CHECKPOINT_FILE} (with metrics.csv and epochs.csv) into "
                        f"the run folder every N steps, each file replaced atomically (a kill "
                        f"while saving leaves the previous checkpoint), so that a run killed "
                        f"without warning resumes from its last one (as Keras's "
                        f"BackupAndRestore(save_freq=N)); implies --checkpoint")
    g.add_argument("--resume", metavar="DIR", type=in_path,  # ('': not "no --resume")
                   help=f"continue the run in DIR (its {CHECKPOINT_FILE}, metrics.csv and "
                        f"epochs.csv) with its flags; flags given replace them: a larger "
                        f"--epochs trains further. Writes into DIR unless --out or --name")


def snapshot(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a resumed run takes again: the parsed values, before the job fills in its
    defaults (a flag left unset stays unset)."""
    kept = {}
    for k, v in vars(args).items():
        if k in NOT_KEPT:
            continue
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            continue
        kept[k] = v
    return kept


def _where(path: Path) -> Path:
    return path / CHECKPOINT_FILE if path.is_dir() else path


def _load(path: Path, flag: str = "--resume", **kwargs: Any) -> dict[str, Any]:
    from ..utils.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path, **kwargs)
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    except CheckpointError as exc:
        raise CLIError(f"{flag} {path}: damaged ({exc})") from None
    except (ValueError, KeyError) as exc:  # ShapeError, KeyMismatchError: another model
        raise CLIError(f"{flag} {path}: the checkpoint's model does not match this "
                       f"command's ({exc})") from None


def resumed_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The flags of the run ``--resume`` names with those given now on top, and its
    checkpoint (as :func:`load_checkpoint` returns it, the arrays NumPy's)."""
    given = Path(args.resume)
    if not look(Path.exists, given, "--resume"):
        raise CLIError(f"--resume {given}: no such folder (a run folder of `mithril train "
                       f"--checkpoint`)")
    path = _where(given)
    if not look(Path.is_file, path, "--resume"):
        raise CLIError(f"--resume {given}: no {CHECKPOINT_FILE} in it (a run trained with "
                       f"--checkpoint writes one)")
    ckpt = _load(path)
    extra = ckpt["extra"]
    if not isinstance(extra, dict) or extra.get("format") != FORMAT:
        raise CLIError(f"--resume {path}: not a checkpoint of `mithril train --checkpoint` "
                       f"(no {FORMAT} record in its metadata)")
    config = extra.get("config")
    then = config.get("task", "digits") if isinstance(config, dict) else None
    if getattr(args, "task", None) is not None and then is not None and args.task != then:
        # (else a flag of the run's job, such as --hidden, "does not apply" to the new one)
        raise CLIError(f"--resume: this command changes the run's --task ({then!r} in the run, "
                       f"{args.task!r} now); {KEPT}")
    given = list(args.argv[1:])  # the flags typed now, without --resume DIR
    for i, a in enumerate(given):
        if a == "--resume":
            del given[i:i + 2]
            break
        if a.startswith("--resume="):
            del given[i]
            break
    new = args.parser.parse_args(given, namespace=argparse.Namespace(**extra["args"]))
    new.argv, new.resume = args.argv, args.resume
    data = getattr(new, "data", None)
    if data is not None and data == extra["args"].get("data") and not Path(data).exists():
        # the run's own path, as typed then: else "--data X: cannot read it", a flag not given
        raise CLIError(f"--resume {args.resume}: the run's data file {data} is not there "
                       f"(moved or renamed, or a path relative to the folder it was trained "
                       f"from?); give it with --data FILE (its content is checked against the "
                       f"run's)")
    ckpt["path"] = str(path)
    if args.out is None and args.name is None:
        new.out = str(path.parent)
    new.resumed_checkpoint = ckpt  # (the --nprocs launcher checks it before starting ranks)
    return new, ckpt


def data_fingerprint(data: Any) -> dict[str, Any]:
    """Shapes of the data's splits, classes, and a digest of their values."""
    h = hashlib.sha256()
    arrays = (data.x_train, data.y_train, data.x_test, data.y_test)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return {"train": list(np.shape(data.x_train)), "test": list(np.shape(data.x_test)),
            "classes": int(data.num_classes), "digest": h.hexdigest()[:32]}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("task_settings", "settings", "momentum_cycle"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _float(x: float) -> str:
    return float(x).hex()


def position_record(pos: Position) -> dict[str, Any]:
    # the generator's 128-bit integers and non-finite sums survive JSON as text
    return {"epoch": pos.epoch, "batch": pos.batch, "rng": json.dumps(pos.rng_state),
            "sums": [_float(pos.sums[0]), _float(pos.sums[1]), int(pos.sums[2])]}


def write_checkpoint(run: Any, folder: Path, flags: dict[str, Any],
                     steps: int, epochs: int, fmt: str = FORMAT) -> Path | None:
    """``checkpoint.safetensors`` of ``run`` in ``folder`` (``flags``: :func:`snapshot` of
    the command's; ``fmt``: the command's record, ``mithril compare``'s its own); None
    (nothing written) when the loop stopped inside a step (a second Ctrl-C), where no
    consistent state exists."""
    from ..utils.checkpoint import save_checkpoint

    if run.position is None:
        return None
    extra = {"format": fmt, "args": flags, "config": run.cfg.as_dict(),
             "data": data_fingerprint(run.data), "position": position_record(run.position),
             "steps": steps, "epochs": epochs, "compiled_step": int(run.compiled.step)}
    if run.private and run.sample_rate() is not None:  # DP-SGD: the accountant's history
        extra["privacy"] = {"noise_multiplier": float(run.optimizer.noise_multiplier),
                            "accountant": run.accountant(steps).state_dict()}
    params, state = run.params, run.state
    if run.parallel is not None:  # data-parallel: the whole state (gathered with ZeRO)
        if not run.parallel.can_checkpoint:
            return None
        state = run.parallel.optimizer_state(run)
        if state is None:  # (--shard-state: not gathered for this save)
            return None
        extra["world"] = run.parallel.world.summary()
    if run.trainer is not None:  # mixed precision: the float32 masters, the loss scaler
        params = run.trainer.master_params
        extra["mixed_precision_trainer"] = run.trainer.state_dict()
    path = folder / CHECKPOINT_FILE
    save_checkpoint(path, params, run.optimizer, state, extra=extra,
                    model_state=run.model_state)
    return path


def check_noise(run: Any, ckpt: dict[str, Any], flag: str = "--resume") -> None:
    """DP-SGD: the resumed run adds the noise the checkpointed one did (else its ε is not the
    one accounted for; with --target-epsilon, σ was sized to the run's length)."""
    privacy = ckpt["extra"].get("privacy")
    if not run.private or run.sample_rate() is None:
        return
    if privacy is None:
        raise CLIError(f"{flag}: the checkpoint holds no privacy accounting (written before "
                       f"DP-SGD runs could resume): train the whole run again")
    saved, now = privacy["noise_multiplier"], float(run.optimizer.noise_multiplier)
    if saved != now:
        raise CLIError(f"{flag}: the run's noise multiplier was {saved!r}, this command's is "
                       f"{now!r} (--target-epsilon sizes it to the run's length: keep --epochs "
                       f"{ckpt['extra']['config']['epochs']}); a resumed DP-SGD run keeps its "
                       f"noise, so that its ε is the one accounted for")


def _read_log(path: Path, rows: int) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            got = [{k: (int(v) if k in INT_FIELDS else float(v)) for k, v in r.items()
                    if v != ""} for r in csv.DictReader(f)]
    except OSError as exc:
        raise CLIError(f"--resume: cannot read {path} ({exc.strerror or exc}); it goes with "
                       f"{CHECKPOINT_FILE}") from None
    except ValueError as exc:
        raise CLIError(f"--resume: {path} is damaged ({exc})") from None
    if len(got) < rows:
        raise CLIError(f"--resume: {path} holds {len(got)} rows, {CHECKPOINT_FILE} was written "
                       f"after {rows}: the two come from different runs")
    # more rows: a periodic save cut between the logs and the checkpoint (they are written in
    # that order); the rows after the checkpoint's are trained again
    return got[:rows]


def _replay(run: Any, steps: list[dict[str, Any]], epochs: list[dict[str, Any]],
            flag: str, saved_epochs: int) -> None:
    """Drive the new run's schedule over the logged steps and epochs, checking that it gives
    each step the learning rate (and momentum) the run used."""
    ends = {e["step"]: e for e in epochs}
    if 0 in ends:  # (an epoch without steps cannot be)
        raise CLIError(f"{flag}: epochs.csv is damaged (an epoch at step 0)")
    for row in steps:
        lr = run.optimizer.get_learning_rate()
        if not (lr == row["lr"] or (math.isnan(lr) and math.isnan(row["lr"]))):
            raise CLIError(f"{flag}: this command's learning-rate schedule differs from the "
                           f"run's: step {row['step']} used lr {row['lr']!r}, it gives "
                           f"{lr!r} (a schedule sized to the run, such as cosine, onecycle "
                           f"or the defaults of step, multistep and exponential, cannot be "
                           f"stretched: keep --epochs {saved_epochs}, or train with a "
                           f"schedule whose lengths are given, e.g. --scheduler step "
                           f"--step-size 100, or --scheduler none or plateau)")
        if run.momentum is not None and "momentum" in row and \
                run.momentum.get() != row["momentum"]:
            raise CLIError(f"{flag}: the momentum cycle differs from the run's at step "
                           f"{row['step']}")
        if not row["skipped"]:
            run.schedule.after_step()
        if row["step"] in ends:
            run.schedule.after_epoch(ends[row["step"]]["batch_loss"])


def _check_epochs(run: Any, epochs: list[dict[str, Any]], flag: str, charlm: bool) -> None:
    """Each epoch the run logged must have the steps this command gives it: a charlm run
    whose --steps ended it inside an --eval-every period measured a shorter last "epoch",
    which a longer run does not have (resumed, it would train another whole period after
    it: fewer steps than --steps, and another run)."""
    done = 0
    for row in epochs:
        had, want = row["step"] - done, run.batches.steps(row["epoch"])
        done = row["step"]
        if had == want:
            continue
        if charlm:
            raise CLIError(f"{flag}: the run stopped at step {done} (its --steps), inside an "
                           f"--eval-every {run.cfg.task_settings.get('eval_every')} period, "
                           f"and was measured there: it cannot be continued to --steps "
                           f"{run.cfg.task_settings.get('steps')} as the run that did not "
                           f"stop; train that run from the start (a run whose --steps is a "
                           f"multiple of --eval-every can be resumed further)")
        raise CLIError(f"{flag}: the run's epoch {row['epoch']} had {had} steps, this "
                       f"command's has {want}: the two runs differ")


def restore(run: Any, ckpt: dict[str, Any], flag: str = "--resume",
            done_ok: bool = False) -> str:
    """Check that ``run`` (built from the resumed flags) continues the checkpointed run and
    load it; returns a line for the header. Nothing is changed on disk. ``done_ok``: a run
    that has done its epochs is loaded as done (``mithril compare``: a configuration
    finished before the stop), not refused."""
    extra = ckpt["extra"]
    saved, now = _flat(extra["config"]), _flat(run.cfg.as_dict())
    differ = [f"{k} ({saved.get(k)!r} in the run, {now.get(k)!r} now)"
              for k in sorted(set(saved) | set(now))
              if k not in MAY_CHANGE and saved.get(k) != now.get(k)]
    if differ:
        hint = ""
        if run.cfg.task == "charlm" and extra["args"].get("warmup_steps") is None and \
                saved.get("settings.warmup_steps") != now.get("settings.warmup_steps"):
            # (its default warm-up is a tenth of --steps: a longer run changes it)
            hint = (f" (charlm's default warm-up is a tenth of --steps, at most 100: give "
                    f"--warmup-steps {saved.get('settings.warmup_steps')} to keep the run's)")
        raise CLIError(f"{flag}: this command changes the run's {'; '.join(differ)}; "
                       f"{KEPT}{hint}")
    fp, fp_now = extra["data"], data_fingerprint(run.data)
    what = [f"{k} {fp[k]} then, {fp_now[k]} now" for k in ("train", "test", "classes")
            if fp[k] != fp_now[k]]
    if what or fp["digest"] != fp_now["digest"]:
        raise CLIError(f"{flag}: the data differ from the run's ("
                       + ("; ".join(what) if what else "the same shapes, other values")
                       + "): a run continues on its own data")
    pos = extra["position"]
    epoch, batch = int(pos["epoch"]), int(pos["batch"])
    charlm = run.cfg.task == "charlm"  # (its budget is --steps, an "epoch" --eval-every)
    if epoch > run.cfg.epochs and not done_ok:
        raise CLIError(f"{flag}: the run has done its {extra['steps']} steps; give a larger "
                       f"--steps to train it further" if charlm else
                       f"{flag}: the run has done its {epoch - 1} epochs; give a larger "
                       f"--epochs to train it further")
    if run.total_steps < extra["steps"]:  # (more than its epochs: not a valid record)
        raise CLIError(f"{flag}: the checkpoint is at step {extra['steps']}, beyond --epochs "
                       f"{run.cfg.epochs}")
    folder = Path(ckpt["path"]).parent
    steps = _read_log(folder / "metrics.csv", extra["steps"])
    epochs = _read_log(folder / "epochs.csv", extra["epochs"])
    _check_epochs(run, epochs, flag, charlm)
    _replay(run, steps, epochs, flag, saved["epochs"])
    if epochs and epochs[-1]["step"] == len(steps):
        # the rate after the last epoch: the one the next step takes in the longer run (the
        # last step of the shorter run did not advance the schedule)
        epochs[-1]["lr"] = run.optimizer.get_learning_rate()
        if run.momentum is not None and "momentum" in epochs[-1]:
            epochs[-1]["momentum"] = run.momentum.get()
    masters = run.params if run.trainer is None else run.trainer.master_params
    loaded = _load(Path(ckpt["path"]), flag, params_template=masters,
                   model_state_template=run.model_state)
    sd = dict(loaded["optimizer_state_dict"] or {})
    if not sd:
        raise CLIError(f"{flag}: the checkpoint holds no optimizer state")
    sd["hyperparameters"] = run.optimizer.hyperparameters()  # the replayed schedule's
    try:
        run.state = run.optimizer.load_state_dict(sd, loaded["params"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"{flag}: the checkpoint's optimizer state does not fit this "
                       f"command's optimizer ({exc})") from None
    run.params = dict(loaded["params"])
    if run.parallel is not None:  # this rank's state of it (every rank loads the same)
        run.state = run.parallel.load_state(run, run.state, extra, flag)
        if run.trainer is not None:
            run.params = run.trainer.master_params
    elif run.trainer is not None:  # a trainer on the saved masters and state, its scaler's
        from ..utils.mixed_precision import MixedPrecisionTrainer

        try:
            run.trainer = MixedPrecisionTrainer(run.compiled, run.optimizer, run.params,
                                                run.state, loss_scale=run.cfg.loss_scale,
                                                dynamic_loss_scaling=True)
            run.trainer.load_state_dict(extra["mixed_precision_trainer"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CLIError(f"{flag}: the checkpoint's mixed-precision state does not load "
                           f"({type(exc).__name__}: {exc})") from None
        run.state, run.params = run.trainer.optimizer_state, run.trainer.master_params
    if run.model_state is not None:
        run.model_state = dict(loaded["model_state"])
    run.compiled.step = int(extra["compiled_step"])  # Dropout's masks go on from there
    if "privacy" in extra:  # DP-SGD: the steps so far at their noise (the ε goes on)
        run.privacy_before = [tuple(h) for h in extra["privacy"]["accountant"]["history"]]
    sums = pos["sums"]
    start = Position(epoch, batch, json.loads(pos["rng"]),
                     (float.fromhex(sums[0]), float.fromhex(sums[1]), int(sums[2])))
    run.start = (start, steps, epochs)
    return (f"  resumed from {ckpt['path']}: after step {extra['steps']} (epoch {epoch}, "
            f"{batch} of its batches done)")
