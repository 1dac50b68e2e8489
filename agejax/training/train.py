"""train_and_evaluate(config, workdir): the whole training job, importable from a notebook."""

import functools
import json
import logging
import math
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from agejax import errors, metrics, parallel, storage
from agejax.data import pipeline
from agejax.evaluation import plots, scoring
from agejax.inference import prediction
from agejax.training import checkpointing, configuration, preemption, profiling, steps, workdir_lock

FINAL_METRICS = "final_metrics.json"


def load_pretrained(config, params, model_state):
  """Overlays the converted torchvision backbone of `config.model.pretrained`; the age head stays new."""
  from agejax import convert

  return convert.backbone_from_converted(config.model.pretrained, params, model_state)


def build(config) -> dict[str, Any]:
  """Creates the mesh, data, model, optimizer, initial state, train step and evaluator for a validated `config`."""
  mesh = parallel.make_mesh()
  train_data = pipeline.load_labelled_split(config, "train", training=True)
  eval_data = pipeline.load_labelled_split(config, config.data.eval_split)
  steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
  overlay = functools.partial(load_pretrained, config) if config.model.pretrained else None
  fns, state, schedule = steps.create(config, steps_per_epoch, overlay=overlay)
  replicated = parallel.replicated(mesh)
  state = jax.device_put(state, replicated)
  train_step = steps.jit_train_step(fns, replicated, parallel.data_sharded(mesh))
  evaluator = scoring.Evaluator(fns, eval_data, config.eval_batch_size or config.batch_size, mesh)
  return dict(
    mesh=mesh,
    train_data=train_data,
    eval_data=eval_data,
    schedule=schedule,
    state=state,
    steps=fns,
    train_step=train_step,
    evaluator=evaluator,
    steps_per_epoch=steps_per_epoch,
  )


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache, so a restarted run skips recompiling."""
  if directory:
    jax.config.update("jax_compilation_cache_dir", str(storage.path(directory)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _write_json(path: epath.Path, obj: dict) -> None:
  if jax.process_index() == 0:
    storage.write_json(path, obj)


def train_and_evaluate(config, workdir: storage.Location) -> dict[str, float] | None:
  """Trains (resuming from WORKDIR's latest checkpoint), evaluates and checkpoints.

  The run holds WORKDIR's lock (workdir_lock.hold) from before anything is built until it returns.

  Args:
    config: the training config (configs/vgg16_kl.py); checked before anything is built.
    workdir: where checkpoints, TensorBoard events, config.json and final_metrics.json go (a path
      or a gs:// URL).

  Returns:
    The final metrics (also written to WORKDIR/final_metrics.json), or None when a SIGTERM stopped
    the run (after saving a checkpoint at the current step once training had started).
  """
  started = time.perf_counter()
  configuration.validate(config)
  # A missing bucket, a read-only folder or an unreachable endpoint fails here, before any compilation.
  workdir = storage.check_writable(workdir)
  enable_compilation_cache(config.get("compilation_cache_dir", ""))
  try:
    with preemption.Preemption() as signalled, workdir_lock.hold(workdir) as lock:
      ckpts = checkpointing.Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
      try:
        return _train(config, workdir, ckpts, lock, signalled, started)
      finally:
        ckpts.close()
  except preemption.Stopped:
    print(f"stopped by SIGTERM before training started: nothing to save in {workdir}")
    return None


def _check_recorded_config(config, workdir: epath.Path) -> None:
  """Fails in one line when `config` changes what WORKDIR's checkpoints mean (see configuration.check_resume)."""
  recorded = workdir / "config.json"
  if recorded.exists():
    configuration.check_resume(config, storage.read_json_object(recorded), recorded)
  else:
    logging.warning("%s has checkpoints but no config.json: only their array shapes are checked", workdir)


def _train(
  config,
  workdir: epath.Path,
  ckpts: checkpointing.Checkpoints,
  lock: workdir_lock.WorkdirLock | None,
  signalled: preemption.Preemption,
  started: float,
) -> dict[str, float] | None:
  """train_and_evaluate's body, run holding the workdir's lock."""
  from clu import metric_writers, periodic_actions
  from tqdm.auto import tqdm

  final_path = workdir / FINAL_METRICS
  with jax.transfer_guard("allow"):  # start-up moves data freely; the loop below does not
    if ckpts.latest_step() is not None:  # before the data is read and anything compiled
      _check_recorded_config(config, workdir)
    b = build(config)
    state, mesh = b["state"], b["mesh"]
    replicated = parallel.replicated(mesh)
    if ckpts.latest_step() is not None:
      if jax.process_index() == 0:
        print(f"resuming from step {ckpts.latest_step()} of {ckpts.directory}")
      state = ckpts.restore(state)
    start = int(state.step)
    # What inference needs besides the weights: predict.py, evaluate.py and exports never ask the dataset.
    _write_json(
      workdir / checkpointing.INFERENCE_FILE, checkpointing.inference_record(config, b["train_data"].images.shape[1])
    )
    if start >= config.num_train_steps and final_path.exists():
      final = storage.read_json_object(final_path)
      print(f"{workdir}: finished at step {start}; final metrics: {json.dumps(final)}")
      return final
    # Only now: a config that does not fit the workdir's checkpoints must not replace the one that does.
    _write_json(workdir / checkpointing.CONFIG_FILE, config.to_dict())
    signalled.arm()  # from here a SIGTERM saves a checkpoint at the current step

    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    # A few eval faces, drawn with their target and predicted distributions at every evaluation.
    sample = b["eval_data"].gather(np.arange(min(4, len(b["eval_data"]))))
    sample_images = jax.device_put(sample["image"], replicated)
    predict = jax.jit(functools.partial(prediction.distributions, b["steps"]))
    report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer)
    batches = pipeline.TrainBatches(b["train_data"], config.batch_size, config.seed)
    stream = pipeline.device_prefetch(
      (batches.local_batch(s) for s in range(start, config.num_train_steps)), parallel.data_sharded(mesh)
    )
    sums = jax.device_put(metrics.zeros(), replicated)  # donated to the step: a fresh one after each log
  eval_metrics: dict[str, float] = {}
  step, first_step_s = start, None
  # The device keeps two steps queued, the host never runs ahead unboundedly, and the progress bar
  # shows real speed.
  in_flight = parallel.InFlight()
  host_cpu = jax.local_devices(backend="cpu")[0]  # this process's own: a global one may be remote

  def learning_rate(applied: int) -> float:
    """The rate of the last update (after `applied` updates; skipped steps do not advance the schedule), on the host."""
    with jax.default_device(host_cpu):  # no accelerator round trip for a logged scalar
      return float(b["schedule"](applied - 1))

  profiler = profiling.Profiler(workdir, config.get("profile_steps", 0), config.log_every_steps, start)
  synced: list[tuple[int, float]] = []  # (step, time) at each log fetch, where the host has synced

  def check_finite(host_sums: dict[str, float]) -> None:
    if host_sums["nonfinite_step"] and config.get("nonfinite", "stop") == "stop":
      ckpts.wait()  # earlier (finite) checkpoints complete; this state is never saved
      ckpts.close()
      raise errors.Diverged(
        f"non-finite loss or gradient at step {int(host_sums['nonfinite_step'])} (run stopped; latest "
        f"checkpoint: step {ckpts.latest_step()}); lower optimizer.learning_rate, or set "
        f"config.nonfinite='skip' to skip such steps"
      )

  with (
    metric_writers.ensure_flushes(writer),
    tqdm(total=config.num_train_steps, initial=start, desc="train", disable=jax.process_index() > 0) as bar,
  ):
    for step in range(start + 1, config.num_train_steps + 1):
      profiler.before(step)
      state, sums, loss = b["train_step"](state, sums, next(stream))
      if first_step_s is None:
        loss.block_until_ready()  # once: time to the first finished step (start-up + compilation)
        first_step_s = time.perf_counter() - started
      in_flight.add(loss)
      report(step)
      bar.update()
      last = step == config.num_train_steps
      profiler.after(step, in_flight, last)
      # All processes must stop at the same step: with several, JAX's preemption sync point decides.
      preempted = ckpts.reached_preemption(step) if jax.process_count() > 1 else bool(signalled)
      logged = step % config.log_every_steps == 0 or last
      evaluated = step % config.eval_every_steps == 0 or last
      saving = evaluated or step % config.checkpoint_every_steps == 0 or preempted
      if not (logged or saving):
        continue
      with jax.transfer_guard("allow"):  # the loop's sync points: metric fetches, evaluation, checkpoints
        host = metrics.fetch(sums)
        check_finite(host)
        if lock is not None:
          lock.check()  # another run took the workdir over (this one stalled): write nothing more
        if logged:
          synced.append((step, time.perf_counter()))
          train = metrics.means(host)
          skipped = int(metrics.fetch_array(state.skipped_steps))  # kept over resumes
          sums = jax.device_put(metrics.zeros(), replicated)
          writer.write_scalars(
            step,
            {
              "train/loss": train["loss"],
              "train/mae": train["mae"],
              "train/learning_rate": learning_rate(step - skipped),
              "train/nonfinite_steps": skipped,
            },
          )
          bar.set_postfix(loss=f"{train['loss']:.3f}", mae=f"{train['mae']:.2f}")
        if evaluated:
          with report.timed("eval"):
            eval_metrics = scoring.headline(b["evaluator"].run(state))
          writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
          probs = metrics.fetch_array(predict(state, sample_images))
          writer.write_images(
            step,
            {
              "eval/distributions": plots.distribution_figure_images(
                sample["image"], sample["age"], probs, np.asarray(b["steps"].bins), config.loss.sigma
              )
            },
          )
        if saving:
          ckpts.save(
            step, state, {checkpointing.BEST_METRIC: eval_metrics["mae"]} if evaluated else None, force=preempted
          )
        if preempted and not last:
          ckpts.wait()
          ckpts.close()
          print(f"preempted: saved checkpoint at step {step} in {ckpts.directory}; rerun the same command to resume")
          return None
  with jax.transfer_guard("allow"):
    ckpts.wait()
    if not eval_metrics:  # resumed exactly at the end: evaluate the restored state
      eval_metrics = scoring.headline(b["evaluator"].run(state))
    # Calibrate the checkpoint inference uses by default (the best), before final metrics mark the run done.
    best = ckpts.best_step()
    fitted = scoring.calibrate(
      b["evaluator"], state if best in (None, step) else ckpts.restore(state, best), workdir, config.data.eval_split
    )
    final = {
      "step": step,
      **{f"eval_{k}": v for k, v in eval_metrics.items()},
      "baseline_mae": metrics.mean_baseline_mae(b["train_data"].age, b["eval_data"].age),
      "best_step": ckpts.best_step(),
      "eval_split": config.data.eval_split,
      "train_steps_per_s": _steady_rate(synced),
      "first_step_s": first_step_s,
      "nonfinite_steps": int(metrics.fetch_array(state.skipped_steps)),
      "temperature": fitted["temperature"],
    }
  ckpts.close()
  if lock is not None:
    lock.check()
  _write_json(final_path, final)
  if jax.process_count() > 1:
    # No process exits before final_metrics.json exists: a restart loop on any host that checks
    # for it then stops instead of starting a run whose coordinator is gone.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("agejax final metrics written")
  if jax.process_index() == 0:
    print(summary(final))
  return final


def _steady_rate(synced: list[tuple[int, float]]) -> float | None:
  """Steps/s of the whole loop between the first and last log fetch (compilation excluded)."""
  if len(synced) < 2:
    return None
  (s0, t0), (s1, t1) = synced[0], synced[-1]
  return (s1 - s0) / (t1 - t0)


def summary(final: dict[str, Any]) -> str:
  """Formats final metrics as a short human-readable block."""
  ratio = final["eval_mae"] / final["baseline_mae"] if final["baseline_mae"] else float("nan")
  return "\n".join(
    [
      f"step {final['step']}  ({final['eval_split']} split)",
      f"  MAE            {final['eval_mae']:.3f} years  "
      f"(mean-age baseline {final['baseline_mae']:.3f}; ratio {ratio:.2f})",
      f"  epsilon-error  {final['eval_epsilon_error']:.4f}",
      f"  CS@5           {final['eval_cs5']:.4f}",
      f"  loss           {final['eval_loss']:.4f}",
      f"  temperature    {final.get('temperature', float('nan')):.3f}  (calibration.json, best checkpoint)",
    ]
  )
