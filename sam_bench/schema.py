"""Typed configs: Hydra validates every override against these dataclasses.

A wrong type (``optimizer.rho=abc``), an unknown key (``optimizer.rhoo=0.1``) or a value outside an
enum (``optimizer.bn=sometimes``) fails at composition with a message that names the key. Checks
that relate several values (ρ ≥ 0, m divides the batch, ...) live in :func:`validate`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os

from dataclasses import dataclass, field
from functools import lru_cache
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sam_bench.errors import ConfigError
from sam_bench.variant_rules import sam_variant_conflict


class Augment(str, Enum):
    none = "none"
    basic = "basic"  # flip + 4-px reflect pad + random crop, as the official code


class WeightDecayMode(str, Enum):
    loss = "loss"  # 0.5·wd·‖w‖² inside the loss: enters the ascent gradient (official code)
    decoupled = "decoupled"  # weight decay of the base optimizer, applied in the descent only


class BNMode(str, Enum):
    clean = "clean"  # running statistics from the first (clean) pass only (official code)
    both = "both"  # both passes update the running statistics
    frozen = "frozen"  # BatchNorm in eval mode for both passes (finetuning)


class MEngine(str, Enum):
    auto = "auto"  # split when the model's layers allow it (every CIFAR architecture), else vmap
    split = "split"  # full-batch layers, per-chunk kernels only where needed (sam_bench.optim.chunked)
    vmap = "vmap"  # torch.func.vmap over chunks: any model, grouped convolutions


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class NoiseMode(str, Enum):
    uniform = "uniform"  # replaced by a uniformly random class, may keep the true one (Jiang et al. 2019)
    exclusive = "exclusive"  # exactly rate*N labels moved to a different class
    asymmetric = "asymmetric"  # CIFAR-10 pair flips: truck->automobile, bird->airplane, deer->horse, cat<->dog


class AutoAugmentPolicyName(str, Enum):
    cifar10 = "cifar10"
    svhn = "svhn"
    imagenet = "imagenet"


@dataclass
class LabelNoiseConfig:
    rate: float = 0.0  # 0 = clean labels
    mode: NoiseMode = NoiseMode.uniform
    seed: int = 0  # its own seed: every optimizer/rho of a sweep sees the same noisy labels


@dataclass
class DatasetConfig:
    name: str = MISSING  # see conf/dataset/ (sam_bench.data.DATASETS)
    root: str = "${data_root}"
    num_classes: int = MISSING
    in_chans: int = 3
    image_size: int = 32
    mean: List[float] = MISSING
    std: List[float] = MISSING
    augment: Augment = Augment.basic
    pad: int = 4  # padding (reflect) before the random crop
    cutout: Optional[int] = None  # square size (16 in the paper), after normalisation, fill 0
    cutout_per_image: bool = False  # official: one patch location per batch
    autoaugment: Optional[AutoAugmentPolicyName] = None  # the official SAM code's policy (95 CIFAR sub-policies, TF ops), before flip/crop
    val_size: Optional[int] = None  # hold out the LAST N training images (official 5000)
    label_noise: LabelNoiseConfig = field(default_factory=LabelNoiseConfig)
    svhn_extra: bool = True  # SVHN: train on train + extra (Table 5)
    # streamed datasets (ImageNet, finetuning sets)
    resize: int = 256  # eval: short side resized to this, then centre crop image_size
    num_workers: int = 8
    gpu_decode: bool = False  # ImageNet: decode JPEGs with nvJPEG on the device
    download: bool = True
    train_subset: Optional[int] = None  # use the first N training images (quick runs)
    test_subset: Optional[int] = None
    # Fashion-MNIST: a directory of the gzip IDX files (Debian's dataset-fashion-mnist)
    system_dir: Optional[str] = None
    # synthetic only
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    data_seed: int = 0


@dataclass
class ModelConfig:
    arch: str = MISSING  # a timm registry name, e.g. wide_resnet_cifar
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


@dataclass
class OptimizerConfig:
    name: str = MISSING  # sgd | sam ; sgd is SAM with rho = 0 (one pass per step)
    rho: float = 0.05
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    weight_decay_mode: WeightDecayMode = WeightDecayMode.loss
    grad_clip: Optional[float] = 5.0  # global-norm clip of the final gradient; null = none
    bn: BNMode = BNMode.clean
    rng_replay: bool = True  # dropout & co draw the same numbers in both passes
    m: Optional[int] = None  # m-sharpness chunk (examples per ε); null = the whole per-device batch
    m_engine: MEngine = MEngine.auto  # how m-sharpness is computed (same result): auto | split | vmap
    adaptive: bool = False  # ASAM: ε scaled by T = |w| + eta on parameters named "*weight*"
    eta: float = 0.01  # ASAM's η
    p: str = "2"  # "2" (SAM) | "inf" (ε = ρ·sign g) | "random" (Gaussian direction, norm ρ)
    ascent_steps: int = 1  # k projected ascent steps (Table 11)
    second_order: bool = False  # keep the dε/dw term (App. C.4; one Hessian-vector product more)
    sync_perturbation: bool = False  # DDP: average the ascent gradient over ranks (official: False)
    diagnostics: bool = True  # ‖g‖, ‖ε‖, L(w+ε)−L(w), cos(g, g_SAM), summed on the device
    schedule: str = "cosine"  # cosine (per step, to 0) | constant
    warmup_epochs: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 200
    batch_size: int = 256
    eval_batch_size: int = 1000
    eval_every: int = 1  # evaluate on the test set every N epochs (and always after the last)
    device: Device = Device.auto
    precision: Precision = Precision.auto
    channels_last: bool = True  # CUDA only
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    label_smoothing: float = 0.0
    log_every_steps: int = 50
    progress: bool = True  # tqdm bar, silent when stderr is not a TTY
    checkpoint: bool = True  # full state every epoch (atomic), resumed on re-run
    checkpoint_every_steps: Optional[int] = None  # also a recovery checkpoint every N steps; null = epoch ends only
    checkpoint_every_epochs: int = 1  # the epoch-end checkpoint after every N-th epoch (and the last, and keep_epochs)
    sync_bn: bool = False  # torchrun only: SyncBatchNorm across ranks (off, as the official code)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact reruns, slower on CUDA
    num_threads: Optional[int] = None  # CPU threads; null = torch's default
    # also keep a copy of the checkpoint after these epochs (checkpoint_epoch<N>.pt), e.g. [1, 50, 300]
    # for the Hessian spectra of Fig. 3 (sam-bench hessian)
    keep_epochs: List[int] = field(default_factory=list)
    # Table 11: after training, estimate max_ε L(w+ε) − L(w) (L = error rate, %) over one epoch of
    # training batches with the run's own ascent; result.json field final_sharpness
    final_sharpness: bool = False


@dataclass
class TrainConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    seed: int = 0
    data_root: str = "data"
    name: str = ""  # experiment name shown by the reporter (paper presets set it)


@dataclass
class ReportConfig:
    runs: List[str] = field(default_factory=lambda: ["${oc.env:SAM_BENCH_RUNS,runs}", "${oc.env:SAM_BENCH_MULTIRUN,multirun}"])
    out: str = "results"
    print_table: bool = True
    # HParams event files for ρ sweeps under <out>/tensorboard (not byte-stable: wall-clock times)
    tensorboard: bool = False


@dataclass
class HessianConfig:
    checkpoint: str = MISSING  # a checkpoint file (e.g. <run>/checkpoint_epoch0050.pt) or a run directory (its newest)
    images: int = 5000  # training images, a seeded random subset (0 = all)
    batch_size: int = 250  # images per forward/double-backward pass (memory only; same result)
    top_k: int = 5  # eigenvalues reported (the paper: λ_max and λ_max/λ_5)
    iters: int = 30  # Lanczos steps (one Hessian-vector product over all the images each)
    seed: int = 0  # which training images (the subset)
    lanczos_seed: int = 0  # the Gaussian start vector (another one checks convergence on the same images)
    device: Device = Device.auto
    data_root: Optional[str] = None  # where the dataset is, if not where the run read it from
    out: Optional[str] = None  # default: hessian_<checkpoint name>.json beside the checkpoint


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="report_schema", node=ReportConfig)
    cs.store(name="hessian_schema", node=HessianConfig)
    cs.store(group="schema", name="dataset", node=DatasetConfig)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="optimizer", node=OptimizerConfig)
    cs.store(group="schema", name="trainer", node=TrainerConfig)


#: ``torch.compile`` modes (``trainer.compile_mode``); "default" passes no mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Keys that change where or how visibly a run executes, not what it computes: excluded from the
# config hash (resume check) and from the reporter's grouping.
NON_SEMANTIC_KEYS = (
    "data_root",
    "dataset.root",
    "dataset.system_dir",
    "dataset.download",
    "trainer.device",
    "trainer.progress",
    "trainer.log_every_steps",
    "trainer.num_threads",
    "trainer.keep_epochs",
    "trainer.eval_batch_size",
    "trainer.compile",
    "trainer.compile_mode",
    "optimizer.m_engine",  # how m-sharpness is computed, not what (both engines give the same step)
    "trainer.checkpoint",
    "dataset.num_workers",
    "trainer.checkpoint_every_steps",
    "trainer.checkpoint_every_epochs",
    "trainer.final_sharpness",  # a measurement after training; the training is the same
    "trainer.eval_every",  # which epochs are evaluated on the test set; the training is the same (bit for bit)
)


SCHEMA_GROUPS = {"dataset": DatasetConfig, "model": ModelConfig, "optimizer": OptimizerConfig, "trainer": TrainerConfig}


@lru_cache(maxsize=1)
def schema_defaults() -> dict:
    """The structured config's defaults as a plain dict; required keys left out."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)
    for group, node in SCHEMA_GROUPS.items():
        defaults[group] = OmegaConf.to_container(OmegaConf.structured(node), enum_to_str=True)
    return _without_missing(defaults)


