"""Generated databases of the unified age-estimation benchmark, laid out as the real JSONs are.

`make_fae_database(root, layout)` writes a database JSON whose entries have the real files' fields
(checked against paplhjak/Facial-Age-Estimation-Benchmark-Databases: AgeDB.json, CLAP2016_aligned.json,
FG-Net_aligned.json) and, at each entry's img_path under `root/images`, a JPEG of a demo face
(agejax.data.demo_faces, so the age is learnable) pasted into a larger photo at its `aligned_bbox`.
Nothing is downloaded. `prepare_fae(...)` prepares one as a TFDS dataset; the `fae_agedb` fixture is a
10-folder AgeDB-like database prepared once per module.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agejax.data import demo_faces

# layout -> (JSON file, database field, folders, the fields its entries carry besides img_path/age/folder/database)
LAYOUTS = {
  "agedb": ("AgeDB.json", "AgeDB", tuple(range(10)), ("name", "gender", "number")),
  "clap2016_aligned": ("CLAP2016_aligned.json", "ChaLearn2016", (0, 1, 2), ("std_age", "aligned_bbox")),
  "morph_aligned": ("MORPH_aligned.json", "MORPH", tuple(range(10)), ("id_num", "gender", "aligned_bbox")),
  "fgnet_aligned": ("FG-Net_aligned.json", "FG-NET", tuple(range(1, 13)), ("id_num", "aligned_bbox")),
  # facebase/to_json/imdb_fp_age_to_json.py: FP-AGE's train / valid / test as folders 0-2, `name` the nm id.
  "imdb_fp_age_aligned": (
    "IMDB-CLEAN-FP-AGE_aligned.json",
    "IMDB-CLEAN",
    (0, 1, 2),
    ("name", "gender", "aligned_bbox"),
  ),
}
_CLAP_PARTS = {0: "train", 1: "valid", 2: "test"}
_NAMES = ("ElsaMartinelli", "MargeChampion", "CarlosSantana", "HeinrichHertz", "BillMurray", "GlendaJackson")


def _img_path(layout: str, folder: int, subject: int, k: int, age: int, gender: str) -> str:
  """A path shaped like the real database's."""
  number = 1000 + 10 * subject + k
  if layout == "agedb":
    name = f"{_NAMES[subject % len(_NAMES)]}{subject}"
    return f"AgeDB/AgeDB/{number}_{name}_{age}_{gender.lower()}.jpg"
  if layout == "clap2016_aligned":
    return f"ChaLearn2016/{_CLAP_PARTS[folder]}/{number:06d}.jpg"
  if layout == "imdb_fp_age_aligned":  # one person's photos may be in several folders: the folder keeps paths apart
    return f"IMDB_WIKI/imdb/{subject % 100:02d}/nm{subject:07d}_rm{folder}{number}_1970-1-1_{1970 + age}.jpg"
  if layout == "morph_aligned":
    return f"MORPH/Album2/{subject:06d}_{k:02d}{gender}{age:02d}.JPG"
  return f"FG-NET/images/{subject:03d}A{age:02d}{'abc'[k % 3]}.jpg"


