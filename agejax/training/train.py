"""train_and_evaluate(config, workdir): the whole training job, importable from a notebook."""

import dataclasses
import functools
import logging
import math
import time
import typing
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from etils import epath

from agejax import errors, metrics, models, parallel, settings, storage
from agejax.data import datasets, framing, pipeline, splits, streaming
from agejax.evaluation import age_checks, calibration, plots, scoring
from agejax.training import checkpointing, configuration, learner, losses, preemption, profiling, workdir_lock

FINAL_METRICS = "final_metrics.json"
TEST_SPLIT = "test"  # scored with the best checkpoint at the end of every run, when the dataset has it
# config.evals[i].every_steps: scored once, after training, on the best checkpoint (cross-dataset test sets).
AT_THE_END = -1


@dataclasses.dataclass
class Built:
  """Everything a run is made of, built from its settings before the loop starts."""

  mesh: jax.sharding.Mesh
  train_data: pipeline.ArraySplit | pipeline.StreamedSplit  # StreamedSplit: data.reader='grain'
  eval_data: pipeline.ArraySplit
  schedule: optax.Schedule
  state: learner.TrainState
  learner: learner.Learner
  train_step: Any  # jitted (state, sums, batch) -> (state, sums, loss)
  evaluator: scoring.Evaluator
  test_evaluator: scoring.Evaluator | None  # the test split's (None: the dataset has none); eval's compiled steps
  steps_per_epoch: int
  cfg: settings.Settings  # the run's settings with its length and intervals in steps (`in_steps`)
  extra_evals: dict[str, tuple[settings.ExtraEval, scoring.Evaluator]]  # config.evals by name
  train_stream: streaming.TrainStream | None = None  # data.reader='grain': this process's batches through Grain


def pretrained(cfg: settings.Settings, resumed: epath.Path | None = None) -> tuple[Any, models.InputSpec | None]:
  """(the overlay of the initial weights, the input those weights expect), or (None, None) from scratch.

  `model.init_from` (another run's trained network) replaces `model.pretrained` (a converted backbone).
  A run resumed in workdir `resumed` never reads init_from's run: it restores its own checkpoint, whose
  input its inference.json records.
  """
  if cfg.model.init_from:
    if resumed is not None:
      return None, checkpointing.recorded_input_spec(resumed)
    workdir, _ = checkpointing.parse_init_from(cfg.model.init_from)
    head = models.get(cfg.model.name).head
    overlay = functools.partial(
      checkpointing.weights_from_run, cfg.model.init_from, cfg.labels, head=head, with_head=cfg.model.init_from_head
    )
    return overlay, checkpointing.recorded_input_spec(workdir)
  if not cfg.model.pretrained:
    return None, None
  from agejax import convert

  head = models.get(cfg.model.name).head
  overlay = functools.partial(convert.backbone_from_converted, cfg.model.pretrained, head=head)
  return overlay, convert.input_spec(cfg.model.pretrained)


def extra_eval_data(cfg: settings.Settings, extra: settings.ExtraEval) -> pipeline.ArraySplit:
  """The split one of config.evals scores: another dataset (or builder config) of the same data_dir by default."""
  same = (extra.dataset, extra.builder_config) == (cfg.data.name, cfg.data.builder_config)
  data = dataclasses.replace(
    cfg.data,
    name=extra.dataset,
    builder_config=extra.builder_config,
    data_dir=extra.data_dir or cfg.data.data_dir,
    # data.split's folders are the training dataset's; "all" is every folder, whatever the split
    split=cfg.data.split if same and extra.split != pipeline.ALL_FOLDERS else "",
  )
  return pipeline.load_labelled_split(data, cfg.labels, extra.split)


def test_data(cfg: settings.Settings) -> pipeline.ArraySplit | None:
  """The test split (with data.split, the split's test part), labels applied; None, said in one line, without one."""
  if not splits.normalise(cfg.data.split):  # with data.split, the pipeline's test split is the split's test folders
    builder = datasets.get_builder(cfg.data.name, cfg.data.data_dir, cfg.data.builder_config)
    if TEST_SPLIT not in builder.info.splits:
      logging.warning("%s has no %r split: final_metrics.json gets no test scores", cfg.data.name, TEST_SPLIT)
      return None
  return pipeline.load_labelled_split(cfg.data, cfg.labels, TEST_SPLIT)


