"""``sam-bench <command> [hydra overrides]``: a dispatcher in front of each command's @hydra.main.

The command word is removed from ``sys.argv`` and the rest is left to Hydra, so overrides,
``-m/--multirun``, ``--cfg job`` and ``--help`` all work as with any Hydra app.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Callable

USAGE = """usage: sam-bench <command> [hydra overrides]

commands:
  train    train one model (or a sweep with -m); e.g.
             sam-bench train model=wrn dataset=cifar100
             sam-bench train -m optimizer=sgd,sam optimizer.rho=0.02,0.05
  report   collect result.json files under the run roots and write tables to results/; e.g.
             sam-bench report runs=[multirun] out=results
  models   list every model with its parameters (M) and forward GFLOPs
  hessian  top eigenvalues of the training-loss Hessian of a checkpoint (Fig. 3 left); e.g.
             sam-bench hessian checkpoint=runs/<run>/checkpoint_epoch0050.pt

`sam-bench <command> --help` lists the config groups and every key of the command;
`sam-bench --version` prints the versions of sam-bench, torch and hydra-core.
"""


MAX_DIRNAME = 200  # file systems cap a path component at 255 bytes


def _sanitize_dirname(overrides: str) -> str:
    """Hydra's override_dirname as one safe path component ('defaults' when there are none).

    A long command line is cut and suffixed with a hash of the whole, so distinct runs keep
    distinct (and stable) directories."""
    name = overrides.replace("/", "_").replace(" ", "") or "defaults"
    if len(name.encode()) > MAX_DIRNAME:
        import hashlib

        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[: MAX_DIRNAME - 13].decode(errors="ignore") + "-" + digest
    return name


def _register() -> None:
    from omegaconf import OmegaConf

    from sam_bench.schema import register_configs

    register_configs()
    if not OmegaConf.has_resolver("run_dirname"):
        OmegaConf.register_new_resolver("run_dirname", _sanitize_dirname)


def _say(line: str) -> None:
    """``line`` and its newline on stderr in one write: under torchrun every rank's stderr is the same
    pipe, and print's two writes let another rank's line land between a line and its newline (CI)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _fail(message: str, status: int = 2) -> None:
    """One line on stderr and exit ``status``: 2 for bad input (the default), 1 for other errors."""
    _say(f"sam-bench: error: {message}")
    sys.exit(status)


def _values(override) -> list[str]:
    """The overrides one command-line override stands for: itself, or one per value of a sweep."""
    if not override.is_sweep_override():
        return [override.input_line]
    return [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]


def _sweep_points(overrides: list) -> list[list[str]]:
    """Every point of the command line's sweep (its overrides, one value each), each once.

    All of them are composed and validated before any runs: checking each value of each key alone
    missed pairs that fail together (``optimizer.m=32`` with ``trainer.batch_size=48``)."""
    points = (list(p) for p in itertools.product(*[_values(o) for o in overrides]))
    return list({tuple(p): p for p in points}.values())


def _dotted_keys(node, prefix: str = "") -> list[str]:
    """Every leaf key of a plain nested dict, dotted (``model.kwargs.depth``)."""
    if not isinstance(node, dict) or not node:
        return [prefix[:-1]] if prefix else []
    return [k for name, child in node.items() for k in _dotted_keys(child, f"{prefix}{name}.")]


def _suggest_keys(compose_without: Callable[[str], object], text: str) -> str:
    """' did you mean X?' for the key Hydra could not override (named in ``text``), from the config
    composed without that override; '' when there is no good guess."""
    import re

    from omegaconf import OmegaConf

    found = re.search(r"Could not override '([^']+)'", text)
    if not found:
        return ""
    unknown = found.group(1).lstrip("+~")
    try:
        cfg = OmegaConf.to_container(compose_without(unknown), resolve=False)
    except Exception:  # noqa: BLE001 - a hint must never hide the real error
        return ""
    from sam_bench.schema import similar_keys

    similar = similar_keys(_dotted_keys(cfg), unknown)
    return f" did you mean {' or '.join(similar)}?" if similar else ""


