"""``mithril compare --checkpoint``, ``--checkpoint-every N`` and ``--resume DIR``: the
checkpoints of a comparison, and continuing it as if it had not stopped.

Each configuration's folder (``DIR/NN-config``) gets its own ``checkpoint.safetensors`` (the
format of ``mithril train --checkpoint``, tagged as a comparison's: the parameters, the
optimizer's state, where the loop stands, the comparison's flags), with its ``metrics.csv``
and ``epochs.csv``: every N steps (``--checkpoint-every``), when the configuration finishes,
and at once when a signal (SIGTERM, Ctrl-C) stops it. They are written into ``DIR`` itself,
not the hidden folder the ranking goes through, so that a comparison killed without warning
keeps them.

``--resume DIR`` takes the comparison's flags from its checkpoints; flags given with it
replace them, and only ``--epochs`` (larger: every configuration trains further),
``--threads``, ``--backend``, ``--checkpoint-every`` and the output flags may change. A
finished configuration is read back (its logs and final metrics, no training), the one under
way continues from its checkpoint (:func:`.resume.restore`: its schedule replayed, its data
order drawn again), the others train; the ranking and every file are those of the comparison
that did not stop, bit for bit (the timings aside).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .argtypes import bounded_int, in_path, look
from .errors import CLIError
from .resume import CHECKPOINT_FILE, NOT_KEPT, _load, restore, snapshot, write_checkpoint

#: the record a comparison's checkpoints carry (``mithril train --resume`` refuses them)
FORMAT = "mithril-compare-resume-1"
#: the flags a resumed comparison may change (besides where it writes and how it shows)
MAY_CHANGE = frozenset({"epochs", "threads", "backend", "checkpoint_every", "checkpoint"})


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint and resume")
    g.add_argument("--checkpoint", action="store_true",
                   help=f"also write each configuration's {CHECKPOINT_FILE} (parameters, "
                        f"optimizer state, schedule position, data order) into its folder, "
                        f"so that --resume can continue the comparison (with a larger "
                        f"--epochs: train every configuration further)")
    g.add_argument("--checkpoint-every", type=bounded_int(1, 10**9), metavar="N",
                   help=f"also save the configuration under way ({CHECKPOINT_FILE} with its "
                        f"metrics.csv and epochs.csv) into its folder every N steps, and each "
                        f"configuration's when it finishes, each file replaced atomically, so "
                        f"that a comparison killed without warning resumes from there; "
                        f"implies --checkpoint")
    g.add_argument("--resume", metavar="DIR", type=in_path,  # ('': not "no --resume")
                   help="continue the comparison in DIR with its flags (flags given replace "
                        "them; a larger --epochs trains every configuration further): the "
                        "finished configurations are read back, the one under way continues "
                        "from its checkpoint. Writes into DIR unless --out or --name")


def wants_checkpoints(args: argparse.Namespace) -> bool:
    return bool(args.checkpoint or args.checkpoint_every or args.resume)


def _saved(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(f"*/{CHECKPOINT_FILE}") if p.is_file())


def resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags of the comparison ``--resume`` names, those given now on top (what may
    differ: :data:`MAY_CHANGE`; anything else is refused, naming it, before anything is
    written)."""
    given = Path(args.resume)
    if not look(Path.is_dir, given, "--resume"):
        raise CLIError(f"--resume {given}: no such folder (the --out of `mithril compare`)")
    saved = _saved(given)
    if not saved:
        raise CLIError(f"--resume {given}: no configuration's {CHECKPOINT_FILE} in it (a "
                       f"comparison saves them with --checkpoint or --checkpoint-every, or "
                       f"when a signal stops it)")
    extra = _load(saved[0])["extra"]
    if not isinstance(extra, dict) or extra.get("format") != FORMAT:
        raise CLIError(f"--resume {saved[0]}: not a checkpoint of `mithril compare` (no "
                       f"{FORMAT} record in its metadata)")
    typed = list(args.argv[1:])
    for i, a in enumerate(typed):
        if a == "--resume":
            del typed[i:i + 2]
            break
        if a.startswith("--resume="):
            del typed[i]
            break
    new = args.parser.parse_args(typed, namespace=argparse.Namespace(**extra["args"]))
    new.argv, new.resume = args.argv, args.resume
    now, then = snapshot(new), extra["args"]
    differ = [f"--{k.replace('_', '-')} ({then.get(k)!r} in the comparison, {now.get(k)!r} "
              f"now)" for k in sorted(set(now) | set(then))
              if k not in MAY_CHANGE | NOT_KEPT and now.get(k) != then.get(k)]
    if differ:
        raise CLIError(f"--resume {given}: this command changes the comparison's "
                       f"{'; '.join(differ)}; a resumed comparison keeps them (only --epochs, "
                       f"--backend, --threads, --checkpoint-every and the output flags may "
                       f"change)")
    if args.out is None and args.name is None:
        new.out = str(given)
    return new


def restore_config(run: Any, folder: Path) -> bool:
    """Load the configuration's checkpoint in ``folder`` into ``run`` (checked against it,
    nothing written); False where it has none (it trains from the start)."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return False
    ckpt = _load(path)
    if not isinstance(ckpt["extra"], dict) or ckpt["extra"].get("format") != FORMAT:
        raise CLIError(f"--resume: {path} is not a checkpoint of `mithril compare`")
    ckpt["path"] = str(path)
    from .resume import check_noise

    restore(run, ckpt, done_ok=True)
    check_noise(run, ckpt)
    return True


def save_config(run: Any, folder: Path, flags: dict[str, Any], steps: list[dict[str, Any]],
                epochs: list[dict[str, Any]]) -> None:
    """The checkpoint of a configuration under way or finished (:attr:`Run.saver`):
    metrics.csv, epochs.csv, then checkpoint.safetensors into ``folder``, each replaced
    atomically (as :func:`.train.save_progress`, with this command's record): a kill in
    between leaves the previous checkpoint with logs as long or longer."""
    from .errors import TrainingError
    from .run_types import RunResult
    from .train import write_logs

    nan = float("nan")
    result = RunResult(run.cfg, steps, epochs, {k: nan for k in run.metric_names()}, 0.0,
                       False, run.optimizer_repr, run.label, run.schedule.description,
                       None if run.momentum is None else run.momentum.name, run.metric,
                       run.spec.description)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_logs(result, folder)
        write_checkpoint(run, folder, flags, len(steps), len(epochs), fmt=FORMAT)
    except OSError as exc:
        raise TrainingError(f"cannot save the checkpoint into {folder} after step "
                            f"{len(steps)} ({exc.strerror or exc})") from None
