"""What a run accounts for: each rank's own random streams."""


import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sam_bench.cli import _register
from sam_bench.engine import trainer
from sam_bench.engine.distributed import DistInfo
from sam_bench.paths import config_dir
from test_reliability import TINY


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """fit() sets the thread count and deterministic mode process-wide; keep them local to a test."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def compose_train():
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield lambda overrides=(): compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()


# ---------------------------------------------------------------- per-rank seeds


def _rank_seeds(compose_train, seed: int, rank: int) -> tuple[int, int]:
    """The global RNG's seed and SAM's generator seed that rank ``rank`` of a 2-rank run of ``seed`` starts from."""
    cfg = compose_train([*TINY, f"seed={seed}"])
    info = DistInfo(rank=rank, world_size=2)
    run = trainer._build_run(cfg, trainer._run_config(cfg, info)[0], torch.device("cpu"), info)
    return torch.initial_seed(), run.optimizer.seed


def test_no_rank_of_one_run_draws_what_a_rank_of_another_seed_draws(compose_train):
    """``seed + rank`` gave run seed 0's rank 1 the dropout and augmentation draws of run seed 1's
    rank 0. Rank 0 keeps the seed itself (a single process draws as before, resumes bit-exactly)."""
    seeds = {(seed, rank): _rank_seeds(compose_train, seed, rank) for seed in (0, 1, 2) for rank in (0, 1, 2)}
    assert all(seeds[seed, 0] == (seed, seed) for seed in (0, 1, 2))
    assert len({global_seed for global_seed, _ in seeds.values()}) == len(seeds)  # no two (seed, rank) share a stream
    assert all(global_seed == sam_seed for global_seed, sam_seed in seeds.values())  # one derivation for both, as rank 0
