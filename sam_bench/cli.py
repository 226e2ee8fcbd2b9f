"""``sam-bench <command> [hydra overrides]``: a dispatcher in front of each command's @hydra.main.

The command word is removed from ``sys.argv`` and the rest is left to Hydra, so overrides,
``-m/--multirun``, ``--cfg job`` and ``--help`` all work as with any Hydra app.
"""

from __future__ import annotations

import difflib
import itertools
import math
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

`sam-bench <command> --help` lists the config groups and every key of the command.
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


def _fail(message: str) -> None:
    print(f"sam-bench: error: {message}", file=sys.stderr)
    sys.exit(2)


#: A sweep with at most this many points is checked point by point; a larger one by its first
#: point and every value of every swept key in turn (each compose takes ~0.1 s).
PREFLIGHT_ALL_POINTS = 16


def _values(override) -> list[str]:
    """The overrides one command-line override stands for: itself, or one per value of a sweep."""
    if not override.is_sweep_override():
        return [override.input_line]
    return [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]


def _sweep_points(overrides: list) -> list[list[str]]:
    """The points of the command line's sweep to check before anything runs: all of them, or for a
    large sweep the first point and each swept value once (every value checked, not every pair)."""
    values = [_values(o) for o in overrides]
    if math.prod(len(v) for v in values) <= PREFLIGHT_ALL_POINTS:
        return [list(p) for p in itertools.product(*values)]
    first = [v[0] for v in values]
    return [first] + [first[:i] + [other] + first[i + 1:] for i, vs in enumerate(values) for other in vs[1:]]


def _dotted_keys(node, prefix: str = "") -> list[str]:
    """Every leaf key of a plain nested dict, dotted (``model.kwargs.depth``)."""
    if not isinstance(node, dict) or not node:
        return [prefix[:-1]] if prefix else []
    return [k for name, child in node.items() for k in _dotted_keys(child, f"{prefix}{name}.")]


def _similar_keys(keys: list[str], unknown: str) -> list[str]:
    """The keys ``unknown`` was likely meant to be: those with the same last part anywhere
    (``model.depth`` -> ``model.kwargs.depth``), else its siblings spelt alike (``optimizer.rhoo`` ->
    ``optimizer.rho``)."""
    import difflib

    parent, _, leaf = unknown.rpartition(".")
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.75)
    return [f"{parent}.{k}" if parent else k for k in close]


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
    similar = _similar_keys(_dotted_keys(cfg), unknown)
    return f" did you mean {' or '.join(similar)}?" if similar else ""


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
            detail += f" (no such key;{suggest(text)} `sam-bench {command} --help` lists every key)"
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


def _preflight(config_name: str) -> None:
    """Compose (and for ``train`` validate) the points of the command line's sweep before Hydra runs
    any, so that a bad override or value fails at once with one line naming it (exit 2), not with
    Hydra's multi-line report (exit 1) or after the sweep's first jobs have trained.
    Flags (--help, --cfg, --info, ...) and anything this cannot judge are left to Hydra."""
    args = [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    multirun = len(args) < len(sys.argv) - 1
    exclusive = [a for a in args if a in ("--cfg", "-c", "--info", "-i", "--run", "-r", "--shell-completion", "-sc")]
    if multirun and exclusive:  # Hydra's own refusal is a ValueError traceback
        _fail(f"{exclusive[0]} cannot be combined with -m/--multirun (Hydra does one or the other); drop -m to see "
              f"one point, e.g. sam-bench {config_name} {exclusive[0]} job <that point's overrides>"
              if exclusive[0] in ("--cfg", "-c") else f"{exclusive[0]} cannot be combined with -m/--multirun; drop -m")
    if any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from sam_bench.errors import SamBenchError
    from sam_bench.paths import config_dir
    from sam_bench.schema import validate

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            parsed = OverridesParser.create().parse_overrides(args)
            if multirun:  # a preset's own grid (hydra.sweeper.params, e.g. Fig. 6's p x rho) is swept too
                parsed += OverridesParser.create().parse_overrides(_preset_sweeps(config_name, parsed))
            points = _sweep_points(parsed)
        except OverrideParseException as e:
            _fail(f"cannot parse the overrides {' '.join(args)!r}: {str(e).splitlines()[0]}; a value with '=' or ',' "
                  "in it (a run directory's name) needs quotes: key='value' "
                  "(grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)")
        except Exception:  # a sweep form this cannot expand: Hydra will judge it
            return
        swept = [i for i, o in enumerate(parsed) if o.is_sweep_override()]
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
            if config_name == "train":
                try:
                    validate(cfg)
                except SamBenchError as e:
                    _fail(f"{e}{where}")


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

        try:
            fit(cfg, HydraConfig.get().runtime.output_dir)
        except TrainingDiverged as e:
            _skip_diverged_sweep_point(e, diverged)
        except SamBenchError as e:
            _fail(str(e))
        except Preempted as e:
            print(f"sam-bench: preempted: {e}", file=sys.stderr)
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

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="report")
    def _report(cfg) -> None:
        from sam_bench.report import write_report

        try:
            table = write_report([str(r) for r in cfg.runs], cfg.out, tensorboard=cfg.tensorboard)
        except SamBenchError as e:
            _fail(str(e))
        if cfg.print_table:
            print(table)

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


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    command = args[0]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)} (see sam-bench --help)")
    sys.argv = [f"sam-bench {command}", *args[1:]]
    COMMANDS[command]()