def _extra_model_kwarg(text: str) -> str:
    """' +model.kwargs.K=V passes K to the model's constructor ...;' for an unknown key under
    model.kwargs (named in Hydra's ``text``): a model config lists only the keywords it sets."""
    import re

    found = re.search(r"use \+(model\.kwargs\.\S+)", text)
    return f" +{found.group(1)} passes it to the model's constructor as an extra keyword;" if found else ""


def _describe_composition_error(e: Exception, command: str, suggest: Callable[[str], str] = lambda text: "") -> str:
    """Hydra's multi-line composition report as one line that names the override and the fix
    (``suggest(text)`` adds a likely key for an unknown one)."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    head = lines[0].rstrip(".") if lines else type(e).__name__
    if "Available options in" in text:
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options in"))
        options = [line for line in lines[start + 1:] if not line.startswith(("Config search path", "provider="))]
        hint = ""
        if "'experiment/" in head:  # the paper's presets sit one level down, in experiment/paper/
            from sam_bench.paths import config_dir

            wanted = head.split("'experiment/", 1)[1].split("'", 1)[0].removeprefix("paper/")
            stems = sorted(p.stem for p in (Path(config_dir()) / "experiment" / "paper").glob("*.yaml"))
            close = [s for s in stems if s.startswith(wanted)] or difflib.get_close_matches(wanted, stems, n=3)
            hint = ("; or a paper preset, experiment=paper/<name>"
                    + (f" (e.g. {', '.join('paper/' + s for s in close[:3])})" if close else "")
                    + f": `sam-bench {command} --help` lists them")
        return f"{head}; choose one of: {', '.join(options)}{hint}"
    cause = e.__cause__
    if cause is not None:
        detail = str(cause).strip().splitlines()[0]
        if "not in" in detail:
            detail += f" (no such key;{suggest(text)}{_extra_model_kwarg(text)} `sam-bench {command} --help` lists every key)"
        return f"{head}: {detail}"
    return head


def _preset_sweeps(config_name: str, parsed: list) -> list[str]:
    """``key=values`` for each key of the composed config's ``hydra.sweeper.params`` (a preset's
    grid) that the command line does not set itself (Hydra's sweeper gives the command line
    precedence); [] when the first point does not compose (the point-by-point check reports it)."""
    from hydra import compose

    first = [_values(o)[0] for o in parsed]
    try:
        params = compose(config_name, overrides=first, return_hydra_config=True).hydra.sweeper.get("params") or {}
    except Exception:  # noqa: BLE001 - judged below, point by point
        return []
    given = {o.get_key_element().lstrip("+~") for o in parsed}
    return [f"{key}={value}" for key, value in params.items() if key not in given]


#: Hydra's flags that each choose what the command does: Hydra takes one at a time (else a ValueError
#: traceback). By the attribute of Hydra's parsed arguments, as they are named to the user.
MODE_FLAGS = {"multirun": "-m/--multirun", "cfg": "--cfg", "info": "--info", "run": "--run", "shell_completion": "--shell-completion"}


#: Hydra's flags that are left to Hydra, the overrides beside them unchecked: help, another config
#: (path, name or directory), a rerun, shell completion, --run. By the attribute of Hydra's parsed arguments.
LEFT_TO_HYDRA = ("help", "hydra_help", "run", "shell_completion", "config_path", "config_name", "config_dir", "experimental_rerun")


def _hydra_args(args: list[str], intermixed: bool = True):
    """``args`` as Hydra's own parser reads them (abbreviations such as ``--multi``, ``--cfg=job``),
    ``intermixed``: with the overrides on both sides of a flag, as a user means them (@hydra.main's
    parse_args is not); None when it would refuse them or exit (``--version``): left to Hydra."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser  # what @hydra.main parses sys.argv with

    parser = get_args_parser()
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return parser.parse_intermixed_args(args) if intermixed else parser.parse_args(args)
    except SystemExit:
        return None


