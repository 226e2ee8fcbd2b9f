"""Reliability: verified checkpoints, preemption, non-finite detection, the run lock, fault injection
and one clear line for every bad input."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import _cli_forkserver, fit_forked, sam_bench_cmd, sam_bench_forked
from sam_bench.cli import _register
from sam_bench.engine import checkpoint as ckpt
from sam_bench.engine.rundir import ensure_writable, run_lock
from sam_bench.engine.signals import PREEMPTED_EXIT_CODE, Preempted, PreemptionHandler
from sam_bench.engine.step import train_step
from sam_bench.engine.trainer import FiniteGuard, fit
from sam_bench.errors import CheckpointError, ConfigError, TrainingDiverged
from sam_bench.paths import config_dir
from sam_bench.schema import validate
from sam_bench.tracking.results import WriteError

pytestmark = pytest.mark.usefixtures("restore_torch_globals")

TINY = [
    "dataset=synthetic",
    "dataset.train_size=192",
    "dataset.test_size=64",
    "model=wrn",
    "model.kwargs.depth=10",
    "model.kwargs.width=1",
    "model.kwargs.dropout=0.1",  # the forward draws random numbers: RNG state must survive a kill
    "trainer.batch_size=32",
    "trainer.eval_batch_size=64",
    "trainer.epochs=3",
    "trainer.progress=false",
    "trainer.num_threads=1",
    "trainer.deterministic=true",
    "trainer.log_every_steps=4",
]
TIMING_KEYS = ("epoch_time_s", "images_per_s")


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "epoch": step // 10, "step": step, "model": {"w": torch.randn(64, 64, generator=g)},
        "optimizer": {}, "rng": {}, "history": [], "config_hash": "x",
    }


# ---------------------------------------------------------------- checkpoint verification


def test_checksum_catches_a_flipped_byte_that_torch_load_accepts(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(10))
    ckpt.save_checkpoint(tmp_path, _state(20))
    newest = tmp_path / ckpt.CHECKPOINT
    data = bytearray(newest.read_bytes())
    weights = _state(20)["model"]["w"].numpy().tobytes()
    at = bytes(data).index(weights[:64]) + 100  # inside the tensor data
    data[at] ^= 0x01
    newest.write_bytes(bytes(data))
    damaged = torch.load(newest, weights_only=True)  # torch itself does not notice ...
    assert not torch.equal(damaged["model"]["w"], _state(20)["model"]["w"])
    with pytest.raises(ValueError, match="checksum mismatch"):  # ... the stored digest does
        ckpt.read_checkpoint(newest)
    state, path = ckpt.load_checkpoint(tmp_path)
    assert path.name == ckpt.PREVIOUS and state["step"] == 10
    assert torch.equal(state["model"]["w"], _state(10)["model"]["w"])


def test_truncated_checkpoint_falls_back_and_all_bad_is_an_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(10))
    ckpt.save_checkpoint(tmp_path, _state(20))
    newest = tmp_path / ckpt.CHECKPOINT
    newest.write_bytes(newest.read_bytes()[:5000])
    assert ckpt.load_checkpoint(tmp_path)[0]["step"] == 10
    (tmp_path / ckpt.PREVIOUS).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint in .*Delete the run directory"):
        ckpt.load_checkpoint(tmp_path)


def test_crash_between_renames_keeps_the_newest(tmp_path):
    """Killed after newest -> .prev and before next -> newest: the next file is picked up."""
    ckpt.save_checkpoint(tmp_path, _state(10))
    ckpt.save_checkpoint(tmp_path, _state(20))
    os.replace(tmp_path / ckpt.CHECKPOINT, tmp_path / ckpt.PREVIOUS)
    ckpt._write_atomic(tmp_path / ckpt.NEXT, (tmp_path / ckpt.PREVIOUS).read_bytes())
    (tmp_path / ckpt.PREVIOUS).write_bytes(b"")  # and the previous is damaged too
    assert ckpt.load_checkpoint(tmp_path)[0]["step"] == 20


def test_stale_temporaries_are_removed_and_finished_checkpoints_kept(tmp_path):
    """A process killed mid-write leaves ``<name>.<pid>.tmp``: of the rotating checkpoint and of a
    kept per-epoch copy. The next run removes both, and nothing whole."""
    ckpt.save_checkpoint(tmp_path, _state(10), keep_as=ckpt.kept_name(1))
    stale = [tmp_path / f"{ckpt.NEXT}.999.tmp", tmp_path / f"{ckpt.kept_name(2)}.999.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    whole = sorted(p.name for p in tmp_path.iterdir() if p not in stale)
    assert ckpt.kept_name(1) in whole and ckpt.CHECKPOINT in whole
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == whole
    assert ckpt.read_checkpoint(tmp_path / ckpt.kept_name(1))["step"] == 10


# ---------------------------------------------------------------- signals, lock, non-finite


def test_preemption_handler_sets_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as h:
        assert not h.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert h.requested and h.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2) and PREEMPTED_EXIT_CODE < 124


def test_run_lock_is_exclusive_and_released(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(ConfigError, match=rf"in use by another sam-bench process \(pid {os.getpid()}\)"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released on exit
        pass


def test_unwritable_output_directory_is_a_config_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"is not writable \(Not a directory\); choose a writable place with hydra.run.dir"):
        ensure_writable(blocker / "run")


def test_finite_guard_names_the_first_bad_step():
    guard = FiniteGuard(torch.device("cpu"))
    guard.checked_step = 100
    guard.last_checkpoint = "run/checkpoint.pt, step 100"
    for loss in (1.0, 2.0):
        guard.update(torch.tensor(loss))
    guard.check(102, 3)  # fine so far
    for loss in (1.0, float("nan"), 1.0, float("inf")):
        guard.update(torch.tensor(loss))
    with pytest.raises(TrainingDiverged, match=r"at step 104 \(epoch 4\).*\(run/checkpoint.pt, step 100\)"):
        guard.check(106, 3)
    grad_guard = FiniteGuard(torch.device("cpu"))
    grad_guard.update(torch.tensor(1.0), torch.tensor(float("inf")))  # a finite loss, an infinite gradient norm
    with pytest.raises(TrainingDiverged, match="at step 1 "):
        grad_guard.check(1, 0)


def test_the_finite_check_reads_the_progress_bars_loss_in_its_one_sync(monkeypatch):
    guard = FiniteGuard(torch.device("cpu"))
    guard.update(torch.tensor(1.0))
    syncs = []
    for name in ("tolist", "item", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: syncs.append(_n) or _o(self))
    assert guard.check(4, 0, extra=torch.tensor(0.25)) == [0.25]
    monkeypatch.undo()
    assert syncs == ["tolist"]


def _sam_after_steps(steps: int):
    """A tiny model's SAM (diagnostics on) after ``steps`` steps on one fixed batch."""
    from sam_bench.optim import SAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, diagnostics=True)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
    return opt