def photo_with_face(face: np.ndarray, rng: np.random.Generator, margin: int = 12) -> tuple[np.ndarray, list[int]]:
  """A photo (noise background, random size) holding `face` at a random place, and its one-based aligned_bbox.

  Part of the extended box may fall outside the photo, as in the real files.
  """
  n = face.shape[0]
  h, w = n + int(rng.integers(margin // 2, 2 * margin)), n + int(rng.integers(margin // 2, 2 * margin))
  photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  top, left = int(rng.integers(0, h - n + 1)), int(rng.integers(0, w - n + 1))
  photo[top : top + n, left : left + n] = face
  # One-based corners A (top left), B (top right), C (bottom right), D (bottom left) of the face's pixels.
  x0, y0, x1, y1 = left + 1, top + 1, left + n, top + n
  return photo, [x0, y0, x1, y0, x1, y1, x0, y1]


def make_fae_database(
  root: Path,
  layout: str = "agedb",
  *,
  subjects_per_folder: int = 2,
  images_per_subject: int = 2,
  face_size: int = 40,
  seed: int = 0,
  json_name: str | None = None,
  shared_folders: tuple[int, ...] = (),
) -> tuple[Path, Path]:
  """Writes a database JSON and its images under `root`; returns (json_path, images_dir).

  Layouts (`LAYOUTS`): "agedb" (name, gender M/F, number; no boxes; folders 0-9), "clap2016_aligned"
  (std_age, aligned_bbox; folders 0-2 as train/valid/test), "morph_aligned" (id_num, gender,
  aligned_bbox; folders 0-9), "fgnet_aligned" (id_num, aligned_bbox; one folder per person, 1-12),
  "imdb_fp_age_aligned" (name, gender, aligned_bbox; folders 0-2 as FP-AGE's train/valid/test).
  Each subject's images are in one folder (subject-exclusive), except that with `shared_folders` the
  people of its first folder are also the people of the others, as IMDB-CLEAN-FP-AGE's folders 0 and 1.
  The JSON is indented like the real ones.
  """
  file_name, database, folders, fields = LAYOUTS[layout]
  rng = np.random.default_rng(seed)
  images = root / "images"
  entries = []
  last = 0
  people: dict[int, list[int]] = {}  # folder -> its subjects
  for folder in folders:
    count = 1 if layout == "fgnet_aligned" else subjects_per_folder
    if folder in shared_folders[1:]:
      people[folder] = people[shared_folders[0]]
    else:
      people[folder] = list(range(last + 1, last + 1 + count))
      last += count
    for subject in people[folder]:
      gender = "MF"[subject % 2]
      for k in range(images_per_subject):
        face, age, _ = demo_faces.sample_person(seed, len(entries), face_size)
        path = _img_path(layout, folder, subject, k, age, gender)
        entry: dict = {"img_path": path}
        if "name" in fields:
          imdb = layout == "imdb_fp_age_aligned"
          entry["name"] = f"{subject:07d}" if imdb else f"{_NAMES[subject % len(_NAMES)]}{subject}"
        if "id_num" in fields:
          entry["id_num"] = subject
        entry["age"] = age
        if "std_age" in fields:
          entry["std_age"] = round(float(rng.uniform(1.5, 8.0)), 11)
        if "gender" in fields:
          entry["gender"] = gender
        if "number" in fields:
          entry["number"] = str(1000 + 10 * subject + k)
        entry["database"] = database
        entry["folder"] = folder
        if "aligned_bbox" in fields:
          photo, box = photo_with_face(face, rng)
          entry["aligned_bbox"] = box
          entry["alignment_source"] = "in the wild"
        else:
          photo = face
        file = images / path
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(file, format="JPEG", quality=95)
        entries.append(entry)
  order = rng.permutation(len(entries))  # the real files are not sorted by folder
  json_path = root / (json_name or file_name)
  json_path.write_text(json.dumps([entries[i] for i in order], indent=4))
  return json_path, images


def prepare_fae(json_path: Path, images: Path, data_dir: Path, name: str, image_size: int = 32, **kwargs):
  """Prepares a generated database as the fae dataset `name`; returns the builder."""
  from agejax.data import datasets

  return datasets.prepare(
    "fae", str(data_dir), str(images), name, database=str(json_path), image_size=image_size, **kwargs
  )


@pytest.fixture(scope="module")
def fae_agedb(tmp_path_factory) -> dict:
  """A 10-folder AgeDB-like database (2 people x 2 faces per folder) prepared as fae dataset 'agedb' at 32x32.

  Returns {"json", "images", "data_dir", "cache_dir", "name", "builder"}.
  """
  root = tmp_path_factory.mktemp("fae_agedb")
  json_path, images = make_fae_database(root, "agedb")
  builder = prepare_fae(json_path, images, root / "tfds", "agedb")
  return {
    "json": json_path,
    "images": images,
    "data_dir": str(root / "tfds"),
    "cache_dir": str(root / "arrays"),
    "name": "agedb",
    "builder": builder,
  }