def _override_positions(args: list[str]) -> list[int]:
    """Where the overrides are in ``args``: each token that Hydra's parser puts among the overrides
    when the token is replaced by a marker (a NUL, which no argument holds). A flag's value is not one,
    even when it is spelt like an override (``--package a=1``), nor a value --cfg or --info chooses."""
    def is_override(i: int) -> bool:
        marker = f"\0{i}"
        parsed = _hydra_args([*args[:i], marker, *args[i + 1:]])
        return parsed is not None and marker in parsed.overrides

    return [i for i, arg in enumerate(args) if not arg.startswith("-") and is_override(i)]


def _overrides_first(args: list[str], hydra_args, config_name: str) -> list[str]:
    """``args`` in an order @hydra.main's parse_args reads as the intermixed parse did (``hydra_args``):
    as given where it does, else the overrides first, in their order, then every flag with its value
    as typed (``train optimizer=sam -m seed=0,1`` was Hydra's multi-line usage error). Not flags first:
    a bare --info there would take the first override for its value."""
    if _hydra_args(args, intermixed=False) == hydra_args:
        return args
    overrides = _override_positions(args)
    moved = [args[i] for i in overrides] + [arg for i, arg in enumerate(args) if i not in overrides]
    if _hydra_args(moved, intermixed=False) != hydra_args:  # a guard: not reached by any argument list known
        _fail(f"cannot pass {' '.join(args)!r} on to Hydra in this order; put the flags before the overrides: "
              f"sam-bench {config_name} -m a=1 b=2")
    return moved


def _is_multirun_flag(arg: str) -> bool:
    """``-m``, ``--multirun``, or an abbreviation of it that argparse accepts (``--multi``, ``--m``)."""
    return arg == "-m" or (len(arg) > 2 and "--multirun".startswith(arg))


def _refuse_two_modes(hydra_args, config_name: str) -> None:
    """One line for two of Hydra's modes at once (``--cfg job -m``, ``--cfg=job --run``): Hydra's own
    refusal is a traceback. Hydra answers ``--help`` before it looks, so that is left alone."""
    if hydra_args is None or hydra_args.help or hydra_args.hydra_help:
        return
    modes = [flag for attr, flag in MODE_FLAGS.items() if getattr(hydra_args, attr) not in (None, False)]
    if len(modes) < 2:
        return
    if modes[0] == "-m/--multirun":
        _fail(f"{modes[1]} cannot be combined with -m/--multirun (Hydra does one or the other); drop -m to see "
              f"one point, e.g. sam-bench {config_name} {modes[1]} job <that point's overrides>"
              if modes[1] == "--cfg" else f"{modes[1]} cannot be combined with -m/--multirun; drop -m")
    _fail(f"{modes[0]} cannot be combined with {modes[1]} (Hydra does one or the other); drop one")


def _no_equals(arg: str, following: list[str], command: str) -> str:
    """The one-line error for an argument without '=' (``sam-bench train optimizer rho=0.1``)."""
    from sam_bench.paths import config_dir
    from sam_bench.schema import SCHEMA_GROUPS

    group = Path(config_dir()) / arg
    if command == "train" and arg and group.is_dir():
        options = sorted(str(f.relative_to(group).with_suffix("")) for f in group.glob("*.yaml"))
        options += sorted(f"{d.name}/<name>" for d in group.iterdir() if d.is_dir())
        choose = f"'{arg}' lacks '=': choose an option of the {arg} group with {arg}=<option> (one of: {', '.join(options)})"
        if arg not in SCHEMA_GROUPS:  # experiment: a preset, no keys of its own
            return choose
        meant = next((a for a in following if "=" in a and "." not in a.split("=", 1)[0]), None)  # rho=0.1
        return f"{choose}, or set one of its keys with {arg}.{meant or '<key>=<value>'} (no space)"
    return f"'{arg}' is not an override: write key=value (e.g. {'optimizer.rho=0.1' if command == 'train' else 'out=results'}); " \
           f"`sam-bench {command} --help` lists every key"


