"""Every config composes; typed schemas reject bad values; presets match the paper's data."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from sam_bench.errors import ConfigError
from sam_bench.paths import config_dir
from sam_bench.schema import validate

CONF = Path(config_dir())
PAPER = Path(__file__).resolve().parents[1] / "sam_bench" / "report" / "paper" / "tables.yaml"


def group_options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


@pytest.mark.parametrize("group", ["dataset", "model", "optimizer", "trainer", "experiment"])
def test_every_option_composes_and_validates(compose_train, group):
    # the paper presets (experiment/paper/, 138 of the 139 experiments) are composed, validated and
    # resolved one by one in test_presets.py (test_preset_composes_and_matches_the_paper): composing
    # each a second time here was half a minute of the suite
    for option in group_options(group):
        if group == "experiment" and option.startswith("paper/"):
            continue
        cfg = compose_train([f"{group}={option}"])
        validate(cfg)
        OmegaConf.to_container(cfg, resolve=True)


def test_sgd_has_rho_zero_so_one_sweep_covers_both(compose_train):
    cfg = compose_train(["optimizer=sgd", "optimizer.rho=0.05"])  # the override must not fail
    assert cfg.optimizer.name == "sgd"
    assert compose_train(["optimizer=sgd"]).optimizer.rho == 0.0


def test_validate_rejects_relational_errors(compose_train):
    cfg = compose_train(["optimizer.rho=-0.01"])
    with pytest.raises(ConfigError, match="optimizer.rho"):
        validate(cfg)
    cfg = compose_train(["optimizer.grad_clip=0"])
    with pytest.raises(ConfigError, match="grad_clip"):
        validate(cfg)
    cfg = compose_train(["trainer.compile_mode=fast"])
    with pytest.raises(ConfigError, match="trainer.compile_mode='fast' is unknown: use one of default, reduce-overhead, "):
        validate(cfg)
    for threads in (-1, 0):  # before: -1 a torch traceback, 0 silently torch's default
        with pytest.raises(ConfigError, match=rf"trainer.num_threads={threads} must be >= 1, or null"):
            validate(compose_train([f"trainer.num_threads={threads}"]))
    validate(compose_train(["trainer.num_threads=1"]))


def test_eval_every_is_not_part_of_the_runs_identity():
    """Which epochs are evaluated on the test set changes nothing the run trains (QA: bit-identical
    weights): a run may be resumed with another trainer.eval_every, and such runs group together."""
    from sam_bench.schema import experiment_hash

    base = {"trainer": {"eval_every": 1, "epochs": 10}, "optimizer": {"name": "sam"}, "seed": 0}
    assert experiment_hash(base) == experiment_hash({**base, "trainer": {"eval_every": 5, "epochs": 10}})


def test_run_directory_names_leave_out_only_keys_that_change_nothing(compose_train):
    """A key left out of the run directory's name must be one the run's identity ignores (else two
    experiments would share a directory, the second refused); and the keys one changes to resume a run
    differently (the README: trainer.eval_every; an evaluation batch that ran out of memory) are left
    out, so the same command with another value finds the run (QA: eval_every=2 trained anew elsewhere)."""
    from hydra import compose  # inside compose_train's initialised config directory

    from sam_bench.schema import NON_SEMANTIC_KEYS

    excluded = list(compose(config_name="train", return_hydra_config=True).hydra.job.config.override_dirname.exclude_keys)
    assert {k for k in excluded if not k.startswith("hydra.")} <= set(NON_SEMANTIC_KEYS), excluded
    assert {"trainer.eval_every", "trainer.eval_batch_size", "dataset.download", "trainer.num_threads"} <= set(excluded)


@pytest.mark.parametrize("mode,expected", [("default", None), ("reduce-overhead", "reduce-overhead"),
                                           ("max-autotune", "max-autotune")])
def test_compile_mode_reaches_torch_compile(compose_train, monkeypatch, mode, expected):
    import torch

    from sam_bench.engine import trainer

    cfg = compose_train([f"trainer.compile_mode={mode}"])
    validate(cfg)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: seen.append(kw) or net)
    net = torch.nn.Linear(2, 2)
    assert trainer.compile_model(net, cfg.trainer.compile_mode) is net
    assert seen == [{"mode": expected}]


def paper_row(table: str, model: str) -> dict:
    tables = yaml.safe_load(PAPER.read_text())["tables"]
    return next(r for r in tables[table]["rows"] if r["model"] == model)


@pytest.mark.parametrize("dataset,rho_key", [("cifar10", "rho_cifar10"), ("cifar100", "rho_cifar100")])
def test_table1_wrn_preset_matches_table6(compose_train, dataset, rho_key):
    cfg = compose_train([f"experiment=paper/table1_wrn28_10_200ep_basic_{dataset}"])
    row = paper_row("table_6", "WRN 28-10 (200 epochs)")
    assert cfg.dataset.name == dataset and cfg.dataset.augment == "basic"
    assert cfg.optimizer.lr == float(row["lr"]) and cfg.optimizer.weight_decay == float(row["wd"])
    assert cfg.optimizer.rho == float(row[rho_key])
    assert cfg.model.kwargs.depth == 28 and cfg.model.kwargs.width == 10 and cfg.model.kwargs.dropout == 0.0
    assert cfg.trainer.epochs == 200 and cfg.trainer.batch_size == 256  # row label; App. C.1
    assert cfg.optimizer.nesterov and cfg.optimizer.momentum == 0.9 and cfg.optimizer.grad_clip == 5.0
    assert cfg.optimizer.schedule == "cosine" and cfg.optimizer.warmup_epochs == 0.0


def test_bad_enum_value_is_rejected(compose_train):
    with pytest.raises(Exception, match="bn"):
        compose_train(["optimizer.bn=sometimes"])


def test_run_directory_names_stay_short_and_distinct():
    from sam_bench.cli import MAX_DIRNAME, _sanitize_dirname

    assert _sanitize_dirname("") == "defaults"
    assert _sanitize_dirname("dataset.root=/a/b,seed=1") == "dataset.root=_a_b,seed=1"
    long_a = ",".join(f"key{i}=value{i}" for i in range(60))
    long_b = long_a.replace("value59", "value60")
    a, b = _sanitize_dirname(long_a), _sanitize_dirname(long_b)
    assert len(a.encode()) <= MAX_DIRNAME and len(b.encode()) <= MAX_DIRNAME
    assert a != b and a == _sanitize_dirname(long_a)


def test_keep_epochs_is_checked_against_the_run(compose_train):
    with pytest.raises(ConfigError, match=r"trainer.keep_epochs=\[3\]: \[3\] outside 1..trainer.epochs=2"):
        validate(compose_train(["trainer.epochs=2", "trainer.keep_epochs=[3]"]))
    with pytest.raises(ConfigError, match="trainer.checkpoint=false"):
        validate(compose_train(["trainer.epochs=2", "trainer.keep_epochs=[1]", "trainer.checkpoint=false"]))
    validate(compose_train(["trainer.epochs=2", "trainer.keep_epochs=[1,2]"]))


def test_compute_changes_concern_the_configs_they_changed():
    """A checkpoint's compute_version is compared only through the changes that concern its config:
    AutoAugment and the streamed datasets changed in 4, SGD with m or ranks in 3, every model in 2."""
    from sam_bench.data import STREAMED
    from sam_bench.schema import STREAMED_DATASETS, compute_changes, computed_as

    assert set(STREAMED_DATASETS) == set(STREAMED)
    sam_cifar = {"optimizer": {"name": "sam", "rho": 0.05, "m": 32}, "dataset": {"name": "cifar10"}, "trainer": {"batch_size": 256}}
    sgd_m = {**sam_cifar, "optimizer": {"name": "sgd", "rho": 0.0, "m": 32}}
    sgd_ranks = {**sam_cifar, "optimizer": {"name": "sgd", "rho": 0.0, "m": None}, "ranks": 8}
    aa = {**sam_cifar, "dataset": {"name": "cifar10", "autoaugment": "cifar10"}}
    flowers = {**sam_cifar, "dataset": {"name": "flowers102"}}
    assert compute_changes(sam_cifar, since=2) == [] and len(compute_changes(sam_cifar, since=1)) == 1
    assert [len(compute_changes(c, since=2)) for c in (sgd_m, sgd_ranks, aa, flowers)] == [1, 1, 1, 1]
    assert compute_changes({**sgd_m, "optimizer": {"name": "sgd", "rho": 0.0, "m": 256}}, since=2) == []  # m = batch
    assert [computed_as(c, None) for c in (sam_cifar, sgd_m, aa)] == [2, 2, 2]
    assert [computed_as(c, 4) for c in (sam_cifar, sgd_m, aa)] == [2, 3, 4]


def test_a_key_added_with_plus_must_be_a_schema_key(compose_train):
    """``+key=value`` adds a key Hydra does not check: a misspelt one trained with the default (QA:
    ``+optimizer.rhoo=0.1`` ran with ρ = 0.05). Only free-form dicts (``model.kwargs``, passed to timm) take new keys."""
    for overrides, message in [(["+optimizer.rhoo=0.1"], "optimizer.rhoo is not a key of the config .*did you mean optimizer.rho\\?"),
                               (["+trainer.epochz=3"], "trainer.epochz .*did you mean trainer.epochs\\?"),
                               (["+seeed=1"], "seeed .*did you mean seed\\?"),
                               (["+dataset.label_noise.rat=0.2"], "dataset.label_noise.rat .*did you mean dataset.label_noise.rate\\?"),
                               (["+nosuchkey=1"], "nosuchkey is not a key of the config .*; `sam-bench train --help` lists every key")]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_train(overrides))
    validate(compose_train(["+model.kwargs.pretrained_cfg_overlay.file=/x.pth", "+model.kwargs.drop_rate=0.1"]))


@pytest.mark.parametrize("subdir, refused", [("cfg", True), (".hydra", False), ("null", False)])
def test_a_custom_hydra_output_subdir_is_refused(compose_train, subdir, refused):
    """The report and the run-directory checks read a run's record in .hydra/: another name would
    leave a refused command's files in another run's record for good."""
    from hydra import compose  # inside compose_train's initialised config directory

    cfg = compose(config_name="train", overrides=[f"hydra.output_subdir={subdir}"], return_hydra_config=True)
    if refused:
        with pytest.raises(ConfigError, match=r"hydra.output_subdir=cfg is not supported: .*hydra.output_subdir=null"):
            validate(cfg)
    else:
        validate(cfg)
