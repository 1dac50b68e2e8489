"""Tests for the UTKFace builder and the face helpers it shares: names, splits, skips, images."""

import io
import re
import tarfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import data_settings
from PIL import Image

from agejax.data import datasets, faces, pipeline, utkface
from agejax.data.utkface import assign_split, parse_utkface_name

SIZE = 32  # the `tiny` builder config
FRACTIONS = dict(zip(utkface.SPLITS, utkface.UtkfaceConfig(name="x").split_fractions))
# The three real UTKFace chips whose name misses the race field.
MALFORMED = [
  "39_1_20170116174525125.jpg.chip.jpg",
  "61_1_20170109150557335.jpg.chip.jpg",
  "61_1_20170109142408075.jpg.chip.jpg",
]


# --- parse_utkface_name ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name, expected",
  [
    ("1_0_0_20161219140623097.jpg.chip.jpg", (1, "male", "white", "20161219140623097")),
    ("116_1_4_20170120134639935.jpg.chip.jpg", (116, "female", "others", "20170120134639935")),
    ("UTKFace/sub/26_1_3_20170104235421282.jpg", (26, "female", "indian", "20170104235421282")),
    ("35_0_1_20170117135403519.jpg.chip.jpg", (35, "male", "black", "20170117135403519")),
    ("28_1_2_20170116175722548.jpg.chip.jpg", (28, "female", "asian", "20170116175722548")),
    # The three real names without the race field: gender kept, race unknown.
    ("39_1_20170116174525125.jpg.chip.jpg", (39, "female", "unknown", "20170116174525125")),
    ("61_1_20170109150557335.jpg.chip.jpg", (61, "female", "unknown", "20170109150557335")),
    ("61_1_20170109142408075.jpg.chip.jpg", (61, "female", "unknown", "20170109142408075")),
    ("40_0_20170116184028385.png", (40, "male", "unknown", "20170116184028385")),
    # Without the gender field (empty), or without both.
    ("53__0_20170116184028385.jpg.chip.jpg", (53, "unknown", "white", "20170116184028385")),
    ("53___20170116184028385.jpg.chip.jpg", (53, "unknown", "unknown", "20170116184028385")),
    ("39_20170116174525125.jpg.chip.jpg", (39, "unknown", "unknown", "20170116174525125")),
    ("25_7_9_20170116184028385.jpg", (25, "unknown", "unknown", "20170116184028385")),  # codes out of range
    ("25_2_5_20170116184028385.jpg", (25, "unknown", "unknown", "20170116184028385")),  # one past the last
    ("40.jpg", (40, "unknown", "unknown", "")),
    ("007_0_2.jpg", (7, "male", "asian", "")),
    ("-3_0_1_20170116184028385.jpg", (-3, "male", "black", "20170116184028385")),  # the builder skips it
    ("24_0_1_20170116220224657 .jpg.chip.jpg", (24, "male", "black", "20170116220224657")),  # two quirks of the archive
    ("55_0_0_20170116232725357jpg.chip.jpg", (55, "male", "white", "20170116232725357")),
  ],
)
def test_parse_good_and_malformed_names(name, expected):
  parsed = parse_utkface_name(name)
  assert parsed == dict(zip(("age", "gender", "race", "date"), expected))
  assert parsed["gender"] in utkface.GENDERS and parsed["race"] in utkface.RACES


def test_group_names_follow_utkface_codes_with_unknown_last():
  assert utkface.GENDERS == ("male", "female", "unknown")
  assert utkface.RACES == ("white", "black", "asian", "indian", "others", "unknown")
  for gender in range(2):
    for race in range(5):
      parsed = parse_utkface_name(f"30_{gender}_{race}_20170116174525125.jpg.chip.jpg")
      assert (utkface.GENDERS.index(parsed["gender"]), utkface.RACES.index(parsed["race"])) == (gender, race)


@pytest.mark.parametrize(
  "name",
  [
    "",
    "notes.txt",
    "IMG_1234.jpg",
    ".DS_Store",
    "._25_0_1_20170116184028385.jpg",
    "abc_0_1_20170116184028385.jpg",
    "25a_0_1_20170116184028385.jpg",
    "25_0_1_2_20170116184028385.jpg",
    "25_x_1_20170116184028385.jpg",
    "25 _0_1.jpg",
    "25_0_1 .jpg",
    "25_0_1_2017jpgx.jpg",
    "\u0662\u0665_0_1_20170116184028385.jpg",
  ],
)
def test_parse_garbage_names(name):
  assert parse_utkface_name(name) is None