def _preflight(config_name: str) -> None:
    """Compose (and for ``train`` validate, ask the trainer whether this machine has the device and
    precision, check each dataset's files (data.files_problem), the SLURM tools, and build each distinct model
    on the meta device) every point of the command line's sweep before Hydra runs any, so that a bad
    override, value or model fails at once with one line naming it (exit 2), not with Hydra's
    multi-line report (exit 1) or after the sweep's first jobs have trained. ``--cfg``/``--info`` are
    checked alike (models, data and launcher aside), then Hydra prints; other flags (--help, ...) and
    what this cannot judge are left to Hydra. The command line is read once, by Hydra's own parser, with
    overrides on both sides of a flag (``train a=1 -m b=2``), and handed on in an order Hydra takes."""
    args = sys.argv[1:]
    hydra_args = _hydra_args(args)
    _refuse_two_modes(hydra_args, config_name)
    multirun = hydra_args.multirun if hydra_args is not None else any(_is_multirun_flag(a) for a in args)
    if multirun and config_name != "train":  # Hydra would make multirun/<date>/ dirs, which the report then reads
        _fail(f"-m/--multirun sweeps training runs; sam-bench {config_name} runs once: drop -m"
              + (" (one report reads every run under runs=[DIR,...])" if config_name == "report" else ""))
    if hydra_args is None or "--" in args:  # after "--" parse_args reads flags as overrides, the intermixed parse does not
        return
    sys.argv = [sys.argv[0], *_overrides_first(args, hydra_args, config_name)]
    if any(getattr(hydra_args, attr) not in (None, False) for attr in LEFT_TO_HYDRA):
        return
    overrides = hydra_args.overrides
    printing = hydra_args.cfg is not None or hydra_args.info is not None  # Hydra prints instead of running
    bare = next((i for i, a in enumerate(overrides) if "=" not in a and not a.startswith("~")), None)
    if bare is not None:
        _fail(_no_equals(overrides[bare], overrides[bare + 1:], config_name))
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from sam_bench.errors import SamBenchError
    from sam_bench.paths import config_dir
    from sam_bench.schema import HessianConfig, ReportConfig, check_known_keys, validate

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except OverrideParseException as e:
            _fail(f"cannot parse the overrides {' '.join(overrides)!r}: {str(e).splitlines()[0]}; a value with '=' or ',' in it "
                  "(a run directory's name) needs quotes: key='value' (grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)")
        sweep = next((o for o in parsed if o.is_sweep_override()), None)
        if sweep is not None and not multirun:  # Hydra's own message is five lines, exit 1
            _fail(f"{sweep.input_line} gives several values: "
                  + ("add -m to train each (sam-bench train -m ...)" if config_name == "train" else f"sam-bench {config_name} takes one")
                  + "; a list is written key=[a,b], a string with a comma quoted: key='a,b'")
        for o in parsed:
            if o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir") and not o.is_sweep_override() and not str(o.value()).strip():
                _fail(f"{o.key_or_group} is empty: the run would write its checkpoints into the current directory; "
                      f"give a directory, e.g. {o.key_or_group}=runs/mine ({o.key_or_group}=. for the current one)")
        try:
            if multirun:  # a preset's own grid (hydra.sweeper.params, e.g. Fig. 6's p x rho) is swept too
                parsed += OverridesParser.create().parse_overrides(_preset_sweeps(config_name, parsed))
            points = _sweep_points(parsed)
        except Exception:  # a sweep form this cannot expand: Hydra will judge it
            return
        swept = [i for i, o in enumerate(parsed) if o.is_sweep_override()]
        models: dict[str, tuple] = {}  # each distinct model of the sweep, built once below
        warned: set = set()
        data_checked: set = set()
        for point in points:
            where = f" (sweep point {' '.join(point[i] for i in swept)})" if len(points) > 1 else ""
            try:
                cfg = compose(config_name, overrides=point, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as e:
                def compose_without(key: str, point=point):
                    rest = [o for o in point if o.split("=", 1)[0].lstrip("+~") != key]
                    return compose(config_name, overrides=rest)

                suggest = lambda text: _suggest_keys(compose_without, text)  # noqa: E731
                _fail(_describe_composition_error(e, config_name, suggest) + where)
            try:
                if config_name == "train":
                    validate(cfg)
                else:
                    check_known_keys(cfg, ReportConfig if config_name == "report" else HessianConfig, config_name)
            except SamBenchError as e:
                _fail(f"{e}{where}")
            if config_name == "train":
                _warn_preset_rho(cfg, point, warned)
                problem = _device_problem(cfg.trainer) or (multirun and not printing and _launcher_problem(cfg.hydra.launcher))
                if problem:
                    _fail(f"{problem}{where}")
            if config_name == "hessian" and (problem := _hessian_device_problem(cfg.device)):
                _fail(problem)
            if config_name == "train" and not printing:
                problem = _missing_data(cfg.dataset, data_checked)
                if problem:
                    _fail(f"{problem}{where}")
                spec, use = _model_use(cfg)
                if spec is not None:
                    models.setdefault(spec, ({}, where))[0].setdefault(use, where)
    for spec, (uses, where) in models.items():
        problem = _model_problem(json.loads(spec), uses)
        if problem:
            _fail(problem[0] + (problem[1] if len(points) > 1 else ""))


def _device_problem(trainer) -> str | None:
    """The trainer's own refusal of ``trainer.device``/``trainer.precision`` on this machine (CUDA, or
    fp16, where there is no GPU), else None: a sweep point asking for it failed only after the points
    before it had trained. torch is imported only when a point asks for CUDA or fp16."""
    device = str(getattr(trainer.device, "value", trainer.device))
    precision = str(getattr(trainer.precision, "value", trainer.precision))
    if device != "cuda" and precision != "fp16":  # auto and cpu run anywhere; bf16 and fp32 on the CPU too
        return None
    from sam_bench.engine.precision import resolve_device, resolve_precision
    from sam_bench.errors import SamBenchError

    try:
        resolve_precision(precision, resolve_device(device))
    except SamBenchError as e:
        return str(e)
    return None


def _hessian_device_problem(device) -> str | None:
    """Why ``sam-bench hessian device=cuda`` cannot run here (no CUDA), else None: it failed only after
    the checkpoint was loaded. torch is imported only for cuda."""
    device = str(getattr(device, "value", device))
    if device != "cuda":
        return None
    from sam_bench.engine.precision import resolve_device
    from sam_bench.errors import SamBenchError

    try:
        resolve_device(device, key="device")
    except SamBenchError as e:
        return str(e)
    return None


def _launcher_problem(launcher) -> str | None:
    """Why the SLURM launcher cannot submit from this machine (no ``sbatch``/``srun``), else None:
    submitit's own refusal is a traceback."""
    import shutil

    if not str(launcher.get("_target_", "")).endswith(".SlurmLauncher"):
        return None
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if not missing:
        return None
    return (f"hydra/launcher=slurm submits SLURM jobs, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not on PATH: run the command on the cluster's login node, or try the sweep on this machine with "
            "hydra/launcher=submitit_local")


def _missing_data(dataset, checked: set) -> str | None:
    """The trainer's refusal of a point whose dataset files are missing or corrupt where it would not
    download them (a sweep over ``dataset=synthetic,cifar10`` trained the synthetic point first),
    else None; ``sam_bench.data.files_problem`` says what each dataset's check reads (an md5 pass
    over CIFAR's files: well under a second, and kept for the trainer's own check in this process).
    Each distinct (dataset, directory, options the check reads) is checked once."""
    from sam_bench.data import files_problem
    from sam_bench.paths import data_dir

    root = os.path.abspath(data_dir(dataset))  # as the trainer names it (a relative data_root: from where the command ran)
    key = (str(dataset.name).removesuffix("_noisy"), root, bool(dataset.download), dataset.system_dir, bool(dataset.svhn_extra),
           int(dataset.num_classes))
    if key in checked:
        return None
    checked.add(key)
    return files_problem(dataset, root)


def _warn_preset_rho(cfg, point: list[str], warned: set) -> None:
    """A warning when an experiment preset's ``optimizer.rho`` replaces the one of the optimizer group the
    command line chose (``experiment=paper/table1_... optimizer=asam`` trains ASAM with the preset's
    SAM ρ = 0.05, not asam.yaml's 0.5): the preset, merged after the group, wins. Once per
    (preset, group); none when the command line sets ``optimizer.rho`` itself, or for SGD (ρ = 0)."""
    from hydra import compose

    experiment = cfg.hydra.runtime.choices.get("experiment")
    keys = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] if "=" in o else "" for o in point}
    group = keys.get("optimizer")
    if experiment is None or group is None or "optimizer.rho" in keys or cfg.optimizer.name == "sgd" or (experiment, group) in warned:
        return
    warned.add((experiment, group))
    without = [o for o in point if o.split("=", 1)[0].lstrip("+~") != "optimizer"]
    try:
        preset_group = compose("train", overrides=without, return_hydra_config=True).hydra.runtime.choices.get("optimizer")
        own = compose("train", overrides=[f"optimizer={group}"]).optimizer.rho
    except Exception:  # noqa: BLE001 - only a warning
        return
    if preset_group != group and own != cfg.optimizer.rho:
        print(f"sam-bench: warning: experiment={experiment} sets optimizer.rho={cfg.optimizer.rho}, which replaces "
              f"optimizer={group}'s own rho={own}; add optimizer.rho={own} to train with {group}'s", file=sys.stderr)


