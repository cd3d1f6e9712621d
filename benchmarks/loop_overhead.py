"""What does the Trainer cost over a bare loop around the same jitted step?

Both sides train the conv baseline for ``--steps`` steps on the same in-memory batches
(already on the device, so data loading is out of the picture), in one process,
alternating, ``--repeats`` times each:

- bare: ``for batch in batches: state, metrics = train_step(state, batch)``, then one
  ``block_until_ready`` at the end;
- Trainer: ``Trainer.fit`` with the default callbacks of ``aurora-train``: TensorBoard
  scalars every step, progress output every 10 steps, an asynchronous orbax checkpoint every
  50 steps.

- bare + the same work: the bare loop that also does what those callbacks do, by hand, the
  way a careful user would: each step's scalars (loss, grad norm) fetched one step behind and
  written with tensorboardX, a progress line every 10 steps, and the same asynchronous orbax
  save every 50 steps (``CheckpointManager`` with a ``StandardSave`` of the state and a
  ``JsonSave`` of a small meta dict), waited for at the end.

Prints the median wall time of each, ``loop_overhead_ratio=<Trainer / bare>`` (the figure
quoted before this side existed: it counts orbax's writes and the scalar writes, which the
bare loop does not do), and, last, ``framework_overhead_ratio=<Trainer / bare + same work>``:
what the framework itself costs.

    python benchmarks/loop_overhead.py [--steps 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import jax
import optax

from aurora_loop.callbacks import ModelCheckpoint, ProgressBar, TensorBoardLogger
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import batch_shardings, make_mesh, place_batch
from aurora_loop.step import make_init_fn, make_train_step, state_shardings
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer


def synthetic_batches(count: int, batch_size: int, grid: tuple[int, int]):
    """``count`` global batches of ``batch_size`` in-memory samples on a ``grid`` (h, w)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ is not installed
    from tests.synthetic import make_samples

    samples = make_samples(count * batch_size, grid=grid)
    return [stack_samples(samples[i * batch_size : (i + 1) * batch_size]) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grid", default="32x64")
    args = parser.parse_args()
    grid = tuple(int(x) for x in args.grid.split("x"))

    mesh = make_mesh(1)
    host_batches = synthetic_batches(20, args.batch_size, grid)
    shardings = batch_shardings(host_batches[0], mesh)
    batches = [place_batch(b, shardings) for b in host_batches]
    stream = [batches[i % len(batches)] for i in range(args.steps)]
    task = ConvTask()
    optimizer = optax.adam(1e-4)

    init_fn = make_init_fn(task, optimizer, seed=0)
    abstract = jax.eval_shape(init_fn, batches[0])
    state_sharding = state_shardings(abstract, mesh)
    step_fn = make_train_step(task, optimizer, state_sharding, jax.tree.map(lambda x: x.sharding, batches[0]), mesh)
    init = jax.jit(init_fn, out_shardings=state_sharding)

    def bare() -> float:
        state = init(batches[0])
        jax.block_until_ready(state)
        # Time from the moment step 2 is dispatched, as the Trainer's timer below does.
        state, metrics = step_fn(state, stream[0])
        state, metrics = step_fn(state, stream[1])
        start = time.perf_counter()
        for batch in stream[2:]:
            state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - start

    def bare_with_the_same_work() -> float:
        import orbax.checkpoint as ocp
        from tensorboardX import SummaryWriter

        with tempfile.TemporaryDirectory() as out:
            writer = SummaryWriter(f"{out}/tensorboard")
            options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
            manager = ocp.CheckpointManager(f"{out}/checkpoints", options=options)
            log = io.StringIO()
            state = init(batches[0])
            jax.block_until_ready(state)
            state, metrics = step_fn(state, stream[0])
            pending = (1, metrics)
            start = time.perf_counter()
            for step, batch in enumerate(stream[1:], start=2):
                state, metrics = step_fn(state, batch)
                previous, previous_metrics = pending  # written one step behind, as the Trainer does
                values = jax.device_get(previous_metrics)
                for name in ("loss", "grad_norm"):
                    writer.add_scalar(f"train/{name}", float(values[name]), previous)
                if previous % 10 == 0:
                    log.write(f"step {previous} loss {float(values['loss']):.4f}\n")
                pending = (step, metrics)
                if step % 50 == 0:
                    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave({"step": step})))
            jax.block_until_ready((state, metrics))
            manager.wait_until_finished()
            writer.close()
            manager.close()
            return time.perf_counter() - start

    class Timer(ProgressBar):
        """The default progress output, plus the wall time from step 2's dispatch to the end.

        Each Trainer compiles its own step on its first dispatch; step 1's hook runs right
        after step 2 was dispatched, so starting there leaves compilation out. Listed last,
        its ``on_fit_end`` runs after the checkpoint callback waited for its writes.
        """

        def on_step(self, trainer, step, metrics):
            super().on_step(trainer, step, metrics)
            if step == 1:
                self.start = time.perf_counter()

        def on_fit_end(self, trainer):
            super().on_fit_end(trainer)
            self.elapsed = time.perf_counter() - self.start

    def with_trainer() -> float:
        with tempfile.TemporaryDirectory() as out:
            timer = Timer(every_n_steps=10, stream=io.StringIO())
            callbacks = [
                TensorBoardLogger(f"{out}/tensorboard", log_every_n_steps=1),
                ModelCheckpoint(f"{out}/checkpoints", every_n_steps=50, max_to_keep=2, verbose=False),
                timer,
            ]
            trainer = Trainer(callbacks, optimizer=optimizer, max_steps=args.steps, max_epochs=10**6, mesh=mesh)
            trainer.fit(task, stream)
            return timer.elapsed

    with_trainer()  # compile and warm every path before timing
    bare()
    bare_with_the_same_work()
    bare_times, work_times, trainer_times = [], [], []
    for _ in range(args.repeats):
        bare_times.append(bare())
        work_times.append(bare_with_the_same_work())
        trainer_times.append(with_trainer())
    bare_median = statistics.median(bare_times)
    work_median = statistics.median(work_times)
    trainer_median = statistics.median(trainer_times)
    print(f"steps={args.steps} batch={args.batch_size} grid={args.grid} devices={mesh.size} ({jax.devices()[0].platform})")
    print(f"bare loop median               {bare_median:.3f} s  ({args.steps / bare_median:.1f} steps/s)")
    print(f"bare loop + same work median   {work_median:.3f} s  ({args.steps / work_median:.1f} steps/s)")
    print(f"Trainer.fit median             {trainer_median:.3f} s  ({args.steps / trainer_median:.1f} steps/s)")
    print(f"loop_overhead_ratio={trainer_median / bare_median:.3f}  (Trainer with its saves and logs / bare loop without them)")
    print(f"framework_overhead_ratio={trainer_median / work_median:.3f}")


if __name__ == "__main__":
    main()