def test_a_log_interval_reads_the_check_the_loss_and_the_sam_diagnostics_in_one_sync(monkeypatch):
    """The log interval's one host sync carries the finite check, the progress bar's loss and SAM's
    diagnostic sums (they had a sync of their own); the means are read_diagnostics' and the next
    interval's sums start from zero."""
    from sam_bench.engine.trainer import _read_log_interval

    want = _sam_after_steps(3).read_diagnostics()
    assert set(want) == {"sam/grad_norm", "sam/eps_norm", "sam/loss_gap", "sam/cosine"} and want["sam/grad_norm"] > 0
    for guard in (FiniteGuard(torch.device("cpu")), None):
        opt = _sam_after_steps(3)
        if guard is not None:
            guard.update(torch.tensor(1.0))
        syncs = []
        for name in ("tolist", "item", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: syncs.append(_n) or _o(self))
        running, sums = _read_log_interval(guard, 4, 0, torch.tensor(0.25), opt.take_diagnostics())
        monkeypatch.undo()
        assert syncs == ["tolist"] and running == 0.25
        assert opt.diagnostics_means(sums) == want
        assert opt.read_diagnostics() == {}
    assert _read_log_interval(None, 4, 0, None, None) == (None, None)


def test_a_divergence_says_whether_it_is_recorded_already_and_keeps_it_when_pickled():
    import pickle

    again = pickle.loads(pickle.dumps(TrainingDiverged("diverged here before", recorded=True)))
    assert again.recorded and str(again) == "diverged here before" and not TrainingDiverged("x").recorded