def _model_use(cfg) -> tuple[str | None, str | None]:
    """(the model a point builds, how its training step uses it) as JSON keys, so that a sweep builds
    each distinct model once; (None, None) when the config does not say (left to the run)."""
    from omegaconf import OmegaConf

    try:
        opt, tr = cfg.optimizer, cfg.trainer
        kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
        kwargs.pop("pretrained", None)  # checked without loading weights (a download takes minutes)
        spec = {"arch": str(cfg.model.arch), "num_classes": int(cfg.dataset.num_classes),
                "in_chans": int(cfg.dataset.in_chans), "kwargs": kwargs}
        rank_batch = tr.batch_size // max(1, int(os.environ.get("WORLD_SIZE", "1")))
        use = None  # as the trainer decides: m-sharpness only for m below the per-rank batch
        if opt.m not in (None, rank_batch):
            use = {"chunks": rank_batch // opt.m, "engine": str(getattr(opt.m_engine, "value", opt.m_engine)),
                   "two_pass": opt.name != "sgd" and opt.rho > 0, "second_order": bool(opt.second_order),
                   "compiled": bool(tr.compile)}
    except Exception:  # noqa: BLE001 - an unresolvable value: the run reports it
        return None, None
    return json.dumps(spec, sort_keys=True, default=str), json.dumps(use, sort_keys=True)