def in_steps(cfg: settings.Settings, steps_per_epoch: int) -> settings.Settings:
  """The settings with num_epochs turned into num_train_steps, and intervals of 0 into once an epoch.

  An epoch is ceil(training examples / batch_size) steps, the update count of a PyTorch DataLoader
  that keeps the last partial batch (the benchmark's); agejax's batches are always full, the next
  epoch's permutation filling the last one.
  """
  run = cfg.run
  changes: dict[str, Any] = {}
  if run.num_epochs > 0:
    changes["num_train_steps"] = max(1, round(run.num_epochs * steps_per_epoch))
  for key in ("eval_every_steps", "checkpoint_every_steps"):
    if getattr(run, key) == 0:
      changes[key] = steps_per_epoch
  return dataclasses.replace(cfg, run=dataclasses.replace(run, **changes)) if changes else cfg


def build(cfg: settings.Settings, resumed: epath.Path | None = None, reader: str = streaming.CACHE) -> Built:
  """Creates the mesh, data, learner, initial state, jitted train step and evaluators of validated settings.

  `resumed`: the workdir whose checkpoint will replace the initial state (its initial weights are not read).
  `reader`: how the training split is read, 'cache' or 'grain' (pipeline.train_reader).
  """
  mesh = parallel.make_mesh()
  if reader == streaming.GRAIN:
    train_data: pipeline.ArraySplit | pipeline.StreamedSplit = pipeline.streamed_train_split(cfg.data, cfg.labels)
  else:
    train_data = pipeline.load_labelled_split(cfg.data, cfg.labels, "train", training=True)
  eval_data = pipeline.load_labelled_split(cfg.data, cfg.labels, cfg.data.eval_split)
  test = test_data(cfg)
  steps_per_epoch = math.ceil(len(train_data) / cfg.run.batch_size)
  cfg = in_steps(cfg, steps_per_epoch)
  overlay, spec = pretrained(cfg, resumed)
  fns, state, schedule = learner.create(cfg, steps_per_epoch, overlay=overlay, input_spec=spec)
  replicated = parallel.replicated(mesh)
  evaluator = fns.evaluator(eval_data, mesh)
  return Built(
    mesh=mesh,
    train_data=train_data,
    eval_data=eval_data,
    schedule=schedule,
    state=jax.device_put(state, replicated),
    learner=fns,
    train_step=learner.jit_train_step(fns, replicated, parallel.data_sharded(mesh)),
    evaluator=evaluator,
    test_evaluator=None if test is None else evaluator.on(test),  # the eval steps: nothing compiles again
    steps_per_epoch=steps_per_epoch,
    cfg=cfg,
    extra_evals={e.name: (e, fns.evaluator(extra_eval_data(cfg, e), mesh)) for e in cfg.eval.evals},
    train_stream=None
    if reader != streaming.GRAIN
    else streaming.train_stream(
      typing.cast(pipeline.StreamedSplit, train_data).files,
      len(train_data),
      cfg.run,
      cfg.data,
      cfg.labels,
      cfg.run.num_train_steps,
    ),
  )


def _write_json(path: epath.Path, obj: dict) -> None:
  if jax.process_index() == 0:
    storage.write_json(path, obj)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: storage.Location) -> dict[str, Any] | None:
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
  if checkpointing.has_checkpoints(workdir):  # a rerun: a config that does not fit it is the first thing to say
    _check_recorded_config(config, storage.path(workdir))
  cfg = configuration.validate(config)
  if cfg.model.init_from and not checkpointing.has_checkpoints(workdir):
    configuration.check_init_source(cfg)  # a new run: the run it starts from must exist, before anything is written
  # A missing bucket, a read-only folder or an unreachable endpoint fails here, before any compilation.
  directory = storage.check_writable(workdir)
  parallel.enable_compilation_cache(cfg.run.compilation_cache_dir)
  try:
    with preemption.Preemption() as signalled, workdir_lock.hold(directory) as lock:
      reader = pipeline.train_reader(cfg.data)  # grain: the input's position is saved with every checkpoint
      ckpts = checkpointing.Checkpoints(
        directory / "checkpoints", cfg.run.keep_checkpoints, input_state=reader == streaming.GRAIN
      )
      try:
        return _Run(config, cfg, directory, ckpts, lock, signalled, started, reader).train()
      finally:
        ckpts.close()
  except preemption.Stopped:
    print(f"stopped by SIGTERM before training started: nothing to save in {directory}")
    return None