# --- assign_split ---------------------------------------------------------------------------------


def test_split_depends_on_base_name_and_seed_only():
  names = [f"{i % 90 + 1}_{i % 2}_{i % 5}_2017{i:013d}.jpg.chip.jpg" for i in range(20_000)]
  splits = [assign_split(n, FRACTIONS, seed=0) for n in names]
  assert splits == [assign_split(f"a/b/{n}", FRACTIONS, seed=0) for n in names]
  for split, fraction in FRACTIONS.items():
    assert abs(splits.count(split) / len(names) - fraction) < 0.01
  reseeded = [assign_split(n, FRACTIONS, seed=1) for n in names]
  assert 0.25 < np.mean([a != b for a, b in zip(splits, reseeded)]) < 0.45  # ~1 - (.8^2 + 2 * .1^2)


def test_split_fractions_zero_and_invalid():
  no_test = {"train": 0.9, "validation": 0.1, "test": 0.0}
  assert {assign_split(f"{i}_0_0_1.jpg", no_test, 0) for i in range(2000)} == {"train", "validation"}
  with pytest.raises(ValueError, match="split_fractions"):
    utkface.UtkfaceConfig(name="bad", split_fractions=(0.5, 0.5, 0.5))
  with pytest.raises(ValueError, match="split_fractions"):
    utkface.UtkfaceConfig(name="bad", split_fractions=(0.0, 0.5, 0.5))


# --- faces.load_rgb and SkipCounter ---------------------------------------------------------------


def _encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _jpeg(rng, shape=(40, 40)) -> bytes:
  return _encode(Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)))


def test_load_rgb_keeps_an_already_sized_face_exactly():
  pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  out = faces.load_rgb(_encode(Image.fromarray(pixels), "PNG"), SIZE)
  assert out.dtype == np.uint8 and np.array_equal(out, pixels)


def test_load_rgb_centre_crops_then_resizes(tmp_path):
  pixels = np.zeros((40, 120, 3), np.uint8)
  pixels[:, 40:80] = (0, 200, 0)  # the centre square is green, the sides black
  path = tmp_path / "wide.png"
  Image.fromarray(pixels).save(path)
  out = faces.load_rgb(path, 20)  # a path works like bytes
  assert out.shape == (20, 20, 3) and np.abs(out.astype(int) - (0, 200, 0)).max() <= 2


def test_load_rgb_converts_colour_modes():
  rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
  rgba[:, : SIZE // 2] = (255, 0, 0, 255)
  rgba[:, SIZE // 2 :] = (255, 255, 255, 0)  # transparent white: composited on black
  out = faces.load_rgb(_encode(Image.fromarray(rgba), "PNG"), SIZE)
  assert (out[:, : SIZE // 2] == (255, 0, 0)).all() and (out[:, SIZE // 2 :] == 0).all()

  gray16 = Image.fromarray(np.full((SIZE, SIZE), 32768, np.uint16))
  assert (faces.load_rgb(_encode(gray16, "PNG"), SIZE) == 128).all()  # scaled, not clipped

  palette = Image.new("P", (SIZE, SIZE), 1)
  palette.putpalette([255, 255, 255, 0, 0, 255] + [0] * 762)
  out = faces.load_rgb(_encode(palette, "PNG", transparency=0), SIZE)
  assert (out == (0, 0, 255)).all()

  cmyk = faces.load_rgb(_encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0))), SIZE)
  assert cmyk.shape == (SIZE, SIZE, 3) and cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60


def _gray(rgb: np.ndarray) -> np.ndarray:
  """The one channel of a gray RGB image (asserting it is gray)."""
  assert rgb.dtype == np.uint8 and rgb.shape == (SIZE, SIZE, 3)
  assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
  return rgb[..., 0]


def _stretched(values: np.ndarray) -> np.ndarray:
  """NumPy reference of a 32-bit image's gray levels: its finite range mapped linearly onto 0..255."""
  v = values.astype(np.float64)
  lo, hi = v[np.isfinite(v)].min(), v[np.isfinite(v)].max()
  v = np.clip(np.where(np.isnan(v), lo, v), lo, hi)
  return np.rint((v - lo) / (hi - lo) * 255).astype(np.uint8)


def test_load_rgb_scales_32_bit_tiffs_by_their_value_range():
  ramp = np.add.outer(np.arange(SIZE), np.arange(SIZE)).astype(np.float64)  # a diagonal gradient
  cases = {
    "int32, far beyond 8 bits": (ramp * 1_000_000 + 7).astype(np.int32),  # convert() made it white
    "int32, negative": (ramp * 50 - 2_000).astype(np.int32),  # a signed 16-bit TIFF opens as "I" too
    "float32 in 0..1": (ramp / ramp.max()).astype(np.float32),  # convert() made it black
    "float32, huge": (ramp * 1e30).astype(np.float32),
  }
  for case, values in cases.items():
    encoded = _encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(encoded)).mode == ("F" if values.dtype == np.float32 else "I"), case
    out = _gray(faces.load_rgb(encoded, SIZE))
    assert np.array_equal(out, _stretched(values)), case
    assert out.min() == 0 and out.max() == 255 and 100 < out.mean() < 155, case  # a gray ramp, not a flat face

  with_nan = (ramp / ramp.max()).astype(np.float32)
  with_nan[0, :4] = (np.nan, np.inf, -np.inf, np.nan)
  out = _gray(faces.load_rgb(_encode(Image.fromarray(with_nan), "TIFF"), SIZE))
  assert list(out[0, :4]) == [0, 255, 0, 0] and np.array_equal(out[1:], _stretched(with_nan)[1:])
  flat = faces.load_rgb(_encode(Image.fromarray(np.full((SIZE, SIZE), 5e8, np.int32)), "TIFF"), SIZE)
  assert (_gray(flat) == 128).all()  # a constant image has no range: mid-gray


