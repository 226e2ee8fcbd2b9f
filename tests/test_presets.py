"""Every paper preset composes, and its hyperparameters equal the paper's data for the cell it cites.

The expected values are read from sam_bench/report/paper/tables.yaml (the paper's numbers as data),
not from the presets, so a preset cannot drift from the table row it names.
"""

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from sam_bench.cli import _register
from sam_bench.data import STREAMED
from sam_bench.paths import config_dir
from sam_bench.report.paper import FINETUNE_DATASETS, layouts, paper_tables
from sam_bench.schema import method_label, validate

PRESETS = Path(config_dir()) / "experiment" / "paper"
FILES = sorted(PRESETS.glob("*.yaml"))
T = paper_tables()
LAYOUT_KEYS = {c.key for layout in layouts() for _, cells in layout.rows for c in cells if c.key}
FIGS = yaml.safe_load((Path(__file__).resolve().parents[1] / "sam_bench" / "report" / "paper" / "tables.yaml").read_text())["figures_with_numbers"]

# Table 1 row slug -> (Table 6 row per dataset, conf/model choice, epochs). Epochs of Shake-Shake and
# PyramidNet are not printed: 1800 is the documented choice (Cubuk et al. 2018, recipes.md §3.1).
TABLE1 = {
    "wrn28_10_200ep": ({"cifar10": "WRN 28-10 (200 epochs)", "cifar100": "WRN 28-10 (200 epochs)"}, "wrn", 200),
    "wrn28_10_1800ep": ({"cifar10": "WRN 28-10 (1800 epochs)", "cifar100": "WRN 28-10 (1800 epochs)"}, "wrn", 1800),
    "shake_shake_26_2x96d": ({"cifar10": "WRN 26-2x6 ShakeShake", "cifar100": "WRN 26-2x6 ShakeShake"}, "shake_shake_26_2x96d", 1800),
    "pyramidnet": ({"cifar10": "Pyramid vanilla", "cifar100": "Pyramid vanilla"}, "pyramidnet", 1800),
    "pyramidnet272_shakedrop": ({"cifar10": "Pyramid ShakeDrop (CIFAR-10)", "cifar100": "Pyramid ShakeDrop (CIFAR-100)"}, "pyramidnet272_shakedrop", 1800),
}
# Images in the training split each finetuning preset assumes (to check its step budget).
TRAIN_IMAGES = {"fgvc_aircraft": 6667, "flowers102": 2040, "oxford_pets": 3680, "stanford_cars": 8144, "cifar10": 50000, "cifar100": 50000, "food101": 75750}


def num(text: str) -> float:
    """First number of a printed setting such as '1.0 initial, cosine schedule'."""
    return float(re.match(r"[0-9.eE+-]+", str(text).strip()).group().rstrip("."))


def table6(row: str) -> dict:
    return next(r for r in T["table_6"]["rows"] if r["model"] == row)


CIFAR_BATCH = int(num(T["table_1"]["setup"]["batch_size"]))  # 256 (App. C.1)
CIFAR_M = CIFAR_BATCH // 8  # 8 V100s, unsynced perturbations (Sec. 3.1)


def augmentation(aug: str, policy: str = "cifar10") -> dict:
    if aug == "basic":
        return {"dataset.augment": "basic", "dataset.cutout": None, "dataset.autoaugment": None}
    if aug == "cutout":
        return {"dataset.augment": "basic", "dataset.cutout": 16, "dataset.autoaugment": None}
    return {"dataset.augment": "basic", "dataset.autoaugment": policy}