def _check_recorded_config(config, workdir: epath.Path) -> None:
  """Fails in one line when `config` changes what WORKDIR's checkpoints mean (see configuration.check_resume)."""
  recorded = workdir / checkpointing.CONFIG_FILE
  if recorded.exists():
    configuration.check_resume(config, storage.read_json_object(recorded), recorded)
  else:
    logging.warning("%s has checkpoints but no config.json: only their array shapes are checked", workdir)


class _Run:
  """One call of train_and_evaluate, holding the workdir's lock: start-up, the loop, the end."""

  def __init__(
    self,
    config,
    cfg: settings.Settings,
    workdir: epath.Path,
    ckpts: checkpointing.Checkpoints,
    lock: workdir_lock.WorkdirLock | None,
    signalled: preemption.Preemption,
    started: float,
    reader: str = streaming.CACHE,
  ):
    self.config, self.cfg, self.workdir, self.ckpts = config, cfg, workdir, ckpts
    self.lock, self.signalled, self.started, self.reader = lock, signalled, started, reader
    self.eval_metrics: dict[str, Any] = {}
    self.extra_metrics: dict[str, dict[str, Any]] = {}
    self.synced: list[tuple[int, float]] = []  # (step, time) at each log fetch, where the host has synced
    self.first_step_s: float | None = None

  def train(self) -> dict[str, Any] | None:
    """Resumes or starts, runs the loop, and finishes (calibration, final metrics)."""
    from clu import metric_writers

    final_path = self.workdir / FINAL_METRICS
    with jax.transfer_guard("allow"):  # start-up moves data freely; the loop below does not
      resuming = self.ckpts.latest_step() is not None
      b = self.b = build(self.cfg, self.workdir if resuming else None, self.reader)
      self.cfg = b.cfg  # the length in steps
      if self.cfg.run.num_epochs > 0 and jax.process_index() == 0:
        run = self.cfg.run
        print(f"{run.num_epochs:g} epochs of {b.steps_per_epoch} steps: {run.num_train_steps} steps")
      state = b.state
      latest = self.ckpts.latest_step()
      finished = latest is not None and latest >= self.cfg.run.num_train_steps and final_path.exists()
      if latest is not None:
        if jax.process_index() == 0 and not finished:
          print(f"resuming from step {latest} of {self.ckpts.directory}")
        state = self.ckpts.restore(state)
        if b.train_stream is not None:  # where the Grain input stopped, before the loop starts it again
          self.ckpts.restore_position(b.train_stream.position, latest)
      start = int(state.step)
      # What inference needs besides the weights: predict.py, evaluate.py and exports never ask the dataset.
      # The training crops' framing, measured once when the run starts (process 0 writes the record).
      inference_file = self.workdir / checkpointing.INFERENCE_FILE
      face_framing = None
      if jax.process_index() == 0:
        face_framing = framing.recorded(inference_file) if start else framing.framing_record(self.cfg, b.train_data)
      record = checkpointing.inference_record(self.cfg, b.learner.model, b.train_data.images.shape[1], face_framing)
      _write_json(inference_file, record)
      if start >= self.cfg.run.num_train_steps and final_path.exists():
        final = storage.read_json_object(final_path)
        if jax.process_index() == 0:
          print(f"{self.workdir} finished at step {start}: nothing to train (raise num_train_steps to go on)")
          print(summary(final))
        return final
      # Only now: a config that does not fit the workdir's checkpoints must not replace the one that does.
      _write_json(self.workdir / checkpointing.CONFIG_FILE, self.config.to_dict())
      self.signalled.arm()  # from here a SIGTERM saves a checkpoint at the current step
      self.writer = metric_writers.create_default_writer(str(self.workdir), just_logging=jax.process_index() > 0)
    with metric_writers.ensure_flushes(self.writer):
      last_state, step = self.loop(state, start)
      if last_state is None:
        return None  # preempted
      final = self.finish(last_state, step)
    _write_json(final_path, final)
    if jax.process_count() > 1:
      # No process exits before final_metrics.json exists: a restart loop on any host that checks
      # for it then stops instead of starting a run whose coordinator is gone.
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("agejax final metrics written")
    if jax.process_index() == 0:
      print(summary(final))
    return final

  def loop(self, state: learner.TrainState, start: int) -> tuple[learner.TrainState | None, int]:
    """The train steps from `start`; returns the last state and step, or (None, step) when preempted."""
    from clu import periodic_actions
    from tqdm.auto import tqdm

    b, run, ckpts = self.b, self.cfg.run, self.ckpts
    replicated = parallel.replicated(b.mesh)
    with jax.transfer_guard("allow"):
      self._sample_distributions_setup()
      report = periodic_actions.ReportProgress(num_train_steps=run.num_train_steps, writer=self.writer)
      if b.train_stream is not None:
        host_batches = b.train_stream.batches(start)
      else:
        batches = pipeline.TrainBatches(typing.cast(pipeline.ArraySplit, b.train_data), run.batch_size, run.seed)
        host_batches = (batches.local_batch(s) for s in range(start, run.num_train_steps))
      stream = pipeline.device_prefetch(host_batches, parallel.data_sharded(b.mesh))
      sums = jax.device_put(metrics.zeros(), replicated)  # donated to the step: a fresh one after each log
    # The device keeps two steps queued, the host never runs ahead unboundedly, and the progress bar
    # shows real speed.
    in_flight = parallel.InFlight()
    profiler = profiling.Profiler(self.workdir, run.profile_steps, run.log_every_steps, start)
    step = start
    with tqdm(total=run.num_train_steps, initial=start, desc="train", disable=jax.process_index() > 0) as bar:
      for step in range(start + 1, run.num_train_steps + 1):
        profiler.before(step)
        state, sums, loss = b.train_step(state, sums, next(stream))
        if self.first_step_s is None:
          loss.block_until_ready()  # once: time to the first finished step (start-up + compilation)
          self.first_step_s = time.perf_counter() - self.started
        in_flight.add(loss)
        report(step)
        bar.update()
        last = step == run.num_train_steps
        profiler.after(step, in_flight, last)
        # All processes must stop at the same step: with several, JAX's preemption sync point decides.
        preempted = ckpts.reached_preemption(step) if jax.process_count() > 1 else bool(self.signalled)
        logged = step % run.log_every_steps == 0 or last
        evaluated = step % run.eval_every_steps == 0 or last
        extras = [
          name
          for name, (e, _) in b.extra_evals.items()
          if e.every_steps != AT_THE_END and (last or step % (e.every_steps or run.eval_every_steps) == 0)
        ]
        saving = evaluated or step % run.checkpoint_every_steps == 0 or preempted
        if not (logged or saving or extras):
          continue
        with jax.transfer_guard("allow"):  # the loop's sync points: metric fetches, evaluation, checkpoints
          host = metrics.fetch(sums)
          self._check_finite(host)
          if self.lock is not None:
            self.lock.check()  # another run took the workdir over (this one stalled): write nothing more
          if logged:
            sums = jax.device_put(metrics.zeros(), replicated)
            self._log_train(step, state, host, bar)
          if evaluated:
            with report.timed("eval"):
              self._evaluate(step, state)
          for name in extras:
            self._evaluate_extra(step, state, name)
          if saving:
            scored = checkpointing.checkpoint_metrics(self.eval_metrics, self.cfg.eval.select_by) if evaluated else None
            position = None if b.train_stream is None else b.train_stream.position.at(step)
            ckpts.save(step, state, scored, force=preempted, position=position)
          if preempted and not last:
            ckpts.wait()
            ckpts.close()
            print(f"preempted: saved checkpoint at step {step} in {ckpts.directory}; rerun the same command to resume")
            return None, step
    return state, step

  def _sample_distributions_setup(self) -> None:
    """A few eval faces, drawn with their target and predicted distributions at every evaluation."""
    b = self.b
    self.sample = b.eval_data.gather(np.arange(min(4, len(b.eval_data))))
    self.sample_images = jax.device_put(self.sample["image"], parallel.replicated(b.mesh))
    self.predict = jax.jit(b.learner.model.distributions)

  def _learning_rate(self, applied: int) -> float:
    """The rate of the last update (after `applied` updates; skipped steps do not advance the schedule), on the host."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's own: no accelerator round trip
      return float(self.b.schedule(applied - 1))

  def _check_finite(self, host_sums: dict[str, float]) -> None:
    if host_sums["nonfinite_step"] and self.cfg.run.nonfinite == "stop":
      self.ckpts.wait()  # earlier (finite) checkpoints complete; this state is never saved
      self.ckpts.close()
      raise errors.Diverged(
        f"non-finite loss or gradient at step {int(host_sums['nonfinite_step'])} (run stopped; latest "
        f"checkpoint: step {self.ckpts.latest_step()}); lower optimizer.learning_rate, or set "
        f"config.nonfinite='skip' to skip such steps"
      )

  def _log_train(self, step: int, state: learner.TrainState, host: dict[str, float], bar) -> None:
    self.synced.append((step, time.perf_counter()))
    train = metrics.means(host)
    skipped = int(metrics.fetch_array(state.skipped_steps))  # kept over resumes
    self.writer.write_scalars(
      step,
      {
        "train/loss": train["loss"],
        "train/mae": train["mae"],
        "train/learning_rate": self._learning_rate(step - skipped),
        "train/nonfinite_steps": skipped,
      },
    )
    bar.set_postfix(loss=f"{train['loss']:.3f}", mae=f"{train['mae']:.2f}")

  def _evaluate(self, step: int, state: learner.TrainState) -> None:
    b, threshold = self.b, self.cfg.eval.age_check
    if threshold:  # the age-check rates too (point rates, from the same pass): eval/fpr_challenge25, ...
      report = b.evaluator.run_age_checks(state, threshold, self.cfg.eval.age_check_target_fpr)
    else:
      report = b.evaluator.run(state)
    self.eval_metrics = scoring.headline(report)
    scalars = {f"eval/{k}": v for k, v in self.eval_metrics.items() if v is not None}
    if threshold:
      scalars.update({f"eval/{k}": v for k, v in age_checks.headline(report).items() if v is not None})
    self.writer.write_scalars(step, scalars)
    probs = metrics.fetch_array(self.predict(state, self.sample_images))
    bins = np.asarray(b.learner.model.bins)
    sigma = losses.target_sigma(self.cfg.loss, jax.numpy.asarray(self.sample["age_std"]))  # each face's, as trained
    figure = plots.distribution_figure_images(
      self.sample["image"],
      self.sample["age"],
      probs,
      bins,
      np.asarray(sigma),
      mean_preserving=self.cfg.loss.target == "mean_preserving",
    )
    self.writer.write_images(step, {"eval/distributions": figure})

  def _evaluate_extra(self, step: int, state: learner.TrainState, name: str) -> None:
    self.extra_metrics[name] = scoring.headline(self.b.extra_evals[name][1].run(state))
    scalars = {f"eval/{name}/{k}": v for k, v in self.extra_metrics[name].items() if v is not None}
    self.writer.write_scalars(step, scalars)

  def finish(self, state: learner.TrainState, step: int) -> dict[str, Any]:
    """After the last step: the calibration of the best checkpoint and the final metrics."""
    b, ckpts = self.b, self.ckpts
    with jax.transfer_guard("allow"):
      ckpts.wait()
      if not self.eval_metrics:  # resumed exactly at the end: evaluate the restored state
        self.eval_metrics = scoring.headline(b.evaluator.run(state))
      # Calibrate the checkpoint inference uses by default (the best), before final metrics mark the run done.
      best = ckpts.best_step()
      scored = state if best in (None, step) else ckpts.restore(state, best)
      for name, (extra, evaluator) in b.extra_evals.items():
        if extra.every_steps == AT_THE_END:  # a test set of another database: the best checkpoint's scores
          self.extra_metrics[name] = {**scoring.headline(evaluator.run(scored)), "step": best or step}
        elif name not in self.extra_metrics:
          self.extra_metrics[name] = scoring.headline(evaluator.run(state))
      fitted = scoring.calibrate(b.evaluator, scored, self.workdir, self.cfg.data.eval_split)
      way = fitted[calibration.way(b.evaluator.flip)]  # the way the eval split is scored (eval.flip)
      final = {
        "step": step,
        **{f"eval_{k}": v for k, v in self.eval_metrics.items()},
        "baseline_mae": metrics.mean_baseline_mae(b.train_data.age, b.eval_data.age),
        "best_step": ckpts.best_step(),
        "eval_split": self.cfg.data.eval_split,
        "train_steps_per_s": _steady_rate(self.synced),
        "first_step_s": self.first_step_s,
        "nonfinite_steps": int(metrics.fetch_array(state.skipped_steps)),
        "temperature": way["temperature"],
        **self._test_scores(step, scored, calibration.Calibration.from_fit(way)),
      }
      if self.extra_metrics:
        final["evals"] = self.extra_metrics
    ckpts.close()
    if self.lock is not None:
      self.lock.check()
    return final

  def _test_scores(self, step: int, state: learner.TrainState, fitted: calibration.Calibration) -> dict[str, Any]:
    """The best checkpoint on the test split as evaluate.py scores it, with the calibration just fitted.

    The point scores are the raw model's, as eval_mae's; the calibration shapes only the coverage.
    The coverage of the interval users see, by age bucket, also goes to TensorBoard (test/...).
    """
    if self.b.test_evaluator is None:
      return {}
    report, per_example = self.b.test_evaluator.run(state, temperature=fitted, outputs=True)
    scores = scoring.headline(report)
    if self.cfg.eval.age_check:  # the rule chosen on the eval split, scored on test, as evaluate.py --age_check
      report["age_check"] = scoring.age_check(
        self.b.test_evaluator, state, fitted, per_example, self.b.evaluator, self.cfg.eval.age_check,
        self.cfg.eval.age_check_target_fpr, (self.cfg.data.eval_split, TEST_SPLIT),
      )  # fmt: skip
    checks = {f"test_{k}": v for k, v in age_checks.headline(report).items()}
    c = report["calibration"]
    by_bucket = {name: b["coverage_shown"]["0.8"] for name, b in c["coverage_by_bucket"].items()}
    scalars = {f"test/coverage80_shown/{name}": v for name, v in by_bucket.items() if v is not None}
    for grouping, entries in c["coverage_by_group"].items():
      shown = {f"test/coverage80_shown/{grouping}/{g}": e["coverage_shown"]["0.8"] for g, e in entries.items()}
      scalars.update({k: v for k, v in shown.items() if v is not None})
    scalars.update({f"test/{k[len('test_') :]}": v for k, v in checks.items() if v is not None})
    self.writer.write_scalars(step, {**scalars, "test/coverage80_shown": c["coverage_shown"]["0.8"]})
    return {
      **{f"test_{k}": scores[k] for k in ("mae", "cs5", "epsilon_error", "mae_minors", "bench_mae", "bench_cs5")},
      # The share of test ages inside the central 90% interval of their calibrated distribution
      # (randomized PIT: whether the distributions are calibrated).
      "test_coverage90": c["coverage"]["0.9"],
      # The share inside the 80% interval users are shown (whole years, adjusted by age bucket), overall and by bucket.
      "test_coverage80_shown": c["coverage_shown"]["0.8"],
      "test_coverage80_shown_by_bucket": by_bucket,
      # NIST's age-check rates of the point prediction (Challenge-21/25/30 FPR, 13-16 TPR and FPR, MAE
      # 18-30 over sex and age) and, with eval.age_check, the chosen rule's p and test FPR and FNR.
      **checks,
    }


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
      *(
        [f"  benchmark's    MAE {final['eval_bench_mae']:.3f}  CS@5 {final['eval_bench_cs5']:.4f}  (posterior median)"]
        if final.get("eval_bench_mae") is not None
        else []
      ),
      f"  loss           {final['eval_loss']:.4f}",
      f"  temperature    {final.get('temperature', float('nan')):.3f}  (calibration.json, best checkpoint)",
      *(
        [
          f"  test split     MAE {final['test_mae']:.3f}  CS@5 {final['test_cs5']:.4f}  "
          f"80% interval holds {final['test_coverage80_shown']:.3f}  (best checkpoint, calibrated)"
        ]
        if "test_mae" in final
        else []
      ),
    ]
  )
