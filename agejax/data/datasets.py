"""The agejax datasets: their TFDS builders by `config.data.name`, and preparing each once from its source."""

from etils import epath

from agejax import errors, parallel
from agejax.data import sources

# data.name -> (TFDS builder name, needs a manually downloaded folder)
DATASETS = {
  "demo": ("agejax_demo", False),
  "utkface": ("agejax_utkface", True),
  "csv_faces": ("agejax_csv_faces", True),
  "fae": ("agejax_fae", True),  # a database of the unified benchmark: its JSON + images (data/fae.py)
}
FILE_FORMATS = ("", "tfrecord", "array_record")  # prepare(file_format=...): '' is the path's default


def import_tfds():
  """Imports TFDS with TensorFlow kept off any GPU (JAX owns the accelerators)."""
  parallel.import_tensorflow()
  import tensorflow_datasets as tfds

  from agejax.data import builders, csv_faces, fae, utkface  # noqa: F401  (registers the builders)

  return tfds


def get_builder(name: str, data_dir: str = "", builder_config: str = "", image_size: int = 0):
  """Returns the TFDS builder of an agejax dataset name (`config.data.name`) and builder config.

  `builder_config` is a predefined config ('' for the default) or, for csv_faces and fae, a name of
  the user's own (`prepare_data.py csv_faces --name NAME`), so several datasets live side by side.
  `image_size` (fae only) is the crop size to prepare at; 0: the prepared one, else the benchmark's.
  """
  if name not in DATASETS:
    raise errors.UserError(f"config.data.name={name!r} is not one of {sorted(DATASETS)}")
  tfds = import_tfds()
  if name == "fae":
    return _fae_builder(tfds, data_dir, builder_config, image_size)
  cls = tfds.builder_cls(DATASETS[name][0])
  config = None
  if builder_config:
    # The config object rather than its name: TFDS looks a user-named config up in the prepared
    # files only, and would not know it when preparing.
    config = cls.get_builder_config(builder_config)
    if config is None:
      predefined = sorted(cls.builder_configs)
      hint = (
        "; a name of your own is 1-64 lowercase letters, digits, '_' or '-'"
        if name == "csv_faces"
        else "; only csv_faces takes names of your own"
      )
      raise errors.UserError(f"builder config {builder_config!r} of {name} is not one of {predefined}{hint}")
  return tfds.builder(DATASETS[name][0], config=config, data_dir=data_dir or None)


def _fae_builder(tfds, data_dir: str, builder_config: str, image_size: int):
  """The builder of a benchmark database named by the user, at its prepared crop size (or `image_size`)."""
  from agejax.data import fae

  if not builder_config:
    prepared = fae.prepared_names(data_dir)
    raise errors.UserError(
      "config.data.builder_config is empty: a fae dataset is the --name it was prepared with "
      f"(prepare_data.py fae --database FILE.json --images DIR --name NAME); prepared: {prepared or 'none'}"
    )
  size = image_size or fae.prepared_image_size(data_dir, builder_config) or fae.DEFAULT_IMAGE_SIZE
  config = fae.named_config(builder_config, size)
  if config is None:
    raise errors.UserError(
      f"fae dataset name {builder_config!r} or --image_size {size} is invalid: a name is 1-64 lowercase "
      f"letters, digits, '_' or '-', a size 8-4096"
    )
  return tfds.builder(DATASETS["fae"][0], config=config, data_dir=data_dir or None)


