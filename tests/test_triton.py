"""OUT/triton/: a Triton model repository whose config.pbtxt is Triton's ModelConfig and agrees with model.onnx.

Triton itself is not run (no tritonserver here): the config is parsed with Triton's own protobuf
(tritonclient's model_config_pb2) and compared with the ONNX graph, and the repository's model.onnx
is run in onnxruntime against the export's ExportedPredictor.
"""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pipeline
import pytest
import tiny_run
from conftest import assert_same_distributions
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from agejax import errors, labels
from agejax.inference import export
from agejax.inference.export import jax_export, triton

REPOSITORY_FILES = ("triton/agejax/config.pbtxt", "triton/agejax/1/model.onnx")


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> tuple[Path, dict]:
  """(a private copy of the session's export of the learned tiny run, its manifest): every format, triton/ too."""
  return tiny_run.tiny_export(request, tmp_path_factory)


def read_config(out: Path) -> model_config_pb2.ModelConfig:
  return text_format.Parse((out / REPOSITORY_FILES[0]).read_text(), model_config_pb2.ModelConfig())


def disagreements(config: model_config_pb2.ModelConfig, graph: onnx.ModelProto) -> list[str]:
  """Where the config's inputs and outputs differ from the ONNX graph's, as Triton's onnxruntime backend compares them.

  Written here, apart from triton.mismatch, so that a fault in one is not hidden by the same fault in the other.
  """
  found = []
  onnx_types = {model_config_pb2.TYPE_UINT8: onnx.TensorProto.UINT8, model_config_pb2.TYPE_FP32: onnx.TensorProto.FLOAT}
  for declared, actual in ((config.input, graph.graph.input), (config.output, graph.graph.output)):
    tensors = {v.name: v.type.tensor_type for v in actual}
    if [t.name for t in declared] != list(tensors):
      found.append(f"names {[t.name for t in declared]} != {list(tensors)}")
      continue
    for t in declared:
      tensor = tensors[t.name]
      if onnx_types.get(t.data_type) != tensor.elem_type:
        found.append(f"{t.name}: {model_config_pb2.DataType.Name(t.data_type)} != element type {tensor.elem_type}")
      dims = list(tensor.shape.dim)
      if config.max_batch_size > 0:  # Triton adds the batch: model.onnx's first dimension, of any size
        batch, dims = dims[0], dims[1:]
        if not batch.dim_param:
          found.append(f"{t.name}: the batch dimension is not symbolic in model.onnx ({batch})")
      if [d.dim_value for d in dims] != list(t.dims):
        found.append(f"{t.name}: dims {list(t.dims)} (max_batch_size {config.max_batch_size}) != {tensor.shape}")
  return found


def traced_like(manifest: dict) -> jax_export.Traced:
  """A Traced with the manifest's facts and no function: all that triton.write reads of one."""
  bins = labels.age_bins(manifest["min_age"], manifest["max_age"])
  return jax_export.Traced(
    None,
    [],
    manifest["input_size"],
    tuple(manifest["platforms"]),
    None,
    np.zeros(0),
    np.zeros(0),
    bins,
    manifest["temperature"],
    manifest["flip"],
    manifest["eval_crop"],
    manifest.get("framing"),
  )


def test_the_config_is_tritons_model_config_and_agrees_with_the_onnx_graph(exported):
  out, manifest = exported
  assert manifest["files"]["triton"] == export.TRITON_DIR and "triton_skipped" not in manifest
  config = read_config(out)
  s, k = manifest["input_size"], manifest["num_bins"]
  assert (config.name, config.backend, config.platform) == ("agejax", "onnxruntime", "onnxruntime_onnx")
  assert config.max_batch_size == triton.MAX_BATCH_SIZE > 0
  assert config.dynamic_batching.max_queue_delay_microseconds == triton.MAX_QUEUE_DELAY_US > 0
  assert config.version_policy.latest.num_versions == 1
  assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_AUTO, 1)]
  ((given,), (returned,)) = config.input, config.output
  uint8, fp32 = model_config_pb2.TYPE_UINT8, model_config_pb2.TYPE_FP32
  assert (given.name, given.data_type, list(given.dims)) == (export.INPUT_NAME, uint8, [s, s, 3])
  assert given.format == model_config_pb2.ModelInput.FORMAT_NONE
  assert (returned.name, returned.data_type, list(returned.dims)) == (export.OUTPUT_NAME, fp32, [k])

  graph = onnx.load(out / REPOSITORY_FILES[1])
  assert disagreements(config, graph) == []
  assert triton.mismatch(config, graph) is None
  # Each way the two could part, made here: both checks see it.
  wrong_dims, wrong_type, unbatched = copy.deepcopy(config), copy.deepcopy(config), copy.deepcopy(config)
  wrong_dims.input[0].dims[0] = s + 1
  wrong_type.output[0].data_type = model_config_pb2.TYPE_FP16
  unbatched.max_batch_size = 0
  fixed_batch, renamed = copy.deepcopy(graph), copy.deepcopy(graph)
  fixed_batch.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # replaces the symbolic batch
  renamed.graph.output[0].name = "logits"
  for bad_config, bad_graph in ((wrong_dims, graph), (wrong_type, graph), (unbatched, graph), (config, fixed_batch)):
    assert disagreements(bad_config, bad_graph) and triton.mismatch(bad_config, bad_graph)
  assert disagreements(config, renamed) and "not model.onnx's" in triton.mismatch(config, renamed)