def _without_missing(node: dict) -> dict:
    return {k: _without_missing(v) if isinstance(v, dict) else v for k, v in node.items() if v != MISSING}


def _fill_missing(config: dict, defaults: dict) -> None:
    for key, default in defaults.items():
        if key not in config:
            config[key] = copy.deepcopy(default)
        elif isinstance(default, dict) and default and isinstance(config[key], dict):
            _fill_missing(config[key], default)


def with_schema_defaults(config: dict) -> dict:
    """A copy of ``config`` with every key it lacks at the schema's default: runs and checkpoints of
    older versions did not record the keys added since, and trained as their defaults."""
    out = copy.deepcopy(config)
    _fill_missing(out, schema_defaults())
    return out


def semantic_config(config: dict, drop: tuple[str, ...] = NON_SEMANTIC_KEYS) -> dict:
    """A copy of a plain config without the keys in ``drop`` (dotted paths)."""
    out = copy.deepcopy(config)
    for key in drop:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def method_label(opt: Any) -> str:
    """The method an ``optimizer`` config (a DictConfig or a result.json dict) trains with, as logs
    and reports name it: ``sgd``, ``sam`` or ``asam`` (``optimizer.adaptive``), then each variant
    of the ascent that is a different method, joined with "+": ``p=inf`` / ``p=random`` (App. C.5),
    ``k=N`` (N projected ascent steps, Table 11), ``second_order`` (App. C.4); e.g. ``sam+k=3``.
    The report fills a paper cell ``<name>@<method>``, so an ASAM or k-step run never stands in for
    the paper's SAM. Settings of the same method (m, bn, rng_replay, weight decay mode, ...) are
    not part of it: runs that differ in them stay separate groups of one cell."""
    if opt.get("name") == "sgd":
        return "sgd"
    parts = ["asam" if opt.get("adaptive") else "sam"]
    if str(opt.get("p", "2")) != "2":
        parts.append(f"p={opt.get('p')}")
    if int(opt.get("ascent_steps") or 1) > 1:
        parts.append(f"k={int(opt.get('ascent_steps'))}")
    if opt.get("second_order"):
        parts.append("second_order")
    return "+".join(parts)


