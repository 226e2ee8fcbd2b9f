"""What a run accounts for: each rank's own random streams, the wall time of every process of a
resumed run, the throughput without the compiling first step, and the ranks stopping together when
rank 0 fails at what it alone does."""

import json
import socket
from types import SimpleNamespace

import pytest
import torch

from sam_bench.engine import checkpoint as ckpt
from sam_bench.engine import trainer
from sam_bench.engine.distributed import DistInfo
from sam_bench.tracking.results import WriteError
from conftest import _cli_forkserver
from test_reliability import TINY, _preempt_here

pytestmark = pytest.mark.usefixtures("restore_torch_globals")


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


# ---------------------------------------------------------------- wall time and throughput over processes


class _FakeClock:
    """``time.perf_counter`` of the trainer, moved only by training steps: the first step of each
    process takes 100 s (compiling), every other one 1 s."""

    def __init__(self):
        self.now, self.steps_this_process = 0.0, 0

    def __call__(self) -> float:
        return self.now

    def new_process(self) -> None:
        self.steps_this_process = 0


@pytest.fixture
def fake_clock(monkeypatch):
    clock = _FakeClock()
    real_step = trainer.train_step

    def step(*args, **kwargs):
        clock.now += 100.0 if clock.steps_this_process == 0 else 1.0
        clock.steps_this_process += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(trainer, "train_step", step)
    return clock


def _images_per_s(run_dir) -> list[float]:
    return [json.loads(line)["images_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_wall_time_and_throughput_count_every_process_of_a_resumed_run(compose_train, tmp_path, monkeypatch, fake_clock):
    """Two processes (preempted after step 8 of 12, then resumed), each compiling in its first step:
    wall_time_s is both processes' (it was the last one's), and images/s (per epoch and in the
    result) leaves out each process's first step (it was 32 x 12 / 210 = 1.8 img/s, not 32)."""
    cfg = compose_train([*TINY, "trainer.epochs=2"])  # 6 steps of 32 images an epoch
    _preempt_here(cfg, tmp_path, 8, monkeypatch)
    assert ckpt.read_checkpoint(tmp_path / ckpt.CHECKPOINT)["wall_time"] == 107.0  # 100 + 7 x 1 s
    fake_clock.new_process()
    result = trainer.fit(cfg, tmp_path)
    assert (result["wall_time_s"], result["wall_time_last_process_s"], result["train_time_s"]) == (210.0, 103.0, 210.0)
    assert (result["images_per_s"], result["first_step_time_s"]) == (32.0, 200.0)
    assert _images_per_s(tmp_path) == [32.0, 32.0]  # epoch 2 holds the second process's first step
    assert json.loads((tmp_path / "result.json").read_text())["wall_time_s"] == 210.0


def test_a_checkpoint_from_before_the_wall_time_resumes_as_one_that_started_there(compose_train, tmp_path, monkeypatch,
                                                                                 fake_clock):
    """A checkpoint written before it recorded the wall time and the first steps resumes; the earlier
    processes count as 0 s, and their first steps are not known to leave out."""
    cfg = compose_train([*TINY, "trainer.epochs=2"])
    _preempt_here(cfg, tmp_path, 8, monkeypatch)
    state = ckpt.read_checkpoint(tmp_path / ckpt.CHECKPOINT)
    old = {k: v for k, v in state.items() if k not in ("wall_time", "first_steps", "first_steps_time", "format", "checksum")}
    old["partial"] = {k: v for k, v in state["partial"].items() if not k.startswith("first_steps")}
    for path in ckpt.checkpoint_files(tmp_path):
        path.unlink()
    ckpt.save_checkpoint(tmp_path, old)
    fake_clock.new_process()
    result = trainer.fit(cfg, tmp_path)
    assert (result["wall_time_s"], result["wall_time_last_process_s"]) == (103.0, 103.0)
    assert result["first_step_time_s"] == 100.0 and result["images_per_s"] == pytest.approx(11 * 32 / 110)


def test_images_per_s_over_one_step_per_process_is_that_step():
    """Nothing left once the first steps are out (one-step epochs, a process that trained one step):
    the figure covers every step rather than none."""
    assert trainer.steady_images_per_s(10, 32, 15.0, 1, 6.0) == 32.0
    assert trainer.steady_images_per_s(1, 32, 2.0, 1, 2.0) == 16.0
    assert trainer.steady_images_per_s(0, 32, 0.0) is None


# ---------------------------------------------------------------- ranks stop together


def _together_rank(rank: int, port: int, fail: bool, results) -> None:
    """One of two gloo ranks: rank 0 fails (when ``fail``) inside stop_together, then both would all-reduce."""
    import torch.distributed as dist

    try:
        from sam_bench.engine.distributed import RankFailed, all_reduce_sum, stop_together

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        info = DistInfo(rank=rank, world_size=2)
        try:
            with stop_together(info, torch.device("cpu")):
                if rank == 0 and fail:
                    raise WriteError("cannot write metrics.jsonl (No space left on device)")
            outcome = f"went on: {int(all_reduce_sum(torch.ones(1), info).item())}"
        except RankFailed as e:
            outcome = f"RankFailed: {e}"
        except WriteError as e:
            outcome = f"WriteError: {e}"
        results.put((rank, outcome))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, repr(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _two_ranks(fail: bool) -> list:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = _cli_forkserver()  # not a fork of the test process (conftest.sam_bench_forked says why)
    results = ctx.Queue()
    procs = [ctx.Process(target=_together_rank, args=(rank, port, fail, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    return got


def test_a_rank_0_failure_stops_every_rank_with_its_line():
    """Rank 0 failed alone (a full disk at its checkpoint or metrics) and raised, while the others went on
    into their next collective: on gloo they died of a closed connection with a traceback, on NCCL they
    waited until torchrun killed them. Now the others learn it at once and raise with rank 0's line."""
    assert _two_ranks(fail=True) == [
        (0, "WriteError: cannot write metrics.jsonl (No space left on device)"),
        (1, "RankFailed: rank 0 stopped the run: cannot write metrics.jsonl (No space left on device)"),
    ]
    assert _two_ranks(fail=False) == [(0, "went on: 2"), (1, "went on: 2")]