def expected(name: str) -> dict:
    """Dotted key -> value the preset named ``name`` must compose to ('choice.X' = the group option)."""
    base, _, variant = name.partition("@")
    parts = base.split("/")
    table = parts[0]
    if table in ("table1", "table9"):
        slug, aug, ds = parts[1:]
        t6row, model, epochs = TABLE1[slug]
        h = table6(t6row[ds])
        exp = {"choice.dataset": ds, "choice.model": model, "optimizer.lr": num(h["lr"]), "optimizer.weight_decay": num(h["wd"]),
               "trainer.batch_size": CIFAR_BATCH, "optimizer.m": CIFAR_M, "trainer.epochs": epochs, **augmentation(aug)}
        if variant == "sgd2x":
            exp.update({"choice.optimizer": "sgd", "trainer.epochs": 2 * epochs})
        else:
            exp["optimizer.rho"] = 0.05 if table == "table9" else num(h[f"rho_{ds}"])
        return exp
    if table == "table2":
        s = T["table_2"]["setup"]
        model, epochs = parts[1], int(parts[2].removesuffix("ep"))
        assert epochs in [int(e) for e in s["epochs"]]
        return {"choice.dataset": "imagenet", "choice.model": model, "trainer.epochs": epochs, "trainer.batch_size": int(num(s["batch_size"])),
                "optimizer.lr": num(s["lr"]), "trainer.label_smoothing": num(s["label_smoothing"]), "optimizer.weight_decay": num(s["weight_decay"]),
                "optimizer.rho": num(s["rho"]), "optimizer.m": int(num(s["batch_size"])) // 32}
    if table == "table3":
        s = T["table_3"]["setup"]
        ds, key = parts[1:]
        h = s[key]
        exp = {"choice.dataset": ds, "choice.model": f"efficientnet_{key}", "optimizer.weight_decay": num(s["weight_decay"]),
               "trainer.batch_size": int(h["batch_size"]), "optimizer.lr": num(h["lr"]), "optimizer.bn": "frozen", "optimizer.rho": 0.05,
               "optimizer.m": int(h["batch_size"]) // int(h["hardware"].split()[1])}
        if ds == "imagenet":
            exp.update({"trainer.epochs": 10, "optimizer.lr": 0.1})  # "10 epochs from checkpoint, lr 0.1, rho 0.05"
            assert "10 epochs" in s["imagenet_finetune"] and "lr 0.1" in s["imagenet_finetune"]
        else:
            steps = 5000 if key == "b7" else 10000  # b7: "5k"; L2: "adjusted accordingly" -> same epochs at half the batch
            exp["steps"] = (steps, TRAIN_IMAGES[ds])
        if ds.startswith("cifar"):
            exp["dataset.autoaugment"] = "cifar10"  # "CIFAR: same AutoAugment policy as the from-scratch experiments"
        return exp
    if table == "table4":
        noise = int(parts[2].removeprefix("noise"))
        assert "0.1 for noise 20/40/60%; 0.05 for 80%" in T["table_4"]["setup"]["rho"]
        return {"choice.dataset": "cifar10_noisy", "choice.model": "resnet32", "trainer.epochs": int(num(T["table_4"]["setup"]["epochs"])),
                "dataset.label_noise.rate": noise / 100, "optimizer.rho": 0.05 if noise == 80 else 0.1,
                "trainer.batch_size": CIFAR_BATCH, "optimizer.m": CIFAR_M}
    if table == "table5":
        model, aug, ds = parts[1:]
        t7 = next(r for r in T["table_7"]["rows"] if r["dataset"] == {"svhn": "SVHN", "fashion_mnist": "Fashion-MNIST"}[ds]
                  and r["model"] == {"wrn28_10": "WRN", "shake_shake_26_2x96d": "ShakeShake"}[model])
        exp = {"choice.dataset": ds, "choice.model": "wrn" if model == "wrn28_10" else model, "optimizer.lr": num(t7["lr"]),
               "optimizer.weight_decay": num(t7["wd"]), "optimizer.rho": num(t7["rho"]), "trainer.batch_size": CIFAR_BATCH}
        if aug == "basic":
            exp.update(augmentation("basic"))
        elif ds == "svhn":  # "best AutoAugment SVHN policy + cutout"
            exp.update({"dataset.autoaugment": "svhn", "dataset.cutout": 16})
        else:  # "'Auto augment' line = cutout only"
            exp.update({"dataset.autoaugment": None, "dataset.cutout": 16})
        return exp
    if table == "table11":
        k, ds = int(parts[1].removeprefix("k")), parts[2]
        assert str(k) in [r["steps"] for r in T["table_11"]["rows"]]
        h = table6("WRN 28-10 (200 epochs)")
        return {"choice.dataset": ds, "choice.model": "wrn", "optimizer.ascent_steps": k, "optimizer.rho": num(h[f"rho_{ds}"]),
                "optimizer.lr": num(h["lr"]), "optimizer.weight_decay": num(h["wd"]), "trainer.epochs": 200, "trainer.final_sharpness": True,
                "trainer.batch_size": CIFAR_BATCH, "optimizer.m": CIFAR_M, **augmentation("basic")}
    if table == "fig3":
        fig = FIGS["figure_3_middle_m_sharpness"]
        return {"choice.dataset": "cifar10", "sweep.optimizer.m": [int(m) for m in fig["m_values"]], "dataset.val_size": 5000}
    h = table6("WRN 28-10 (200 epochs)")  # Figs. 4-6: "WideResNet" on CIFAR-10, hyperparameters not printed
    common = {"choice.dataset": "cifar10", "choice.model": "wrn", "optimizer.lr": num(h["lr"]), "optimizer.weight_decay": num(h["wd"]),
              "optimizer.rho": num(h["rho_cifar10"]), "trainer.epochs": 200, "trainer.batch_size": CIFAR_BATCH, **augmentation("basic")}
    if table == "fig4":
        setup = FIGS["figure_4_5_second_order_ablation"]["setup"]
        depth, width = map(int, re.search(r"WideResNet-(\d+)x(\d+)", setup).groups())
        assert "~40k steps" in setup
        return {**common, "model.kwargs.depth": depth, "model.kwargs.width": width, "optimizer.m": CIFAR_M,
                "optimizer.diagnostics": True, "steps": (40000, 50000), "sweep.optimizer.second_order": ["false", "true"]}
    if table == "fig6":
        setup = FIGS["figure_6_p_norm"]["setup"]
        low, high = (int(e) for e in re.search(r"log axis 1e(-?\d+)\.\.1e(-?\d+)", setup).groups())
        assert "||ε||∞=ρ" in setup and "random Gaussian" in setup
        return {**common, "model.kwargs.depth": 28, "model.kwargs.width": 10, "optimizer.m": CIFAR_M,
                "sweep.optimizer.p": ["2", "inf", "random"], "sweep.optimizer.rho": [10.0**e for e in range(low, high + 1)]}
    raise AssertionError(f"{name}: no paper table {table}")


def get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.fixture(scope="module")
def compose_preset():
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield lambda stem: compose(config_name="train", overrides=[f"experiment=paper/{stem}"], return_hydra_config=True)
    GlobalHydra.instance().clear()


def preset_name(path: Path) -> str:
    return yaml.safe_load(path.read_text())["name"]


def test_every_preset_is_named_after_its_cell_and_cites_it():
    assert len(FILES) > 100
    assert sorted(PRESETS.rglob("*.yaml")) == FILES  # none in a sub-folder, where the per-preset test would miss it
    for path in FILES:
        text = path.read_text()
        name = preset_name(path)
        assert text.startswith("# @package _global_\n"), path.name
        assert path.stem == name.replace("/", "_").replace("@", "_"), path.name
        table = name.split("/")[0]
        cite = f"Paper Table {table.removeprefix('table')}" if table.startswith("table") else f"Paper Fig. {table.removeprefix('fig')}"
        assert cite in text, f"{path.name} does not cite '{cite}'"
        assert "defaults:\n  - override /dataset:" in text, path.name


def test_every_paper_cell_with_runs_has_a_preset():
    names = {preset_name(p) for p in FILES}
    bases = {n.partition("@")[0] for n in names}
    missing = []
    for layout in layouts():
        for _, cells in layout.rows:
            for cell in cells:
                if cell.key is None:
                    continue
                name, _, method = cell.key.partition("@")
                ok = (name in bases) if method.partition("+")[0] in ("sam", "sgd") else (cell.key in names)
                if not ok and "/birdsnap/" not in name:  # Birdsnap: no public loader, no dataset choice
                    missing.append(cell.key)
    assert not missing
    assert FINETUNE_DATASETS["Birdsnap"] == "birdsnap"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_preset_composes_and_matches_the_paper(compose_preset, path):
    cfg = compose_preset(path.stem)
    validate(cfg)
    # the job's config as `compose(return_hydra_config=False)` and the trainer see it: valid, and every
    # interpolation resolves (the check test_config.py makes of the other experiments)
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    validate(job)
    OmegaConf.to_container(job, resolve=True)
    name = cfg.name
    assert name == preset_name(path)
    choices = cfg.hydra.runtime.choices
    for key, want in expected(name).items():
        if key.startswith("choice."):
            got = choices[key.removeprefix("choice.")]
        elif key == "steps":
            steps, n = want
            got_steps = cfg.trainer.epochs * (n // cfg.trainer.batch_size)  # training drops the last partial batch
            assert abs(got_steps - steps) / steps < (0.03 if name.startswith("fig4/") else 0.02), (name, got_steps, steps)  # "~40k"
            continue
        elif key.startswith("sweep."):
            kind = type(want[0])
            got = [kind(v) for v in str(cfg.hydra.sweeper.params[key.removeprefix("sweep.")]).split(",")]
            if kind is float:
                assert got == pytest.approx(want, rel=1e-12), (name, key, got, want)
                continue
        else:
            got = get(cfg, key)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12), (name, key, got, want)
        else:
            assert got == want, (name, key, got, want)
    if cfg.dataset.name in STREAMED:  # evaluation: resize to image_size + 32, centre crop (no zero padding at 600 px)
        assert cfg.dataset.resize == cfg.dataset.image_size + 32, (name, cfg.dataset.resize, cfg.dataset.image_size)
    if not name.endswith("@sgd2x") and not name.startswith(("table2/", "table3/")):
        assert cfg.optimizer.grad_clip == 5.0 and cfg.optimizer.nesterov and cfg.optimizer.warmup_epochs == 0.0  # official code
    # the cell its runs fill, <name>@<method> as the report keys it, is one the paper's tables print
    key = name if "@" in name else f"{name}@{method_label(cfg.optimizer)}"
    if not name.startswith("fig") and "/birdsnap/" not in name:  # the figures print no numbers (no cell)
        assert key in LAYOUT_KEYS, (path.name, key)


def test_an_experiment_sets_name_and_seed_over_train_yaml(compose_preset):
    # train.yaml lists _self_ before `experiment`, so a preset's name (the report's cell key) survives.
    from hydra import compose

    cfg = compose(config_name="train", overrides=["experiment=fmnist_quickstart"])
    assert cfg.name == "fmnist_quickstart"