#: What a given config computes, as a number raised whenever the code changes it for configs that
#: existed before (:data:`COMPUTE_CHANGES`); checkpoints, result.json and spectra record it. Resuming
#: across a change that concerns the run's config is refused, and the report keeps runs of both
#: sides of such a change apart. 1: up to 97ae9d2^.
COMPUTE_VERSION = 4

#: The datasets streamed from disk (sam_bench.data.STREAMED; a test keeps the two equal)
STREAMED_DATASETS = ("imagenet", "flowers102", "oxford_pets", "stanford_cars", "fgvc_aircraft", "food101")


def _sgd_with_m_or_ranks(config: dict) -> bool:
    opt, ranks = config.get("optimizer") or {}, int(config.get("ranks") or 1)
    batch = (config.get("trainer") or {}).get("batch_size")
    m = opt.get("m")
    sgd = opt.get("name") == "sgd" or not opt.get("rho")
    return sgd and ((m is not None and m != (batch // ranks if batch else None)) or ranks > 1)


def _autoaugmented_or_streamed(config: dict) -> bool:
    ds = config.get("dataset") or {}
    return bool(ds.get("autoaugment")) or ds.get("name") in STREAMED_DATASETS


#: version -> (what it changed, which configs it changed)
COMPUTE_CHANGES: dict[int, tuple[str, Any]] = {
    2: ("strided 3x3 convolutions pad as the official Flax 'SAME' (97ae9d2; before, one pixel on each side)",
        lambda config: True),
    3: ("SGD with optimizer.m normalises BatchNorm per chunk of m, and under torchrun averages the running statistics "
        "over ranks (before, over the whole batch / each rank its own)", _sgd_with_m_or_ranks),
    4: ("AutoAugment is the official SAM code's policy (95 CIFAR sub-policies, TF ops; before, torchvision's 25), "
        "and ImageNet/finetuning resizes are bicubic (before, bilinear)", _autoaugmented_or_streamed),
}


def unversioned_warning(path: Any) -> str:
    """What a checkpoint without ``compute_version`` may hide (said on resume and by ``hessian``)."""
    return (f"{path} records no compute_version (written before 2026-11-29): if the code that wrote it predates commit "
            "97ae9d2, its strided convolutions padded otherwise than this code's")


def compute_changes(config: dict, since: int) -> list[str]:
    """What the code changed, after version ``since``, in what ``config`` computes."""
    return [what for version, (what, concerns) in sorted(COMPUTE_CHANGES.items()) if since < version and concerns(config)]


def computed_as(config: dict, version: int | None) -> int:
    """The last change, up to ``version`` (None: a file older than the number, taken as 2), that concerns
    ``config``: two runs of one config computed alike when this is equal."""
    upto = 2 if version is None else version
    return max([v for v, (_, concerns) in COMPUTE_CHANGES.items() if v <= upto and concerns(config)], default=1)


def config_hash(config: dict) -> str:
    """Short stable hash of the semantic config."""
    blob = json.dumps(semantic_config(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Keys that do not change what a run computes, for grouping: the schema's, and the optimizer's
# diagnostics (they only read the gradients and ε into device accumulators: sam.py _record_cosine,
# keep_clean_grad, record_loss_gap; msam.py the same; the update is the same with them off).
GROUPING_IGNORED = (*NON_SEMANTIC_KEYS, "optimizer.diagnostics", "seed")
# Optimizer keys an SGD run ignores (one pass, no ascent: sam.SAM.two_pass is False, so neither
# the ascent's keys nor the ascent's all-reduce is used); ρ is 0 for it. Not m: an SGD run
# normalises BatchNorm per chunk of m examples, as SAM's chunks do (engine/step.py).
SGD_IGNORED = ("rho", "adaptive", "eta", "p", "ascent_steps", "second_order", "sync_perturbation")


def grouping_config(config: dict, compute_version: int | None = COMPUTE_VERSION) -> dict:
    """What a run computes, as the report groups runs: the config with the schema's defaults for the
    keys it lacks, without the seed and the keys that change nothing (:data:`GROUPING_IGNORED`);
    an SGD run with ρ = 0 and the SAM-only keys at their defaults (it ignores them). ``compute_version``:
    of the code that trained it (None: before the number existed); an SGD run older than version 3
    ignored ``optimizer.m`` too (whole-batch BN), so it is the SGD run without m; and ``computed_as``
    (:func:`computed_as`) keeps apart runs of one config on either side of a change that concerns it."""
    out = semantic_config(with_schema_defaults(config), drop=GROUPING_IGNORED)
    opt = out.get("optimizer")
    if isinstance(opt, dict) and opt.get("name") == "sgd":
        optimizer_defaults = schema_defaults()["optimizer"]
        opt.update({k: optimizer_defaults[k] for k in SGD_IGNORED})
        opt["rho"] = 0.0
        if (compute_version or 1) < 3:
            opt["m"] = None
    out["computed_as"] = computed_as(out, compute_version)
    return out


def experiment_hash(config: dict) -> str:
    """A short stable hash of :func:`grouping_config`: equal for the runs the report groups as one
    experiment (its seeds; SGD runs whatever their ``optimizer.rho``)."""
    blob = json.dumps(grouping_config(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def validate_ranks(cfg: Any, world_size: int) -> None:
    """Checks that depend on the number of torchrun ranks (``WORLD_SIZE``): :func:`validate` makes them,
    so under torchrun the CLI's pre-check refuses a bad value before anything runs, sweep points
    included, as it does every other bad value; the trainer makes them again with its own rank count."""
    if world_size <= 1:
        return
    opt, tr = cfg.optimizer, cfg.trainer
    if tr.batch_size % world_size:
        raise ConfigError(f"trainer.batch_size={tr.batch_size} is the global batch and must divide evenly over {world_size} "
                          f"ranks; use a multiple of {world_size}")
    rank_batch = tr.batch_size // world_size
    if opt.m not in (None, rank_batch):
        raise ConfigError(
            f"optimizer.m={opt.m} under torchrun: each of the {world_size} ranks perturbs with its own {rank_batch} "
            "examples (m = trainer.batch_size / ranks); set optimizer.m=null or choose the number of ranks")
    if opt.second_order and opt.name == "sam" and opt.rho > 0:
        raise ConfigError("optimizer.second_order under torchrun is not supported (its double backward would bypass the "
                          "gradient all-reduce): run it in one process, with optimizer.m for per-device perturbations")


def _schema_fields(schema: type) -> dict[str, Any]:
    """``{field: its type}`` of a schema dataclass, the annotations resolved."""
    import typing

    return typing.get_type_hints(schema)


def schema_keys(schema: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every key of a schema, dotted, down to its leaves (a free-form dict such as ``model.kwargs`` is one key)."""
    import dataclasses

    keys = []
    for name, kind in _schema_fields(schema).items():
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """The keys of ``node`` (a plain dict) that ``schema`` lacks, dotted; a field typed as a dict or
    Any (``model.kwargs``: passed on to timm) holds any key."""
    import dataclasses

    fields = _schema_fields(schema)
    unknown = []
    for key, value in node.items():
        if key not in fields:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(fields[key]) and isinstance(value, dict):
            unknown += _unknown_keys(value, fields[key], f"{prefix}{key}.")
    return unknown


def similar_keys(keys: list[str], unknown: str) -> list[str]:
    """The keys ``unknown`` was likely meant to be: those with the same last part anywhere
    (``model.depth`` -> ``model.kwargs.depth``), else its siblings spelt alike (``optimizer.rhoo`` ->
    ``optimizer.rho``)."""
    import difflib

    parent, _, leaf = unknown.rpartition(".")
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf and k != unknown]
    if same_leaf:
        return same_leaf
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.75)
    return [f"{parent}.{k}" if parent else k for k in close]


def check_known_keys(cfg: Any, schema: type, command: str) -> None:
    """Refuse a key the schema lacks. Hydra checks every ``key=value`` against the typed config, but
    ``+key=value`` adds a key without a check: ``+optimizer.rhoo=0.1`` would train with the default ρ."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # hydra: Hydra's own config
    unknown = _unknown_keys(OmegaConf.to_container(job, resolve=False), schema)
    if unknown:
        key = unknown[0]
        similar = similar_keys(schema_keys(schema), key)
        raise ConfigError(f"{key} is not a key of the config (a + override adds keys unchecked)"
                          + (f"; did you mean {' or '.join(similar)}?" if similar else ";")
                          + f" `sam-bench {command} --help` lists every key")


def _check_output_subdir(cfg: Any) -> None:
    """A run keeps its Hydra record in ``.hydra/`` (or none): the report finds an unfinished run by
    ``.hydra/config.yaml``, and a command refused in another run's directory puts back that run's
    ``.hydra/`` files (engine/rundir.py), which under another name it would overwrite for good. Only
    the CLI's pre-check composes the ``hydra`` node; the trainer's config has none."""
    hydra = cfg.get("hydra") if hasattr(cfg, "get") else None
    subdir = None if hydra is None else hydra.get("output_subdir", ".hydra")
    if subdir not in (".hydra", None):
        raise ConfigError(f"hydra.output_subdir={subdir} is not supported: sam-bench keeps a run's Hydra record in .hydra/ "
                          "(the report and the run-directory checks read it there); drop the override, or set "
                          "hydra.output_subdir=null to write none")


def validate(cfg: Any) -> None:
    """Checks that relate values or bound them; raises :class:`ConfigError` naming key and fix."""
    check_known_keys(cfg, TrainConfig, "train")
    _check_output_subdir(cfg)
    opt, tr, ds = cfg.optimizer, cfg.trainer, cfg.dataset
    if opt.name not in ("sgd", "sam"):
        raise ConfigError(f"optimizer.name={opt.name!r} is unknown: use optimizer=sgd or optimizer=sam")
    if opt.rho < 0:
        raise ConfigError(f"optimizer.rho={opt.rho} is negative: rho is a radius, use a value >= 0 (paper grid: 0.01-0.5)")
    if opt.lr <= 0:
        raise ConfigError(f"optimizer.lr={opt.lr} must be > 0")
    if opt.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay={opt.weight_decay} must be >= 0")
    if opt.grad_clip is not None and opt.grad_clip <= 0:
        raise ConfigError(f"optimizer.grad_clip={opt.grad_clip} must be > 0, or null for no clipping")
    if not 0 <= opt.momentum < 1:
        raise ConfigError(f"optimizer.momentum={opt.momentum} must be in [0, 1)")
    _validate_sam_family(opt, tr)
    validate_ranks(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if opt.schedule not in ("cosine", "constant"):
        raise ConfigError(f"optimizer.schedule={opt.schedule!r} is unknown: use cosine or constant")
    if tr.epochs < 1:
        raise ConfigError(f"trainer.epochs={tr.epochs} must be >= 1")
    if tr.num_threads is not None and tr.num_threads < 1:
        raise ConfigError(f"trainer.num_threads={tr.num_threads} must be >= 1, or null for torch's default (one per core)")
    if not 0 <= opt.warmup_epochs < tr.epochs:
        raise ConfigError(f"optimizer.warmup_epochs={opt.warmup_epochs} must be >= 0 and below trainer.epochs={tr.epochs} "
                          "(the linear warmup comes out of the run's epochs; the paper uses 0)")
    if tr.eval_every < 1:
        raise ConfigError(f"trainer.eval_every={tr.eval_every} must be >= 1 (epochs between test evaluations)")
    if tr.batch_size < 1 or tr.eval_batch_size < 1:
        raise ConfigError("trainer.batch_size and trainer.eval_batch_size must be >= 1")
    if tr.log_every_steps < 1:
        raise ConfigError(f"trainer.log_every_steps={tr.log_every_steps} must be >= 1")
    if tr.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile_mode={tr.compile_mode!r} is unknown: use one of {', '.join(COMPILE_MODES)} "
                          "(torch.compile's modes)")
    if tr.checkpoint_every_epochs < 1:
        raise ConfigError(f"trainer.checkpoint_every_epochs={tr.checkpoint_every_epochs} must be >= 1 (1: after every epoch)")
    if tr.checkpoint_every_steps is not None and tr.checkpoint_every_steps < 1:
        raise ConfigError(f"trainer.checkpoint_every_steps={tr.checkpoint_every_steps} must be >= 1, or null for epoch ends only")
    outside = [e for e in tr.keep_epochs if not 1 <= e <= tr.epochs]
    if outside:
        raise ConfigError(f"trainer.keep_epochs={list(tr.keep_epochs)}: {outside} outside 1..trainer.epochs={tr.epochs}; "
                          "keep epochs the run reaches")
    if tr.keep_epochs and not tr.checkpoint:
        raise ConfigError("trainer.keep_epochs keeps copies of the epoch checkpoints, but trainer.checkpoint=false writes none; "
                          "set trainer.checkpoint=true")
    # batch vs dataset size, when known without loading the data (fail in the first second)
    n_train = ds.train_size if ds.name == "synthetic" else None
    if ds.train_subset:
        n_train = min(ds.train_subset, n_train or ds.train_subset)
    if n_train is not None and tr.batch_size > n_train:
        raise ConfigError(f"trainer.batch_size={tr.batch_size} exceeds the {n_train} training images of {ds.name}; lower trainer.batch_size")
    if not 0 <= tr.label_smoothing < 1:
        raise ConfigError(f"trainer.label_smoothing={tr.label_smoothing} must be in [0, 1)")
    if ds.cutout is not None and not 0 < ds.cutout <= ds.image_size:
        raise ConfigError(f"dataset.cutout={ds.cutout} must be in [1, image_size={ds.image_size}], or null for no cutout")
    if ds.val_size is not None and ds.val_size < 1:
        raise ConfigError(f"dataset.val_size={ds.val_size} must be >= 1, or null for no validation split")
    if not 0.0 <= ds.label_noise.rate <= 1.0:
        raise ConfigError(f"dataset.label_noise.rate={ds.label_noise.rate} must be in [0, 1] (paper: 0.2-0.8)")
    if ds.label_noise.rate > 0 and str(getattr(ds.label_noise.mode, "value", ds.label_noise.mode)) == "asymmetric" and ds.num_classes != 10:
        raise ConfigError("dataset.label_noise.mode=asymmetric is the CIFAR-10 pair flip; use uniform or exclusive for other datasets")
    for key in ("train_subset", "test_subset", "train_size", "test_size"):
        value = getattr(ds, key, None)
        if value is not None and value < 1:
            raise ConfigError(f"dataset.{key}={value} must be >= 1, or null for the whole split")
    if ds.pad < 0:
        raise ConfigError(f"dataset.pad={ds.pad} must be >= 0 (pixels of reflect padding before the random crop)")
    if len(ds.mean) != ds.in_chans or len(ds.std) != ds.in_chans:
        raise ConfigError(f"dataset.mean/std need {ds.in_chans} values (dataset.in_chans), got {len(ds.mean)}/{len(ds.std)}")


def _validate_sam_family(opt: Any, tr: Any) -> None:
    """Checks of the SAM-variant keys (m-sharpness, ASAM, p, k-step, second order, fp16)."""
    if str(opt.p) not in ("2", "inf", "random"):
        raise ConfigError(f"optimizer.p={opt.p!r} is unknown: use 2, inf or random")
    if opt.m is not None:
        if opt.m < 1 or tr.batch_size % opt.m:
            raise ConfigError(
                f"optimizer.m={opt.m} must be >= 1 and divide trainer.batch_size={tr.batch_size} "
                "(the per-device batch is split into chunks of m examples); pick a divisor or optimizer.m=null"
            )
        if opt.m != tr.batch_size and opt.second_order and str(getattr(opt.m_engine, "value", opt.m_engine)) == "split":
            raise ConfigError("optimizer.m_engine=split cannot take optimizer.second_order (its layers have no double backward): "
                              "use optimizer.m_engine=auto or vmap")
    if opt.eta < 0:
        raise ConfigError(f"optimizer.eta={opt.eta} must be >= 0 (ASAM's η)")
    if opt.ascent_steps < 1:
        raise ConfigError(f"optimizer.ascent_steps={opt.ascent_steps} must be >= 1 (1 = plain SAM)")
    conflict = sam_variant_conflict(opt.adaptive, str(opt.p), opt.ascent_steps, opt.second_order, key="optimizer.")
    if conflict:
        raise ConfigError(conflict)
    if opt.second_order and str(getattr(tr.precision, "value", tr.precision)) == "fp16":
        raise ConfigError("optimizer.second_order needs a double backward without loss scaling: use trainer.precision=bf16 or fp32")