def _model_problem(spec: dict, uses: dict) -> tuple[str, str] | None:
    """(why, at which sweep point) the model ``spec`` cannot be built, or cannot be trained as
    ``uses`` (m-sharpness engine, ghost BatchNorm) asks; None when it can. Built on the meta device:
    no memory, no weights (QA: 1-2 s for the largest)."""
    import torch

    from sam_bench.errors import SamBenchError
    from sam_bench.models import build_model

    where = next(iter(uses.values()))
    try:
        with torch.device("meta"):
            model = build_model(spec["arch"], spec["num_classes"], spec["in_chans"], **spec["kwargs"])
    except SamBenchError as e:
        return str(e), where
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        if "meta" in str(e).lower():  # the model computes something while it is built: the run itself will tell
            return None
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"model.arch={spec['arch']!r} with model.kwargs {spec['kwargs']} cannot be built: {detail}", where
    for use, where in uses.items():
        use = json.loads(use)
        if use is None:
            continue
        if use["two_pass"]:
            from sam_bench.optim.msam import why_vmap

            try:
                why_vmap(model, use["engine"], use["chunks"], compiled=use["compiled"], device="cpu", second_order=use["second_order"])
            except ValueError as e:
                return str(e), where
        else:
            from sam_bench.optim.chunked import ghost_batch_norm_unsupported

            why = ghost_batch_norm_unsupported(model)
            if why:
                return why, where
    return None