def _guard_rank(rank: int, port: int, results) -> None:
    """One of two gloo ranks: rank 1 asks to stop by step 2, and its loss goes NaN at step 3."""
    import torch.distributed as dist

    from sam_bench.engine.distributed import DistInfo

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        guard = FiniteGuard(torch.device("cpu"), DistInfo(rank=rank, world_size=2), stop_requested=lambda: rank == 1)
        for step in (1, 2):
            guard.update(torch.tensor(1.0))
        guard.check(2, 0)
        stop = guard.stop
        for step in (3, 4):
            guard.update(torch.tensor(float("nan") if rank == 1 and step == 3 else 1.0))
        try:
            guard.check(4, 0)
            error = None
        except TrainingDiverged as e:
            error = str(e).split(";")[0]
        results.put((rank, stop, error))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, None, repr(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_ranks_agree_on_a_divergence_and_a_stop_request():
    """Under torchrun the finite check looked at its own rank: a rank that diverged alone raised alone
    (the others waited in their next collective) and wrote no divergence record unless it was rank 0
    (QA). Now one all-reduce, which also carries the preemption flag, makes every rank raise."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = _cli_forkserver()  # not a fork of the test process (conftest.sam_bench_forked says why)
    results = ctx.Queue()
    procs = [ctx.Process(target=_guard_rank, args=(rank, port, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert got == [(rank, True, "non-finite training loss or gradient at step 3 (epoch 1)") for rank in (0, 1)]


# ---------------------------------------------------------------- fault injection (in forked children)


def _run_child(cfg, run_dir: Path, fault: str | None = None) -> int:
    """fit() in a pre-imported child (conftest.fit_forked), optionally dying at a fault point."""
    return fit_forked(cfg, run_dir, fault)


def _preempt_here(cfg, run_dir: Path, step: int, monkeypatch) -> None:
    """fit() in this process, preempted (SIGTERM) after ``step`` steps: for a test whose monkeypatches
    must reach the run, which they would not in a pre-imported child (:func:`_run_child`)."""
    from collections import Counter

    from sam_bench.engine import faults

    monkeypatch.setattr(faults, "_reached", Counter())
    monkeypatch.setenv(faults.ENV, f"step@{step}:TERM")
    with pytest.raises(Preempted):
        fit(cfg, run_dir)
    monkeypatch.delenv(faults.ENV)


@pytest.fixture(scope="module")
def clean_tiny(tmp_path_factory) -> Path:
    """The uninterrupted run of TINY (3 epochs), which tests that kill a run of TINY end equal to:
    trained once for the module (tests only read it)."""
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(TINY))
    GlobalHydra.instance().clear()
    run_dir = tmp_path_factory.mktemp("clean_tiny") / "clean"
    assert _run_child(cfg, run_dir) == 0
    return run_dir


def _newest_step(run_dir: Path) -> int:
    """Every checkpoint file on disk must verify; returns the most advanced step (0 if none)."""
    steps = [ckpt.read_checkpoint(p)["step"] for p in ckpt.checkpoint_files(run_dir)]
    return max(steps, default=0)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_killed_anywhere_resumes_bit_exactly(compose_train, tmp_path):
    """SIGKILL at random steps, inside checkpoint writes, and a SIGTERM preemption: the run
    re-run until done ends with the uninterrupted run's weights, optimizer state and metrics."""
    cfg = compose_train([*TINY, "trainer.checkpoint_every_steps=2"])  # 6 steps/epoch, 18 in all
    assert _run_child(cfg, tmp_path / "clean") == 0

    rng = random.Random(8)
    faults = [
        f"step@{rng.randint(1, 5)}",
        "checkpoint_partial@1",  # half a temporary file on disk
        f"step@{rng.randint(3, 7)}",
        "checkpoint_written@2",  # next file complete, not rotated in
        "checkpoint_rotated@1",  # newest renamed to .prev, next not yet renamed: no checkpoint.pt
        f"step@{rng.randint(1, 4)}:TERM",  # preemption: finish the step, checkpoint, exit 75
        f"step@{rng.randint(1, 4)}",
    ]
    victim, progress = tmp_path / "victim", []
    for fault in faults:
        code = _run_child(cfg, victim, fault)
        assert code == (PREEMPTED_EXIT_CODE if fault.endswith(":TERM") else -signal.SIGKILL), (fault, code)
        assert not (victim / "result.json").exists()
        progress.append(_newest_step(victim))  # never an unreadable checkpoint
    first_kill = int(faults[0].split("@")[1])
    assert progress[0] == 2 * ((first_kill - 1) // 2), (faults[0], progress)  # the mid-epoch checkpoints
    assert progress == sorted(progress) and 0 < progress[-1] < 18, progress
    assert _run_child(cfg, victim) == 0
    assert not list(victim.glob(".checkpoint.next.pt.*.tmp"))  # half-written temporaries were cleaned up

    clean, again = (json.loads((d / "result.json").read_text()) for d in (tmp_path / "clean", victim))
    assert (again["final_test_error"], again["final_test_loss"], again["steps"]) == \
        (clean["final_test_error"], clean["final_test_loss"], clean["steps"])
    assert _metrics(victim) == _metrics(tmp_path / "clean")
    a, b = (ckpt.read_checkpoint(d / ckpt.CHECKPOINT) for d in (tmp_path / "clean", victim))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    momenta = [(s["momentum_buffer"], t["momentum_buffer"]) for s, t in zip(
        a["optimizer"]["base_optimizer"]["state"].values(), b["optimizer"]["base_optimizer"]["state"].values())]
    assert momenta and all(torch.equal(x, y) for x, y in momenta)


@pytest.mark.parametrize("fault", ["checkpoint_written@3", "checkpoint_rotated@3"])
def test_killed_in_the_last_checkpoint_finishes_with_every_epoch_recorded(compose_train, tmp_path, fault, clean_tiny):
    """Killed while the final epoch's checkpoint is rotated in: the re-run finds the training done,
    completes the rotation, and writes metrics.jsonl (it still lacked that epoch) and the result."""
    cfg = compose_train(TINY)  # 3 epochs: the third checkpoint write is the last
    assert _run_child(cfg, tmp_path / "victim", fault) == -signal.SIGKILL
    assert len(_metrics(tmp_path / "victim")) == 2
    assert _run_child(cfg, tmp_path / "victim") == 0
    assert _metrics(tmp_path / "victim") == _metrics(clean_tiny)
    assert json.loads((tmp_path / "victim" / "result.json").read_text())["final_test_loss"] == \
        json.loads((clean_tiny / "result.json").read_text())["final_test_loss"]
    files = {p.name: ckpt.read_checkpoint(p)["epoch"] for p in ckpt.checkpoint_files(tmp_path / "victim")}
    assert files == {ckpt.CHECKPOINT: 3, ckpt.PREVIOUS: 2}  # as an uninterrupted run leaves them


def test_preempted_during_the_epoch_end_checkpoint_keeps_the_previous_epoch(compose_train, tmp_path):
    """SIGTERM while epoch 2's checkpoint is written: that checkpoint is the one the run stops with;
    it is not written a second time, which would turn epoch 1's fallback into a copy of it."""
    cfg = compose_train([*TINY, "trainer.keep_epochs=[2]"])
    assert _run_child(cfg, tmp_path, "checkpoint_written@2:TERM") == PREEMPTED_EXIT_CODE
    files = {p.name: ckpt.read_checkpoint(p)["epoch"] for p in ckpt.checkpoint_files(tmp_path)}
    assert files == {ckpt.CHECKPOINT: 2, ckpt.PREVIOUS: 1}
    assert ckpt.read_checkpoint(tmp_path / ckpt.kept_name(2))["epoch"] == 2


@pytest.mark.parametrize("poison, message", [
    ("loss", r"non-finite training loss or gradient at step 3 \(epoch 1\)"),
    # a BatchNorm running mean: train-mode forwards never read it, so the loss stays finite and only
    # the check of the weights and buffers before the write can see it
    ("buffer", r"non-finite weights after step 4 \(epoch 1\)"),
])
def test_nonfinite_state_is_never_checkpointed(compose_train, tmp_path, monkeypatch, poison, message):
    """A run whose loss, or only a buffer, goes non-finite at step 3, between the checkpoints of steps
    2 and 4: it stops with TrainingDiverged naming the step and the last good checkpoint, and the
    files on disk are step 2's, all finite (the checkpoint of step 4 would hold the bad state)."""
    import sam_bench.engine.trainer as trainer_module

    steps = []

    def poisoned_step(model, *args, **kwargs):
        loss, logits = train_step(model, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            if poison == "buffer":
                next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean.fill_(float("inf"))
            else:
                loss = loss * float("nan")
        return loss, logits

    monkeypatch.setattr(trainer_module, "train_step", poisoned_step)
    cfg = compose_train([*TINY, "trainer.checkpoint_every_steps=2", "trainer.log_every_steps=1000"])
    with pytest.raises(TrainingDiverged, match=message + r".*checkpoint.pt, step 2\b"):
        fit(cfg, tmp_path)
    files = ckpt.checkpoint_files(tmp_path)
    assert files and _newest_step(tmp_path) == 2
    for path in files:
        state = ckpt.read_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_changed_training_labels_refuse_to_resume(compose_train, tmp_path):
    cfg = compose_train([*TINY, "trainer.epochs=1"])
    assert _run_child(cfg, tmp_path, "step@3:TERM") == PREEMPTED_EXIT_CODE
    state, path = ckpt.load_checkpoint(tmp_path)
    state["labels_hash"] = "0" * 64  # as if the label-noise file had changed since
    ckpt.save_checkpoint(tmp_path, {k: v for k, v in state.items() if k != "checksum"})
    with pytest.raises(CheckpointError, match="different training labels"):
        fit(compose_train([*TINY, "trainer.epochs=1"]), tmp_path)


def test_a_checkpoint_of_code_that_computed_the_config_differently_refuses_to_resume(compose_train, tmp_path, caplog):
    """compute_version (schema.COMPUTE_VERSION) is recorded in checkpoints and result.json; a checkpoint
    of a version before a change that concerns its config is refused (resuming would mix two
    computations, here the strided convolutions' old padding), and one from before the number existed
    resumes with a warning when no change since version 2 concerns it."""
    import logging

    from sam_bench.schema import COMPUTE_VERSION

    cfg = compose_train([*TINY, "trainer.epochs=1"])
    assert _run_child(cfg, tmp_path, "step@3:TERM") == PREEMPTED_EXIT_CODE
    state, _ = ckpt.load_checkpoint(tmp_path)
    assert state["compute_version"] == COMPUTE_VERSION
    ckpt.save_checkpoint(tmp_path, {**{k: v for k, v in state.items() if k != "checksum"}, "compute_version": 1})
    with pytest.raises(CheckpointError, match=rf"computed this config otherwise \(its compute_version: 1; this code "
                                              rf"{COMPUTE_VERSION}: strided 3x3 convolutions pad .*new run directory"):
        fit(compose_train([*TINY, "trainer.epochs=1"]), tmp_path)
    ckpt.save_checkpoint(tmp_path, {k: v for k, v in state.items() if k not in ("checksum", "compute_version")})
    with caplog.at_level(logging.WARNING, logger="sam_bench"):
        fit(compose_train([*TINY, "trainer.epochs=1"]), tmp_path)
    assert "records no compute_version" in caplog.text
    assert json.loads((tmp_path / "result.json").read_text())["compute_version"] == COMPUTE_VERSION


def test_an_unversioned_sgd_checkpoint_with_m_refuses_to_resume(compose_train, tmp_path):
    """SGD with optimizer.m normalised BN over the whole batch before compute_version 3 (which records
    the number): a checkpoint of such a run without the number would mix the two, so it is refused;
    plain SGD without m, which version 3 did not change, resumes (with a warning)."""
    for overrides, refused in ((["optimizer=sgd", "optimizer.m=8"], True), (["optimizer=sgd"], False)):
        run_dir = tmp_path / str(refused)
        cfg = compose_train([*TINY, "trainer.epochs=1", *overrides])
        assert _run_child(cfg, run_dir, "step@3:TERM") == PREEMPTED_EXIT_CODE
        state, _ = ckpt.load_checkpoint(run_dir)
        ckpt.save_checkpoint(run_dir, {k: v for k, v in state.items() if k not in ("checksum", "compute_version")})
        if refused:
            with pytest.raises(CheckpointError, match=r"computed this config otherwise \(its compute_version: none recorded.*"
                                                      r"SGD with optimizer.m normalises BatchNorm per chunk"):
                fit(compose_train([*TINY, "trainer.epochs=1", *overrides]), run_dir)
        else:
            assert fit(compose_train([*TINY, "trainer.epochs=1", *overrides]), run_dir)["status"] == "complete"


def test_grad_scaler_state_is_checkpointed_and_restored(compose_train, tmp_path, monkeypatch):
    """The fp16 loss scaler is saved and restored with the rest of the state."""
    import sam_bench.engine.trainer as trainer

    real, init_scale = trainer.LossScaler, {"value": 1234.0}
    monkeypatch.setattr(trainer, "LossScaler", lambda device: real(device, init_scale=init_scale["value"]))
    # fp16 is refused on the CPU (a CUDA mode); CPU autocast fp16 still exercises the scaler's checkpointing
    monkeypatch.setattr(trainer, "resolve_precision", lambda requested, device: requested)
    # 4 steps of 8x8 images: stopped after 2, 2 resumed (CPU fp16 convolutions are slow: 52 s at 32x32; a fresh scaler's 1.0 would
    # still be far below the saved scale's half at the end)
    cfg = compose_train([*TINY, "trainer.epochs=1", "trainer.precision=fp16", "dataset.train_size=128", "dataset.image_size=8",
                         "dataset.test_size=16"])
    _preempt_here(cfg, tmp_path, 2, monkeypatch)
    saved = float(ckpt.load_checkpoint(tmp_path)[0]["scaler"]["scale"])
    assert saved in (1234.0, 617.0)  # 617 if a step overflowed and backed off
    init_scale["value"] = 1.0  # the resumed run builds a fresh scaler; the checkpoint must win
    fit(cfg, tmp_path)
    assert float(ckpt.read_checkpoint(tmp_path / ckpt.CHECKPOINT)["scaler"]["scale"]) >= saved / 2


# ---------------------------------------------------------------- the CLI: SIGTERM and bad input


def _cli(args, env, timeout=300):
    return subprocess.run(sam_bench_cmd() + ["train", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes_identically(cli_env, compose_train, tmp_path):
    args = [*TINY, "dataset.train_size=256", "trainer.epochs=2", "trainer.checkpoint_every_steps=3"]  # 16 steps
    victim = tmp_path / "victim"
    proc = subprocess.Popen(sam_bench_cmd() + ["train", *args, f"hydra.run.dir={victim}"], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (victim / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert "sam-bench: preempted: stopped by SIGTERM at step" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err and not (victim / "result.json").exists()
    assert 3 <= ckpt.read_checkpoint(victim / "checkpoint.pt")["step"] < 16
    assert "] preempted: stopped by SIGTERM at step" in (victim / "train.log").read_text()  # the log says why it stopped (QA)

    resumed = sam_bench_forked(["train", *args, f"hydra.run.dir={victim}"], cli_env)  # the resume: no start-up needed
    assert resumed.returncode == 0 and "resuming" in resumed.stdout
    assert _run_child(compose_train(args), tmp_path / "clean") == 0  # the uninterrupted reference
    assert _metrics(victim) == _metrics(tmp_path / "clean")
    a, b = (ckpt.read_checkpoint(d / ckpt.CHECKPOINT)["model"] for d in (tmp_path / "clean", victim))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _corrupt_checkpoint(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / ckpt.CHECKPOINT).write_bytes(b"PK\x03\x04 garbage")


def _file_in_the_way(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "x").write_text("")  # a file where the output directory's parent should be


BAD_INPUTS = [
    # (id, overrides, setup, exact stderr line — {run} is the run directory)
    ("fp16_on_cpu", ["trainer.precision=fp16"], None,
     "sam-bench: error: trainer.precision=fp16 needs CUDA (float16 autocast is GPU-only here); use trainer.precision=fp32 or bf16 on the CPU"),
    ("checkpoint_every_zero", ["trainer.checkpoint_every_steps=0"], None,
     "sam-bench: error: trainer.checkpoint_every_steps=0 must be >= 1, or null for epoch ends only"),
    ("corrupt_checkpoint", [], _corrupt_checkpoint,
     "sam-bench: error: no readable checkpoint in {run}: {run}/checkpoint.pt (RuntimeError: PytorchStreamReader failed "
     "reading zip archive: not a ZIP archive). Delete the run directory to start over"),
    ("unwritable_output_dir", ["hydra.run.dir={run}/x/run"], _file_in_the_way,
     "sam-bench: error: output directory {run}/x/run is not writable (Not a directory); choose a writable place with hydra.run.dir=/path/to/dir"),
    ("unwritable_sweep_dir", ["-m", "hydra.sweep.dir={run}/x/sweep"], _file_in_the_way,
     "sam-bench: error: output directory {run}/x/sweep is not writable (Not a directory); choose a writable place with hydra.sweep.dir=/path/to/dir"),
    ("diverged", ["optimizer.lr=1e30", "optimizer.grad_clip=null"], None,
     "sam-bench: error: non-finite training loss or gradient at step 2 (epoch 1); nothing after the last good checkpoint "
     "(none written yet) was saved. Lower optimizer.lr (or optimizer.grad_clip), then train into a new run directory"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides,setup,line", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_and_exit_2(cli_env, tmp_path, name, overrides, setup, line):
    run = tmp_path / "bad"
    if setup is not None:
        setup(run)
    overrides = [o.format(run=run) for o in overrides]
    dir_args = [] if any(o.startswith(("hydra.run.dir", "hydra.sweep.dir")) for o in overrides) else [f"hydra.run.dir={run}"]
    flags = [o for o in overrides if o.startswith("-")]  # -m goes before the overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    # the error's text and exit status, from main() in a pre-imported child; test_cli.py runs bad input
    # in real subprocesses (and checks there that it is the only line)
    proc = sam_bench_forked(["train", *flags, *TINY, "trainer.log_every_steps=1", *overrides, *dir_args], cli_env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == line.format(run=run)
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_diverged_sweep_point_is_skipped_and_the_sweep_goes_on(cli_env, tmp_path):
    """Multirun: the point that diverges (lr 1e30) is logged in its run directory and skipped, the
    next point trains to its result, and the command then exits 1 naming the diverged point."""
    sweep = tmp_path / "sweep"
    proc = sam_bench_forked(["train", "-m", *TINY, "trainer.log_every_steps=1", "optimizer.grad_clip=null", "optimizer.lr=1e30,0.1",
                             f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"], cli_env)  # the sweep's logic: forked
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    tail = proc.stderr.strip().splitlines()[-2:]
    assert tail[0] == "sam-bench: error: 1 sweep point(s) diverged and have no result:"
    assert "optimizer.lr=1e+30" in tail[1] and "optimizer.lr=0.1" not in tail[1]
    assert not (sweep / "0" / "result.json").exists()
    assert "diverged, so this sweep point is skipped and the sweep goes on: non-finite training loss" in (sweep / "0" / "train.log").read_text()
    assert json.loads((sweep / "1" / "result.json").read_text())["status"] == "complete"
    # the same sweep again: the diverged point is not trained again (it would diverge again), the other is complete
    again = sam_bench_forked(["train", "-m", *TINY, "trainer.log_every_steps=1", "optimizer.grad_clip=null", "optimizer.lr=1e30,0.1",
                              f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"], cli_env)  # as a repeat: forked
    assert again.returncode == 1, again.stderr
    assert f"this config diverged in {sweep / '0'} before (non-finite training loss or gradient at step 2 (epoch 1)); " \
           "delete the run directory to train it again" in again.stderr
    assert "resuming" not in (sweep / "0" / "train.log").read_text()
    # the report says why the run has no result
    subprocess.run(sam_bench_cmd() + ["report", f"runs=[{sweep}]", f"out={tmp_path / 'report'}"], env=cli_env, check=True,
                   capture_output=True, timeout=120)
    assert f"- {sweep / '0'} (diverged: non-finite training loss or gradient at step 2 (epoch 1))" in \
        (tmp_path / "report" / "summary.md").read_text()


@pytest.mark.slow
def test_a_divergence_record_of_another_config_does_not_stop_a_run_and_goes_when_it_completes(cli_env, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "diverged.json").write_text(json.dumps({"config_hash": "another", "error": "non-finite loss; ..."}))
    proc = sam_bench_forked(["train", *TINY, f"hydra.run.dir={run}"], cli_env)  # the trainer's rule, not the process
    assert proc.returncode == 0, proc.stderr
    assert (run / "result.json").exists() and not (run / "diverged.json").exists()


@pytest.mark.slow
def test_second_process_on_a_busy_run_directory_fails_fast(cli_env, tmp_path):
    run = tmp_path / "busy"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the running job's config\n")
    with run_lock(run):  # as if another training process held it
        t0 = time.time()
        proc = _cli([*TINY, f"hydra.run.dir={run}"], cli_env)
    assert proc.returncode == 2 and time.time() - t0 < 60
    assert proc.stderr.strip().splitlines()[-1] == (
        f"sam-bench: error: {run} is in use by another sam-bench process (pid {os.getpid()}); "
        "wait for it to finish, or give this run its own directory with hydra.run.dir=...")
    assert not (run / "checkpoint.pt").exists()
    assert (run / ".hydra" / "config.yaml").read_text() == "the running job's config\n"  # refused before Hydra wrote it


def test_the_cli_locks_the_run_directory_before_hydra_writes_there_and_the_trainer_takes_it_over(tmp_path):
    """The lock was taken in fit(), after torch's import: for seconds after Hydra had written a job's
    .hydra/ files, a second command found the directory free and rewrote them (QA)."""
    from sam_bench.engine.rundir import _lock_or_refuse, lock_before_hydra

    def another_process_locks():  # flock conflicts between open files, even of one process
        with open(tmp_path / ".lock", "a+") as f:
            _lock_or_refuse(f, tmp_path)

    lock_before_hydra(tmp_path)
    with pytest.raises(ConfigError, match=f"is in use by another sam-bench process \\(pid {os.getpid()}\\)"):
        another_process_locks()
    with run_lock(tmp_path):  # the trainer's: taken over, not refused
        with pytest.raises(ConfigError, match="in use"):
            another_process_locks()
    another_process_locks()  # released at the end of the run


@pytest.mark.slow
def test_a_command_refused_on_a_busy_directory_leaves_the_running_jobs_hydra_files(cli_env, tmp_path):
    run = tmp_path / "r"
    # the first job stops itself (SIGSTOP) after its first step, holding the directory: the second
    # command meets a busy directory however slowly it starts (a timed race let the first finish first)
    first = subprocess.Popen(sam_bench_cmd() + ["train", *TINY, f"hydra.run.dir={run}"],
                             env={**cli_env, "SAM_BENCH_FAULT": "step@1:STOP"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stat = Path(f"/proc/{first.pid}/stat")
    deadline = time.time() + 120
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T" and time.time() < deadline:
        time.sleep(0.02)
    before = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    second = _cli([*TINY, "optimizer.rho=0.1", f"hydra.run.dir={run}"], cli_env)
    os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    assert second.returncode == 2 and "is in use by another sam-bench process" in second.stderr, second.stderr
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == before


@pytest.mark.slow
@pytest.mark.parametrize("by", ["result", "checkpoint"])
def test_a_refused_command_leaves_the_hydra_files_as_they_were(cli_env, tmp_path, by):
    """A refusal on result.json (no checkpoint left) put back config.yaml alone, rebuilt, and left the
    refused command's overrides.yaml and hydra.yaml in place (QA)."""
    run = tmp_path / "r"
    assert _cli([*TINY, "trainer.epochs=1", f"hydra.run.dir={run}"], cli_env).returncode == 0
    if by == "result":
        for path in ckpt.checkpoint_files(run):
            path.unlink()
    before = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    proc = _cli([*TINY, "trainer.epochs=1", "optimizer.lr=0.05", f"hydra.run.dir={run}"], cli_env)
    what = "the finished result (result.json)" if by == "result" else "a checkpoint"
    assert proc.returncode == 2 and f"holds {what} of a different config (optimizer.lr" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == before


# ---------------------------------------------------------------- what a resume must never destroy (QA)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_refused_resume_leaves_the_runs_noise_file_alone(compose_train, tmp_path):
    """The noise file was written before the config check: a refused command replaced the finished
    run's record of its flipped labels (and its result.json's sha256 no longer matched)."""
    noisy = [*TINY, "trainer.epochs=1", "dataset.label_noise.rate=0.2"]
    assert _run_child(compose_train(noisy), tmp_path, "step@3:TERM") == PREEMPTED_EXIT_CODE
    before = _sha(tmp_path / "noisy_labels.pt")
    with pytest.raises(CheckpointError, match=r"dataset.label_noise.rate: 0.2 -> 0.5"):
        fit(compose_train([*noisy, "dataset.label_noise.rate=0.5"]), tmp_path)
    assert _sha(tmp_path / "noisy_labels.pt") == before


def test_another_configs_finished_result_is_not_overwritten_when_the_checkpoints_are_gone(compose_train, tmp_path):
    cfg = compose_train([*TINY, "trainer.epochs=1"])
    done = fit(cfg, tmp_path)
    for path in ckpt.checkpoint_files(tmp_path):
        path.unlink()  # to free the disk, say
    before = _sha(tmp_path / "result.json")
    with pytest.raises(CheckpointError, match=r"holds the finished result \(result.json\) of a different config \(optimizer.lr"):
        fit(compose_train([*TINY, "trainer.epochs=1", "optimizer.lr=0.05"]), tmp_path)
    assert _sha(tmp_path / "result.json") == before
    assert fit(cfg, tmp_path)["final_test_error"] == done["final_test_error"]  # its own config: read back, not retrained


def _files(run_dir: Path) -> dict:
    return {p.relative_to(run_dir): _sha(p) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "preempted"])
def test_checkpointing_off_does_not_overwrite_another_configs_run(compose_train, tmp_path, finished):
    """trainer.checkpoint=false read no checkpoint, so no config was compared (result.json was only
    when no checkpoint was left): another config's finished run lost its result.json, metrics.jsonl
    and got a second event file in tb/ (QA); an unfinished one lost its metrics.jsonl."""
    cfg = compose_train([*TINY, "trainer.epochs=1"])
    assert _run_child(cfg, tmp_path, None if finished else "step@3:TERM") == (0 if finished else PREEMPTED_EXIT_CODE)
    before = _files(tmp_path)
    what = r"the finished result \(result.json\)" if finished else "a checkpoint"
    with pytest.raises(CheckpointError, match=f"holds {what} of a different config \\(optimizer.rho: 0.05 -> 0.1"):
        fit(compose_train([*TINY, "trainer.epochs=1", "optimizer.rho=0.1", "trainer.checkpoint=false"]), tmp_path)
    assert _files(tmp_path) == before


def test_a_key_added_by_a_newer_version_resumes_at_its_default_and_records_both_commits(compose_train, tmp_path, monkeypatch):
    """A checkpoint written before optimizer.sync_perturbation existed trained as its default: the
    new code resumes it (it used to refuse every in-progress run), and result.json names both code
    versions. At a value other than the default the key is a real change, and is refused."""
    import sam_bench.engine.trainer as trainer

    monkeypatch.setattr(trainer, "git_commit", lambda: "old")
    _preempt_here(compose_train([*TINY, "trainer.epochs=1"]), tmp_path, 3, monkeypatch)
    state, _ = ckpt.load_checkpoint(tmp_path)
    del state["config"]["optimizer"]["sync_perturbation"]
    ckpt.save_checkpoint(tmp_path, {k: v for k, v in state.items() if k != "checksum"})
    with pytest.raises(CheckpointError, match=r"optimizer.sync_perturbation: False -> True"):
        fit(compose_train([*TINY, "trainer.epochs=1", "optimizer.sync_perturbation=true"]), tmp_path)
    monkeypatch.setattr(trainer, "git_commit", lambda: "new")
    result = fit(compose_train([*TINY, "trainer.epochs=1"]), tmp_path)
    assert result["status"] == "complete" and result["git_commits"] == ["old", "new"] and result["git_commit"] == "new"


def test_the_kept_epoch_copies_are_the_last_resort(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(10), keep_as=ckpt.kept_name(1))
    ckpt.save_checkpoint(tmp_path, _state(20))
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):
        (tmp_path / name).write_bytes(b"damaged")
    state, path = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 10 and path.name == ckpt.kept_name(1)


def test_resuming_past_a_damaged_newest_keeps_the_good_previous(tmp_path):
    """The next save rotated the damaged newest over the good previous it had just resumed from."""
    ckpt.save_checkpoint(tmp_path, _state(10))
    ckpt.save_checkpoint(tmp_path, _state(20))
    (tmp_path / ckpt.CHECKPOINT).write_bytes(b"")
    state, path = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 10
    ckpt.set_aside_damaged_newest(tmp_path, path)
    ckpt.save_checkpoint(tmp_path, _state(30))
    assert ckpt.read_checkpoint(tmp_path / ckpt.PREVIOUS)["step"] == 10
    assert (tmp_path / f"{ckpt.CHECKPOINT}.damaged").read_bytes() == b""


def _unreadable(path: Path) -> None:
    """Make ``path`` a file whose every read fails with EIO, as on a failing disk (/proc/self/mem at
    offset 0; a permission error cannot be made as root)."""
    path.unlink(missing_ok=True)
    path.symlink_to("/proc/self/mem")


def test_checkpoints_that_cannot_be_read_are_neither_called_damaged_nor_set_aside(tmp_path):
    """An I/O error reading both files advised deleting the run directory, and one reading the
    newest renamed it .damaged (QA): a file that cannot be read may be intact."""
    ckpt.save_checkpoint(tmp_path, _state(10))
    ckpt.save_checkpoint(tmp_path, _state(20))
    _unreadable(tmp_path / ckpt.CHECKPOINT)
    state, path = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 10
    ckpt.set_aside_damaged_newest(tmp_path, path)
    assert (tmp_path / ckpt.CHECKPOINT).is_symlink() and not list(tmp_path.glob("*.damaged*"))
    _unreadable(tmp_path / ckpt.PREVIOUS)
    with pytest.raises(CheckpointError) as failed:
        ckpt.load_checkpoint(tmp_path)
    assert str(failed.value) == (
        f"no checkpoint in {tmp_path} could be read: {tmp_path / ckpt.CHECKPOINT} (cannot be read: Input/output error); "
        f"{tmp_path / ckpt.PREVIOUS} (cannot be read: Input/output error). A file that cannot be read may be intact: fix the "
        "cause (its permissions, the disk) and re-run the same command to resume")


def test_a_one_off_read_error_is_read_again(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _state(10))
    ckpt.save_checkpoint(tmp_path, _state(20))
    read, failed = ckpt.read_checkpoint, []

    def once(path):
        if not failed:
            failed.append(path)
            raise ckpt.ReadError(errno.EIO, os.strerror(errno.EIO), str(path))
        return read(path)

    monkeypatch.setattr(ckpt, "read_checkpoint", once)
    assert ckpt.load_checkpoint(tmp_path)[0]["step"] == 20 and failed == [tmp_path / ckpt.CHECKPOINT]


def test_a_file_set_aside_as_damaged_is_never_overwritten(tmp_path):
    """A second damaged newest was renamed over the first one set aside (QA)."""
    ckpt.save_checkpoint(tmp_path, _state(10))
    ckpt.save_checkpoint(tmp_path, _state(20))
    for damage, step in ((b"first damage", 30), (b"second damage", 40)):
        (tmp_path / ckpt.CHECKPOINT).write_bytes(damage)
        state, path = ckpt.load_checkpoint(tmp_path)
        ckpt.set_aside_damaged_newest(tmp_path, path)
        ckpt.save_checkpoint(tmp_path, _state(step))
    assert (tmp_path / f"{ckpt.CHECKPOINT}.damaged").read_bytes() == b"first damage"
    assert (tmp_path / f"{ckpt.CHECKPOINT}.damaged.1").read_bytes() == b"second damage"


def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _state(10))

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*checkpoint.next.pt \(No space left on device\); the checkpoints "
                                              "already there are intact"):
        ckpt.save_checkpoint(tmp_path, _state(20))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CHECKPOINT] and ckpt.load_checkpoint(tmp_path)[0]["step"] == 10


def test_a_full_disk_before_the_first_checkpoint_does_not_speak_of_intact_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: _no_space())
    with pytest.raises(CheckpointError) as failed:
        ckpt.save_checkpoint(tmp_path, _state(10))
    assert str(failed.value) == (f"cannot write {tmp_path / ckpt.NEXT} (No space left on device); no checkpoint was written yet: "
                                 "free space (or raise the quota) and re-run the same command to train from the start")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


INTACT = "the checkpoints already there are intact: free space (or raise the quota) and re-run the same command to resume from them"
WRITE_FAILURES = [
    # (id, what fails, file named, extra overrides, the rest of the line)
    ("metrics", "sam_bench.engine.trainer.write_metrics", "metrics.jsonl", [], INTACT),
    ("result", "sam_bench.engine.trainer.atomic_write_json", "result.json", [], INTACT),
    ("noise_file", "sam_bench.data.noisy.atomic_write_bytes", "noisy_labels.pt", ["dataset.label_noise.rate=0.2"],
     "no checkpoint was written yet: free space (or raise the quota) and re-run the same command to train from the start"),
    ("no_checkpointing", "sam_bench.engine.trainer.write_metrics", "metrics.jsonl", ["trainer.checkpoint=false"],
     "trainer.checkpoint=false keeps no checkpoint: free space (or raise the quota) and re-run the same command to train "
     "again from epoch 1"),
]


@pytest.mark.parametrize("name,target,file,overrides,rest", WRITE_FAILURES, ids=[w[0] for w in WRITE_FAILURES])
def test_a_failed_write_is_one_line_naming_the_file_and_what_a_rerun_does(compose_train, tmp_path, monkeypatch, caplog,
                                                                          name, target, file, overrides, rest):
    """Only the checkpoint's write failures were one line: a full disk at metrics.jsonl, result.json
    or the label-noise file ended in a traceback (QA). The line goes to the log (train.log) too, and
    the same command then finishes the run."""
    cfg = compose_train([*TINY, "trainer.epochs=1", *overrides])
    monkeypatch.setattr(target, _no_space)
    with pytest.raises(WriteError) as failed:
        fit(cfg, tmp_path)
    line = f"cannot write {tmp_path / file} (No space left on device); {rest}"
    assert str(failed.value) == line
    assert line in [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    monkeypatch.undo()
    assert fit(cfg, tmp_path)["status"] == "complete"


def test_a_tensorboard_write_failure_is_one_line_after_the_epochs_checkpoint(compose_train, tmp_path, monkeypatch):
    """TensorBoard's write error (raised by its writer thread at a later call) was a traceback, and
    came before the epoch end's checkpoint, which it cost (QA)."""
    from tensorboard.summary.writer import record_writer

    write, calls = record_writer.RecordWriter.write, [0]

    def failing(self, data):  # the event file's header, then a full disk
        calls[0] += 1
        return write(self, data) if calls[0] == 1 else _no_space()

    cfg = compose_train([*TINY, "trainer.epochs=2"])
    monkeypatch.setattr(record_writer.RecordWriter, "write", failing)
    with pytest.raises(WriteError) as failed:
        fit(cfg, tmp_path)
    assert str(failed.value) == f"cannot write {tmp_path / 'tb'} (No space left on device); {INTACT}"
    assert ckpt.read_checkpoint(tmp_path / ckpt.CHECKPOINT)["epoch"] == 1 and len(_metrics(tmp_path)) == 1
    monkeypatch.undo()
    assert fit(cfg, tmp_path)["status"] == "complete" and len(_metrics(tmp_path)) == 2


FULL_DISK_AT_TENSORBOARD = """
import errno, os, sys
from tensorboard.summary.writer import record_writer
write, calls = record_writer.RecordWriter.write, [0]
def failing(self, data):
    calls[0] += 1
    if calls[0] > 1:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(self, data)
record_writer.RecordWriter.write = failing
from sam_bench.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_full_disk_under_the_cli_is_one_line_also_in_train_log(cli_env, tmp_path):
    run = tmp_path / "r"
    args = ["train", *TINY, "trainer.epochs=2", f"hydra.run.dir={run}"]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_AT_TENSORBOARD, *args], env=cli_env, capture_output=True, text=True,
                          timeout=300)
    line = f"cannot write {run / 'tb'} (No space left on device); {INTACT}"
    # status 1, an error: 2 is bad input, which a full disk is not (a scheduler may treat them apart)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == f"sam-bench: error: {line}", proc.stderr
    assert "Traceback" not in proc.stderr and line in (run / "train.log").read_text()
    assert _cli(args[1:], cli_env).returncode == 0 and len(_metrics(run)) == 2


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionHandler() as h:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert h.requested and h.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before  # and leaving the block raised nothing more


def test_a_signal_noted_early_is_taken_over_by_the_trainers_handler():
    from sam_bench.engine.signals import catch_early

    before = signal.getsignal(signal.SIGTERM)
    early = catch_early()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        with PreemptionHandler() as h:
            assert h.requested and h.signal_name == "SIGTERM"
    finally:
        early.__exit__(None, None, None)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_before_training_began_exits_75(cli_env, tmp_path):
    """Before the trainer installed its handler (after torch's import, seconds in), SIGTERM killed
    the run (status 143), which a scheduler takes for a failure, not a preemption (QA)."""
    run = tmp_path / "r"
    proc = subprocess.Popen(sam_bench_cmd() + ["train", *TINY, f"hydra.run.dir={run}"], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / ".hydra" / "overrides.yaml").exists() and time.time() < deadline:  # Hydra's part done, torch's next
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert err.strip().splitlines()[-1] == ("sam-bench: preempted: stopped by SIGTERM before training began, nothing written; "
                                            "re-run the same command to start")
    assert not ckpt.checkpoint_files(run) and not (run / "metrics.jsonl").exists()


def test_diagnostics_of_a_log_interval_cut_by_a_checkpoint_survive_it():
    """The device accumulators were not checkpointed: the first interval after a resume logged the
    mean of its second half only."""
    from sam_bench.optim.sam import SAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, diagnostics=True)
    opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
    again = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, diagnostics=True)
    again.load_state_dict(opt.state_dict())
    assert again.read_diagnostics() == opt.read_diagnostics() != {}


@pytest.mark.slow
@pytest.mark.parametrize("killed_in", [2, 1], ids=["second_checkpoint", "first_checkpoint"])
def test_a_resumed_run_shows_each_tensorboard_point_once(compose_train, tmp_path, killed_in):
    """Killed after an epoch's events were flushed but before its checkpoint: the resumed run writes
    those steps again, and TensorBoard hides the first copies (purge_step); also when the run had no
    checkpoint yet and starts over (the first epoch's points were shown twice, QA)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_train([*TINY, "trainer.epochs=2"])
    assert _run_child(cfg, tmp_path, f"checkpoint_partial@{killed_in}") not in (0, None)
    assert _run_child(cfg, tmp_path) == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 2


def test_sam_diagnostics_are_logged_every_log_interval_of_the_global_step_and_at_the_end(compose_train, tmp_path, monkeypatch):
    """12 steps (2 epochs of 6), log_every_steps=5: the sam/* means land at global steps 5 and 10, and
    the last 2 steps' at step 12 (before, the interval counted steps within the epoch: points at 5
    and 11, intervals of 5 and 6, the last step never written; an epoch shorter than the interval,
    as the quick start's 62 against 50 after the first, logged nothing or lost its tail). Within
    the epochs they are read in the finite check's sync (take_diagnostics), never by a sync of their
    own (read_diagnostics: once, at the end)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sam_bench.optim import SAM

    reads, takes = [], []
    for name, calls in (("read_diagnostics", reads), ("take_diagnostics", takes)):
        original = getattr(SAM, name)
        monkeypatch.setattr(SAM, name, lambda self, _o=original, _c=calls: _c.append(1) or _o(self))
    fit(compose_train([*TINY, "trainer.epochs=2", "trainer.log_every_steps=5", "trainer.checkpoint=false"]), tmp_path)
    assert len(takes) == 3 and len(reads) == 1  # steps 5 and 10; the end's (read_diagnostics takes once more)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("sam/cosine")] == [5, 10, 12]
    assert [e.step for e in events.Scalars("train/images_per_s")] == [6, 12]
    assert [e.step for e in events.Scalars("test/top5_error")] == [6, 12]


def test_checkpoint_every_epochs_writes_the_nth_and_the_last_and_resumes_exactly(compose_train, tmp_path):
    """Finetuning presets train thousands of one-step epochs (Flowers b7: 5,000): a checkpoint (0.5 GB
    for b7) after each was terabytes of writes. trainer.checkpoint_every_epochs=2 of 3 epochs: written
    after epochs 2 and 3 (not 1); a run killed in epoch 2 resumes from the start and ends as the
    uninterrupted one; the kept copy of an off-cadence epoch is still written."""
    cfg = compose_train([*TINY, "trainer.checkpoint_every_epochs=2", "trainer.keep_epochs=[1]"])
    assert _run_child(cfg, tmp_path / "clean") == 0
    files = {p.name: ckpt.read_checkpoint(p)["epoch"] for p in ckpt.checkpoint_files(tmp_path / "clean")}
    assert files == {ckpt.CHECKPOINT: 3, ckpt.PREVIOUS: 2}
    assert ckpt.read_checkpoint(tmp_path / "clean" / ckpt.kept_name(1))["epoch"] == 1
    victim = tmp_path / "victim"
    cfg = compose_train([*TINY, "trainer.checkpoint_every_epochs=2"])
    assert _run_child(cfg, victim, "step@9") == -signal.SIGKILL  # epoch 2 of 3; epoch 1 left no checkpoint
    assert not ckpt.checkpoint_files(victim)
    assert _run_child(cfg, victim) == 0
    assert _metrics(victim) == _metrics(tmp_path / "clean")
    with pytest.raises(ConfigError, match="trainer.checkpoint_every_epochs=0 must be >= 1"):
        validate(compose_train([*TINY, "trainer.checkpoint_every_epochs=0"]))
