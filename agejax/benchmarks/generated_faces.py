"""A large generated fae database for the scale benchmarks (issue 37): photos with a face at an aligned box.

`python -m agejax.benchmarks.generated_faces --root /tmp/faces50k --faces 50000 [--face_size 281] [--pool 500]`

Writes ROOT/images/MORPH/... JPEGs and ROOT/MORPH_aligned.json laid out as the benchmark's MORPH_aligned.json
(id_num, age, gender, database, folder 0-9 subject-exclusive, aligned_bbox), ready for
`prepare_data.py fae --database ROOT/MORPH_aligned.json --images ROOT/images`. Drawing a demo face at 281 px
takes ~20 ms, so a pool of `--pool` drawn faces is reused: each photo is a pool face, mirrored or not, shifted
in brightness, pasted at a random place into a smooth background (a realistic JPEG size, ~30-40 KB at 281 px,
where noise would be ~250 KB). The preparation's work per face (decode, warp, encode) is that of a real photo.
"""

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
from PIL import Image

from agejax.data import demo_faces

SUBJECTS_FOLDERS = 10
IMAGES_PER_SUBJECT = 5


def _photo(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
  """A smooth-background photo holding `face` at a random place, and its one-based aligned_bbox corners."""
  n = face.shape[0]
  margin = max(8, n // 10)
  h, w = n + int(rng.integers(margin, 3 * margin)), n + int(rng.integers(margin, 3 * margin))
  top_colour, bottom_colour = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  ramp = np.linspace(0.0, 1.0, h)[:, None, None]
  photo = np.broadcast_to(top_colour * (1 - ramp) + bottom_colour * ramp, (h, w, 3)).astype(np.uint8)
  top, left = int(rng.integers(0, h - n + 1)), int(rng.integers(0, w - n + 1))
  photo[top : top + n, left : left + n] = face
  x0, y0, x1, y1 = left + 1, top + 1, left + n, top + n
  return photo, [x0, y0, x1, y0, x1, y1, x0, y1]


def _entry(index: int, face: np.ndarray, age: int, seed: int) -> tuple[dict, np.ndarray]:
  """Entry `index`'s JSON fields and photo (a pool face, mirrored or not, shifted in brightness)."""
  rng = np.random.default_rng([seed, index, 1])
  if rng.integers(2):
    face = face[:, ::-1]
  face = np.clip(face.astype(np.int16) + int(rng.integers(-20, 21)), 0, 255).astype(np.uint8)
  photo, box = _photo(face, rng)
  subject = index // IMAGES_PER_SUBJECT
  gender = "MF"[subject % 2]
  entry = {
    "img_path": f"MORPH/Album2/{subject:06d}_{index % IMAGES_PER_SUBJECT:02d}{gender}{age:02d}.JPG",
    "id_num": subject,
    "age": age,
    "gender": gender,
    "database": "MORPH",
    "folder": subject % SUBJECTS_FOLDERS,
    "aligned_bbox": box,
    "alignment_source": "in the wild",
  }
  return entry, photo


def _draw(args: tuple[int, int, int]) -> tuple[np.ndarray, int]:
  seed, index, size = args
  face, age, _ = demo_faces.sample_person(seed, index, size)
  return face, age


def _write(args: tuple[int, int, int, str, list]) -> list[dict]:
  """Writes photos [start, stop) and returns their entries (one worker's chunk)."""
  start, stop, seed, images, pool = args
  entries = []
  for i in range(start, stop):
    face, age = pool[i % len(pool)]
    entry, photo = _entry(i, face, age, seed)
    file = Path(images) / entry["img_path"]
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(file, format="JPEG", quality=95)
    entries.append(entry)
  return entries


def write_database(
  root: str | Path, faces: int, face_size: int = 281, pool: int = 500, seed: int = 0, processes: int = 0
) -> tuple[Path, Path]:
  """Writes `faces` photos under ROOT/images and ROOT/MORPH_aligned.json; returns (json_path, images_dir)."""
  root = Path(root)
  images = root / "images"
  images.mkdir(parents=True, exist_ok=True)
  processes = processes or multiprocessing.cpu_count()
  with multiprocessing.get_context("spawn").Pool(processes) as workers:
    drawn = workers.map(_draw, [(seed, i, face_size) for i in range(min(pool, faces))])
    step = -(-faces // (4 * processes))
    chunks = [(s, min(s + step, faces), seed, str(images), drawn) for s in range(0, faces, step)]
    entries = [e for chunk in workers.map(_write, chunks) for e in chunk]
  order = np.random.default_rng(seed).permutation(len(entries))  # the real files are not sorted by folder
  json_path = root / "MORPH_aligned.json"
  json_path.write_text(json.dumps([entries[i] for i in order], indent=4))
  return json_path, images


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, help="output folder (outside the repository, e.g. /tmp/faces50k)")
  parser.add_argument("--faces", type=int, required=True)
  parser.add_argument("--face_size", type=int, default=281)
  parser.add_argument("--pool", type=int, default=500, help="distinct drawn faces reused across the photos")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--processes", type=int, default=0, help="0: one per CPU")
  args = parser.parse_args()
  t0 = time.perf_counter()
  json_path, images = write_database(args.root, args.faces, args.face_size, args.pool, args.seed, args.processes)
  size = sum(f.stat().st_size for f in images.rglob("*") if f.is_file())
  seconds = time.perf_counter() - t0
  print(f"{args.faces} photos ({size / 1e6:.0f} MB) in {images}, database {json_path}: {seconds:.0f} s")


if __name__ == "__main__":
  main()