def _skip_diverged_sweep_point(error: Exception, diverged: list[str]) -> None:
    """In a multirun on the local launcher (one process runs the points in turn), a point whose
    training diverged (an extreme ρ or lr of a grid) is logged in its run directory and skipped, so
    the sweep goes on. Outside a sweep, and under a launcher that runs each point as a job of its
    own (SLURM), it is an error: there the job fails, the other jobs run anyway, and the launcher
    reports the failure."""
    import logging

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or not str(hc.launcher.get("_target_", "")).endswith(".BasicLauncher"):
        _fail(str(error))
    point = " ".join(hc.overrides.task)
    logging.getLogger("sam_bench").error("diverged, so this sweep point is skipped and the sweep goes on: %s", error)
    print(f"sam-bench: error: {error} (sweep point {point}: skipped, the sweep goes on)", file=sys.stderr)
    diverged.append(point)


def train() -> None:
    from sam_bench.engine.signals import catch_early

    catch_early()  # first: a scheduler's SIGTERM while Hydra composes or torch imports stops the run as a preemption (75)
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from sam_bench.errors import SamBenchError, TrainingDiverged
    from sam_bench.paths import config_dir

    sys.argv = [sys.argv[0], *_quote_paths(sys.argv[1:], TRAIN_PATH_KEYS)]
    _register()
    _preflight("train")
    diverged: list[str] = []

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
    def _train(cfg) -> None:
        from sam_bench.schema import validate

        try:
            validate(cfg)  # before importing torch: a bad value fails in well under a second
        except SamBenchError as e:
            _fail(str(e))
        from sam_bench.engine.signals import PREEMPTED_EXIT_CODE, Preempted
        from sam_bench.engine.trainer import fit
        from sam_bench.tracking.results import WriteError

        try:
            fit(cfg, HydraConfig.get().runtime.output_dir)
        except TrainingDiverged as e:
            _skip_diverged_sweep_point(e, diverged)
        except WriteError as e:  # a full disk or an I/O error: not bad input (status 2), an error (1)
            _fail(str(e), status=1)
        except SamBenchError as e:
            _fail(str(e))
        except Preempted as e:
            _say(f"sam-bench: preempted: {e}")
            sys.exit(PREEMPTED_EXIT_CODE)
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside training (loading, compiling)
            print("sam-bench: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
            sys.exit(130)

    try:
        _train()
    finally:  # also when a later point's error ended the sweep: the diverged ones are still named
        if diverged:
            print(f"sam-bench: error: {len(diverged)} sweep point(s) diverged and have no result:\n"
                  + "".join(f"  {p}\n" for p in diverged), end="", file=sys.stderr)
    if diverged:  # every other point ran; the report lists these runs as failed
        sys.exit(1)


def report() -> None:
    import hydra

    from sam_bench.errors import SamBenchError
    from sam_bench.paths import config_dir

    sys.argv = [sys.argv[0], *_quote_paths(sys.argv[1:], ("out",), list_keys=("runs",))]
    _register()
    _preflight("report")
    default_roots = not any(a.split("=", 1)[0].lstrip("+~") == "runs" for a in sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="report")
    def _report(cfg) -> None:
        from sam_bench.report import write_report

        try:
            table = write_report([str(r) for r in cfg.runs], cfg.out, tensorboard=cfg.tensorboard, default_roots=default_roots)
        except SamBenchError as e:
            _fail(str(e))
        if cfg.print_table:
            print(table)
        # on stderr: stdout is the table alone, for a pipe; this says where the files went (QA: nothing did)
        _say(f"sam-bench: report written to {os.path.abspath(os.path.expanduser(str(cfg.out)))}/ (README.md there lists its tables)")

    _report()


PATH_KEYS = ("checkpoint", "out", "data_root")
#: train: the run and sweep directories (never swept, so a comma in them is part of the name)
TRAIN_PATH_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


def _quote_paths(args: list[str], keys: tuple[str, ...] = PATH_KEYS, list_keys: tuple[str, ...] = ()) -> list[str]:
    """``checkpoint=runs/a=1,b=2`` as ``checkpoint='runs/a=1,b=2'``: run directories are named after
    their overrides, and Hydra's grammar would read the ``=`` and ``,`` in them as syntax. A key of
    ``list_keys`` takes a list of such paths: ``runs=[multirun/a=1,b=2,runs]`` becomes
    ``runs=['multirun/a=1,b=2','runs']`` (see :func:`_split_path_list`), and ``runs=DIR`` a one-item
    list. Values already quoted, and values with an interpolation (``${...}``), are left as they are."""
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and value and not any(c in value for c in "'\"$"):
            if key in keys:
                a = f"{key}='{value}'"
            elif key in list_keys:
                listed = value.startswith("[") and value.endswith("]")
                items = _split_path_list(value[1:-1]) if listed else [value]
                a = f"{key}=[" + ",".join(f"'{item}'" for item in items if item) + "]"
        out.append(a)
    return out


def _leads_to_a_path(path: str) -> bool:
    """Whether ``path`` exists or begins the name of an entry in its directory followed by a comma."""
    if os.path.exists(path):
        return True
    parent, name = os.path.split(path)
    try:
        return any(entry.startswith(name + ",") for entry in os.listdir(parent or "."))
    except OSError:
        return False


def _split_path_list(inner: str) -> list[str]:
    """The paths of a comma-separated list whose paths may hold commas themselves: a comma joins two
    pieces when the joined path exists, or begins the name of an entry in its directory
    (``a=1,b=2`` of ``a=1,b=2,c=3``); otherwise it separates two paths."""
    items: list[str] = []
    for piece in inner.split(","):
        if items and _leads_to_a_path(f"{items[-1]},{piece}"):
            items[-1] = f"{items[-1]},{piece}"
        else:
            items.append(piece.strip())
    return items


def hessian() -> None:
    import hydra

    from sam_bench.errors import SamBenchError
    from sam_bench.paths import config_dir

    sys.argv = [sys.argv[0], *_quote_paths(sys.argv[1:])]
    _register()
    _preflight("hessian")

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="hessian")
    def _hessian(cfg) -> None:
        from omegaconf import OmegaConf

        from sam_bench.analysis.spectrum import describe, hessian_spectrum

        if OmegaConf.is_missing(cfg, "checkpoint"):
            _fail("checkpoint=... is missing: give a checkpoint file (e.g. <run dir>/checkpoint_epoch0050.pt) or a run directory")
        try:
            print(describe(hessian_spectrum(cfg)))
        except SamBenchError as e:
            _fail(str(e))

    _hessian()