def test_the_config_states_what_a_client_sends_and_what_the_outputs_mean(exported):
  out, manifest = exported
  params = {key: value.string_value for key, value in read_config(out).parameters.items()}
  s = manifest["input_size"]
  assert (int(params["min_age"]), int(params["max_age"])) == (manifest["min_age"], manifest["max_age"])
  assert float(params["temperature"].split(":")[0]) == manifest["temperature"]
  assert params["flip"].startswith(str(manifest["flip"]).lower() + ":")
  assert float(params["eval_crop"].split(":")[0]) == manifest["eval_crop"]
  assert f"uint8 RGB face crops [N, {s}, {s}, 3]" in params["input"]
  assert "sum over i of probabilities[n, i] * (min_age + i)" in params["predicted_age"]
  # The tiny run's demo faces keep the fixed-margin crop (no framing record): the config says so.
  assert "framing" not in manifest and params["framing"].startswith("the fixed-margin crop")
  assert "\\'" not in (out / REPOSITORY_FILES[0]).read_text()  # plain text: no escaped quotes to read past


@pytest.mark.slow
def test_the_repositorys_model_onnx_is_the_exports_and_answers_as_the_exported_predictor(exported):
  out, manifest = exported
  assert (out / REPOSITORY_FILES[1]).read_bytes() == (out / export.ONNX_FILE).read_bytes()
  s = manifest["input_size"]
  crops = np.random.default_rng(1).integers(0, 256, (5, s, s, 3), dtype=np.uint8)
  crops[0] = export.reference_crop(s)[0]
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # errors only: its shape-merging warnings are about intermediate values
  session = onnxruntime.InferenceSession(str(out / REPOSITORY_FILES[1]), options, providers=["CPUExecutionProvider"])
  got = session.run(None, {export.INPUT_NAME: crops})[0]
  predictor = export.ExportedPredictor(out, batch_size=1)  # compiles once, for the batch of 1 its load checks
  assert_same_distributions(got, predictor(crops))
  params = {key: value.string_value for key, value in read_config(out).parameters.items()}
  ages = np.arange(int(params["min_age"]), int(params["max_age"]) + 1, dtype=np.float64)
  expected_age = got[0].astype(np.float64) @ ages  # the config's rule, on the reference crop
  assert abs(expected_age - manifest["reference"]["expected_age"]) < 1e-4


def test_the_writer_makes_the_same_config_from_the_manifests_facts_and_refuses_a_disagreeing_one(exported, tmp_path):
  """The repository is a function of the traced facts; a config that would part from model.onnx is not written."""
  out, manifest = exported
  stage = tmp_path / "stage"
  stage.mkdir()
  shutil.copy(out / export.ONNX_FILE, stage / export.ONNX_FILE)
  traced = traced_like(manifest)
  assert triton.write(traced, str(stage / "triton")) is None
  for name in REPOSITORY_FILES:
    assert (stage / name).read_bytes() == (out / name).read_bytes(), name

  bigger = traced_like({**manifest, "input_size": manifest["input_size"] + 1})
  why = triton.write(bigger, str(tmp_path / "stage" / "other"))
  assert why and why.startswith("its config.pbtxt would disagree with model.onnx: input 'images' has dims"), why
  assert not (stage / "other").exists()

  (stage / export.ONNX_FILE).unlink()
  why = triton.write(traced, str(stage / "again"))
  assert why and why.startswith("model.onnx was not written") and not (stage / "again").exists(), why


def test_without_tritonclient_the_repository_is_skipped_naming_it(exported, tmp_path, monkeypatch):
  out, manifest = exported
  shutil.copy(out / export.ONNX_FILE, tmp_path / export.ONNX_FILE)

  def missing():
    raise ImportError("No module named 'tritonclient'")

  monkeypatch.setattr(triton, "tools", missing)
  why = triton.write(traced_like(manifest), str(tmp_path / "triton"))
  assert why == "tritonclient is not installed (No module named 'tritonclient'; pip install 'tritonclient[grpc]')"
  assert not (tmp_path / "triton").exists()


@pytest.mark.slow
def test_verify_checksums_the_repository_and_sees_a_changed_config(exported, tmp_path):
  out = Path(shutil.copytree(exported[0], tmp_path / "out"))
  predictor = export.verify(out)
  assert set(REPOSITORY_FILES) <= set(predictor.manifest["sha256"])
  config = out / REPOSITORY_FILES[0]
  config.write_text(config.read_text().replace("max_batch_size: 32", "max_batch_size: 8"))
  with pytest.raises(errors.UserError, match=r"config.pbtxt: SHA-256 .* differs from the manifest's"):
    export.verify(out)
  shutil.copy(exported[0] / REPOSITORY_FILES[0], config)
  (out / "triton/agejax/2").mkdir()
  shutil.copy(out / export.ONNX_FILE, out / "triton/agejax/2/model.onnx")  # a version added by hand
  with pytest.raises(errors.UserError, match=r"triton/agejax/2/model.onnx: not listed in"):
    export.verify(out)


@pytest.mark.slow
def test_the_script_without_onnx_skips_the_repository_with_the_reason(exported, request, tmp_path_factory):
  _, workdir = tiny_run.tiny_run(request, tmp_path_factory)
  out = tmp_path_factory.mktemp("noonnx") / "out"
  proc = pipeline.run(
    "scripts/export.py", "--workdir", str(workdir), "--output", str(out), "--nosaved_model", "--noonnx"
  )
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  assert (manifest["files"]["onnx"], manifest["files"]["triton"]) == (None, None)
  assert manifest["triton_skipped"].startswith("model.onnx was not written (--noonnx"), manifest["triton_skipped"]
  assert f"{out}/triton/: not written: model.onnx was not written" in proc.stdout, proc.stdout
  assert not (out / export.TRITON_DIR).exists()