def prepare(
  name: str,
  data_dir: str = "",
  manual_dir: str = "",
  builder_config: str = "",
  rebuild: bool = False,
  *,
  database: str = "",
  image_size: int = 0,
  shared_subjects: str = "",
  beam_options: str = "",
  file_format: str = "",
):
  """Builds the TFDS dataset once (from `manual_dir` for downloaded datasets); returns the builder.

  A dataset prepared already is kept when `manual_dir` is the source it was prepared from (the
  fingerprint in its metadata matches) and refused with a ValueError when the source differs or
  changed since; `rebuild` deletes its version folder and prepares it again. The source is read
  (archives verified) before anything is written or deleted. For fae, `manual_dir` is the images
  folder, `database` the benchmark's database JSON, `image_size` the crop size (0: the benchmark's) and
  `shared_subjects` the folders whose subjects may repeat ('0,1' or 'all'; fae.parse_shared_subjects), a
  part of the source: preparing again with another value is refused as another source.

  `beam_options` (fae only; 'runner=DirectRunner,direct_num_workers=2', fae_beam.parse_options) prepares on
  Apache Beam through TFDS's Beam support; `file_format` is 'tfrecord' or 'array_record' (default:
  array_record on Beam, else TFDS's tfrecord).
  """
  tfds = import_tfds()
  if shared_subjects and name != "fae":
    raise errors.UserError(f"--shared_subjects={shared_subjects!r} is for fae databases only, not {name}")
  if beam_options and name != "fae":
    raise errors.UserError(f"--beam_options={beam_options!r} is for fae databases only, not {name}")
  if file_format not in FILE_FORMATS:
    raise errors.UserError(f"--file_format={file_format!r} is not one of {', '.join(filter(None, FILE_FORMATS))}")
  builder = get_builder(name, data_dir, builder_config, image_size)
  manual = DATASETS[name][1]
  if name == "fae":
    from agejax.data import fae

    shared = fae.parse_shared_subjects(shared_subjects)
    if not (database and manual_dir):
      raise errors.MissingInput(
        "fae needs the benchmark's database JSON and the images folder its img_path values are relative to: "
        "pass --database FILE.json --images DIR"
      )
    _check_fae_size(builder, data_dir, builder_config, image_size, rebuild)
    builder.database_path, builder.shared_subjects, builder.beam = database, shared, _beam_hooks(beam_options)
  source = builder.describe_source(manual_dir) if manual and manual_dir else None
  if builder.is_prepared():
    if rebuild:
      if manual and source is None:
        raise errors.UserError(
          f"rebuilding {name} deletes {builder.data_dir}: pass --manual_dir, the source to prepare it from again"
        )
      epath.Path(builder.data_dir).rmtree()
      builder = get_builder(name, data_dir, builder_config, image_size)
      if name == "fae":
        builder.database_path, builder.shared_subjects, builder.beam = database, shared, _beam_hooks(beam_options)
    elif source is not None:
      _check_same_source(name, builder, source)
  if not beam_options:
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None, try_download_gcs=False)
    builder.download_and_prepare(download_config=download_config, file_format=file_format or None)
    return builder
  from apache_beam.options.pipeline_options import PipelineOptions

  from agejax.data import fae_beam

  options = PipelineOptions.from_dictionary(fae_beam.parse_options(beam_options))
  download_config = tfds.download.DownloadConfig(
    manual_dir=manual_dir or None, try_download_gcs=False, beam_options=options
  )
  try:
    builder.download_and_prepare(download_config=download_config, file_format=file_format or "array_record")
  except Exception as e:  # a worker's UserError comes back wrapped by the runner: give the user its one line
    if (error := fae_beam.unwrap_error(e)) is not None:
      raise error from None
    raise
  return builder


def _beam_hooks(beam_options: str):
  """fae's Beam preparation (the fae_beam module) when beam options are given, else None."""
  if not beam_options:
    return None
  from agejax.data import fae_beam

  return fae_beam


def _check_fae_size(builder, data_dir: str, builder_config: str, image_size: int, rebuild: bool) -> None:
  """Refuses to prepare a fae dataset again at another crop size than it was prepared at (without rebuild)."""
  from agejax.data import fae

  prepared = fae.prepared_image_size(data_dir, builder_config)
  if image_size and prepared and prepared != image_size and not rebuild:
    raise errors.UserError(
      f"{builder.info.full_name} in {builder.data_dir_root} was prepared at --image_size {prepared}, not "
      f"{image_size}: pass --rebuild to prepare it again, or --name NAME to prepare it as another dataset"
    )


def _check_same_source(name: str, builder, source: dict) -> None:
  """Raises a one-line ValueError unless the prepared dataset was built from `source` as it is now."""
  recorded = (builder.info.metadata or {}).get("source") or {}
  if recorded.get("digest") == source["digest"]:
    return
  dataset = f"{builder.info.full_name} in {builder.data_dir_root}"
  if not recorded:
    problem = f"{dataset} has no record of its source, so {source['path']} can't be checked against it"
  elif recorded["path"] == source["path"]:
    problem = (
      f"{dataset} was prepared from {recorded['path']}, which has changed since "
      f"(different: {sources.differences(recorded, source)})"
    )
  else:
    problem = (
      f"{dataset} was prepared from {recorded['path']}, not from {source['path']} "
      f"(different: {sources.differences(recorded, source)})"
    )
  other = ", or --name NAME to prepare it as another dataset" if name in ("csv_faces", "fae") else ""
  raise errors.UserError(f"{problem}: pass --rebuild to delete it and prepare it again{other}")