def models() -> None:
    """Print every registered sam-bench model and every model config with parameters and GFLOPs."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print("usage: sam-bench models   (parameters in M and forward GFLOPs of every model and model config)")
        return
    if len(sys.argv) > 1:
        _fail(f"models takes no arguments, got {' '.join(sys.argv[1:])!r}")
    from sam_bench.models.summary import summary
    from sam_bench.paths import config_dir

    print(summary(config_dir()), end="")


COMMANDS: dict[str, Callable[[], None]] = {"train": train, "report": report, "models": models, "hessian": hessian}

# At import: a launcher that runs jobs in other processes (submitit) unpickles the task there,
# which imports this module, and then composes the job's config with these resolvers and schemas.
_register()


def _version() -> str:
    """``sam-bench X (torch Y, hydra-core Z)``: read from the installed packages' metadata (importing
    torch takes seconds)."""
    from importlib import metadata

    from sam_bench import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"sam-bench {__version__} (torch {installed('torch')}, hydra-core {installed('hydra-core')})"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:  # as argparse does for a missing command
        print(USAGE, end="", file=sys.stderr)
        sys.exit(2)
    if args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    command = args[0]
    if command in ("--version", "-V"):
        print(_version())
        return
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)} (see sam-bench --help)")
    sys.argv = [f"sam-bench {command}", *args[1:]]
    COMMANDS[command]()