def test_load_rgb_scales_16_bit_tiffs_by_the_type_range():
  ramp = (np.add.outer(np.arange(SIZE), np.arange(SIZE)) * (65535 // (2 * SIZE - 2))).astype(np.uint16)
  for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2")):  # little- and big-endian TIFFs
    img = Image.frombytes(mode, (SIZE, SIZE), ramp.astype(dtype).tobytes())
    encoded = _encode(img, "TIFF")
    assert Image.open(io.BytesIO(encoded)).mode == mode
    assert np.array_equal(_gray(faces.load_rgb(encoded, SIZE)), (ramp >> 8).astype(np.uint8)), mode


def test_load_rgb_applies_exif_orientation():
  pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
  pixels[:, : SIZE // 2] = (255, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = 3  # stored upside down: a 180-degree turn puts the red half on the right
  out = faces.load_rgb(_encode(Image.fromarray(pixels), exif=exif), SIZE).astype(int)
  assert out[:, -4:, 0].mean() > 200 and out[:, :4, 0].mean() < 50


def test_load_rgb_returns_reasons_and_never_raises(tmp_path):
  jpeg = _jpeg(np.random.default_rng(0))
  assert faces.load_rgb(b"", SIZE) == "empty file"
  assert faces.load_rgb(b"just some text\n", SIZE) == "not an image"
  assert faces.load_rgb(jpeg[: len(jpeg) // 2], SIZE) == "corrupt image"
  assert faces.load_rgb(tmp_path / "absent.jpg", SIZE) == "unreadable file"
  rng = np.random.default_rng(0)
  for header in (jpeg[:20], b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM"):
    for _ in range(20):
      assert isinstance(faces.load_rgb(header + rng.bytes(200), SIZE), str)


def test_skip_counter_records_totals_per_split_and_examples():
  metadata = {}
  train, test = faces.SkipCounter(max_examples=2), faces.SkipCounter(max_examples=2)
  for name in ("a", "b", "c"):
    train.add("empty file", name)
  test.add("empty file", "d")
  test.add("not an image", "e")
  train.record(metadata, "ds", "train")
  test.record(metadata, "ds", "test")
  assert metadata["skipped"] == {"empty file": 4, "not an image": 1}
  assert metadata["skipped_by_split"] == {"train": {"empty file": 3}, "test": {"empty file": 1, "not an image": 1}}
  assert metadata["skipped_examples"] == {"empty file": ["a", "b"], "not an image": ["e"]}


# --- the builder ----------------------------------------------------------------------------------


def _write_manual_folder(root: Path) -> dict[str, tuple[int, int, int]]:
  """Writes a UTKFace-like folder; returns {good base name: (age, gender code, race code)}, -1 unknown."""
  rng = np.random.default_rng(0)
  good = {}

  def put(rel: str, data: bytes, label=None):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if label:
      good[path.name] = label

  for i in range(33):
    age, gender, race = 1 + i * 115 // 32, i % 2, i % 5
    folder = ("", "part1/", "part2/deeper/")[i % 3]
    put(f"{folder}{age}_{gender}_{race}_2017011{i:014d}.jpg.chip.jpg", _jpeg(rng), (age, gender, race))
  for name in MALFORMED:
    put(f"part1/{name}", _jpeg(rng), (int(name.split("_")[0]), 1, -1))
  put("part2/70_0_2_20170101000000001.jpg.chip.jpg", _encode(Image.new("L", (40, 40), 90)), (70, 0, 2))
  put("part2/8_1_1_20170101000000002.jpg.chip.jpg", _encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0))), (8, 1, 1))
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[:, :20] = (255, 0, 0, 255)
  put("31_1_3_20170101000000003.png", _encode(Image.fromarray(rgba), "PNG"), (31, 1, 3))
  put("part1/45_0_0_20170101000000004.jpg.chip.jpg", _jpeg(rng, (90, 60)), (45, 0, 0))

  truncated = _jpeg(rng)
  put("part2/20_0_1_20170101000000005.jpg.chip.jpg", truncated[: len(truncated) // 2])
  put("part2/21_0_1_20170101000000006.jpg.chip.jpg", b"")
  put("part1/22_1_1_20170101000000007.jpg.chip.jpg", b"not a JPEG at all\n")
  put("part1/notes.txt", b"downloaded from the UTKFace page\n")
  put("IMG_0001.jpg", _jpeg(rng))
  put("-2_0_1_20170101000000008.jpg.chip.jpg", _jpeg(rng))
  first = next(iter(good))  # written at the top level
  put(f"copy/{first}", (root / first).read_bytes())  # the same base name again
  put("part1/._23_0_1_20170101000000009.jpg.chip.jpg", b"AppleDouble")  # ignored, not counted
  put("part1/33_0_1_2017010100000001\udce9.jpg.chip.jpg", _jpeg(rng))  # a Latin-1 byte in the name
  put(".DS_Store", b"\0\0\0\1Bud1")
  return good


EXPECTED_SKIPS = {
  "corrupt image": 1,
  "empty file": 1,
  "not an image": 1,
  "unparseable name": 2,
  "negative age": 1,
  "duplicate file name": 1,
  "non-UTF-8 file name": 1,
}


def _prepare(manual_dir: Path, data_dir: Path):
  datasets.prepare("utkface", str(data_dir), str(manual_dir), "tiny")
  return datasets.get_builder("utkface", str(data_dir), "tiny")  # reads everything back from disk


def _examples(builder) -> dict[str, dict[str, dict]]:
  """Returns {split: {file_name: example}} of a prepared dataset."""
  out = {}
  for split in builder.info.splits:
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    out[split] = {ex["file_name"].decode(): ex for ex in examples}
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The working folder, the folder build, the tar.gz build, and the expected labels."""
  root = tmp_path_factory.mktemp("utkface")
  good = _write_manual_folder(root / "manual")
  archive_dir = root / "archive"
  archive_dir.mkdir()
  # A different layout and the reverse member order: neither may change the split.
  with tarfile.open(archive_dir / "UTKFace.tar.gz", "w:gz") as tar:
    for path in sorted((root / "manual").rglob("*"), reverse=True):
      if path.is_file():
        tar.add(path, arcname=f"UTKFace/{path.relative_to(root / 'manual').as_posix()}")
  return root, _prepare(root / "manual", root / "tfds_folder"), _prepare(archive_dir, root / "tfds_tar"), good


def test_folder_build_labels_images_and_skips(built):
  _, builder, _, good = built
  examples = _examples(builder)
  assert set(examples) == {"train", "validation", "test"} and all(examples.values())
  assert sum(builder.info.splits[s].num_examples for s in examples) == len(good)
  merged = {name: ex for split in examples.values() for name, ex in split.items()}
  assert set(merged) == set(good)
  genders, races = builder.info.features["gender"], builder.info.features["race"]
  for name, (age, gender, race) in good.items():
    ex = merged[name]
    got = (ex["age"], genders.int2str(ex["gender"]), races.int2str(ex["race"]), ex["age_std"])
    assert got == (age, utkface.GENDERS[gender], utkface.RACES[race], 0.0), name  # -1: "unknown", the last
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (SIZE, SIZE, 3)
  for split, split_examples in examples.items():
    assert all(assign_split(name, FRACTIONS, seed=0) == split for name in split_examples)
  gray = merged["70_0_2_20170101000000001.jpg.chip.jpg"]["image"]
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
  cmyk = merged["8_1_1_20170101000000002.jpg.chip.jpg"]["image"]
  assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60
  rgba = merged["31_1_3_20170101000000003.png"]["image"]
  assert (rgba[:, : SIZE // 2 - 1] == (255, 0, 0)).all() and (rgba[:, SIZE // 2 + 1 :] == 0).all()

  metadata = builder.info.metadata
  assert metadata["skipped"] == EXPECTED_SKIPS
  assert sum(sum(c.values()) for c in metadata["skipped_by_split"].values()) == sum(EXPECTED_SKIPS.values())
  assert sorted(metadata["skipped_examples"]["unparseable name"]) == ["IMG_0001.jpg", "part1/notes.txt"]
  assert metadata["skipped_examples"]["non-UTF-8 file name"] == ["part1/33_0_1_2017010100000001\\xe9.jpg.chip.jpg"]
  assert (Path(builder.data_dir) / "metadata.json").exists()


def test_groups_reach_the_array_split(built, tmp_path):
  _, builder, _, good = built
  assert builder.group_names() == {"gender": utkface.GENDERS, "race": utkface.RACES}
  cfg = ml_collections.ConfigDict(
    {"name": "utkface", "data_dir": builder.data_dir_root, "builder_config": "tiny", "cache_dir": str(tmp_path)}
  )
  unknown_race = 0
  for split in builder.info.splits:
    data = pipeline.load_split(data_settings(cfg), split)
    assert data.group_names == {"gender": utkface.GENDERS, "race": utkface.RACES}
    records = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    names = [ex["file_name"].decode() for ex in records]  # the array cache's order
    for grouping, names_of in (("gender", utkface.GENDERS), ("race", utkface.RACES)):
      codes = data.groups[grouping]
      assert codes.dtype == np.int32 and len(codes) == len(data.age) == len(names)
      expected = [names_of.index(names_of[good[n][1 if grouping == "gender" else 2]]) for n in names]
      assert codes.tolist() == expected, (split, grouping)
    unknown_race += int((data.groups["race"] == len(utkface.RACES) - 1).sum())
  assert unknown_race == len(MALFORMED)


def test_tar_build_matches_the_folder_build(built):
  _, from_folder, from_tar, _ = built
  folder_examples, tar_examples = _examples(from_folder), _examples(from_tar)
  assert {s: set(e) for s, e in tar_examples.items()} == {s: set(e) for s, e in folder_examples.items()}
  for split, examples in tar_examples.items():
    for name, ex in examples.items():
      assert np.array_equal(ex["image"], folder_examples[split][name]["image"])
      assert ex["age"] == folder_examples[split][name]["age"]
  assert from_tar.info.metadata["skipped"] == EXPECTED_SKIPS
  assert all(
    n.startswith("UTKFace.tar.gz:UTKFace/")
    for names in from_tar.info.metadata["skipped_examples"].values()
    for n in names
  )


def test_unusable_folder_and_broken_archive_fail_clearly(tmp_path, built):
  root = built[0]
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "readme.txt").write_text("no faces here")
  with pytest.raises(ValueError, match=r"no usable UTKFace image .*unparseable name"):
    _prepare(tmp_path / "texts", tmp_path / "tfds_texts")
  (tmp_path / "broken").mkdir()
  truncated = (root / "archive" / "UTKFace.tar.gz").read_bytes()[:3000]
  (tmp_path / "broken" / "UTKFace.tar.gz").write_bytes(truncated)
  with pytest.raises(
    ValueError,
    match=r"^\S*/broken/UTKFace\.tar\.gz is truncated or corrupt \(Compressed file "
    r"ended before the end-of-stream marker was reached\); download it again$",
  ):
    _prepare(tmp_path / "broken", tmp_path / "tfds_broken")
  assert not any(path.is_file() for path in (tmp_path / "tfds_broken").rglob("*"))  # verified before writing
  face = next(root.glob("manual/*.jpg.chip.jpg"))
  with pytest.raises(
    ValueError,
    match=rf"^{re.escape(str(face))} is a file but not a \.tar\.gz/\.tgz/\.tar "
    r"archive; pass the folder holding the UTKFace images or archive$",
  ):
    _prepare(face, tmp_path / "tfds_face")
