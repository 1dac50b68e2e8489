"""Procedurally drawn, age-dependent faces: the built-in demo dataset (no downloads).

Each image is a stylised face whose shape, hair, skin and wrinkles follow the age: child
proportions until ~20, baby fat and full lips fading through the twenties, wrinkles from ~25,
grey hair from ~30, a receding hairline from ~35, sagging and age spots from ~55. Pose,
lighting, skin tone, hair and eye colour, hair style, beard and background are random
nuisance, so a model has to read the age cues rather than a shortcut.

Groups: each face also reports what it was drawn with that makes a group (`GROUPS`): its skin
tone (the skin palette's six colours, light to dark, two to a tone) and its gender (the trait that
decides the hair style, fringe, balding and beard), so the demo exercises per-group reports.

Determinism: only integer-exact random draws (`random`, `integers`, `uniform`, `choice`) and
elementwise float arithmetic are used, and trigonometry comes from rounded `math` tables, so
the same (seed, index, size) gives the same bytes on every machine.
"""

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from agejax import errors

MIN_AGE = 1
MAX_AGE = 90

# Nuisance palettes (RGB); each is picked uniformly, then jittered.
_SKIN = np.array(
  [(255, 226, 200), (241, 196, 162), (224, 172, 130), (198, 136, 98), (160, 106, 72), (112, 74, 52)], dtype=float
)
_HAIR = np.array(
  [(28, 24, 22), (62, 42, 30), (104, 70, 44), (142, 106, 70), (206, 170, 108), (150, 70, 38)], dtype=float
)
_EYES = np.array(
  [(92, 56, 30), (46, 30, 20), (70, 112, 172), (78, 122, 72), (122, 96, 52), (112, 122, 134)], dtype=float
)
# The skin palette runs light to dark; each tone names two neighbouring entries.
SKIN_TONES = ("light", "medium", "dark")
GENDERS = ("male", "female")
GROUPS = {"skin_tone": SKIN_TONES, "gender": GENDERS}  # grouping -> names, in code order
_GREY = np.array((224, 224, 228), dtype=float)
_PINK = np.array((250, 170, 165), dtype=float)
_SPOT = np.array((112, 72, 42), dtype=float)
_LIPS = np.array((190, 78, 84), dtype=float)


def _table(n: int, span: float) -> np.ndarray:
  """Returns (cos, sin) of n angles over [0, span], rounded so libm ULP differences vanish."""
  return np.array(
    [(round(math.cos(span * k / (n - 1)), 12), round(math.sin(span * k / (n - 1)), 12)) for k in range(n)]
  )


_CIRCLE = _table(33, 2 * math.pi)  # closed loop, for ellipses
_HALF = _table(21, math.pi)  # right -> top -> left, for the head outline and hair
_U = np.linspace(0.0, 1.0, 8)
_BEZIER = np.stack(((1 - _U) ** 2, 2 * _U * (1 - _U), _U * _U))  # quadratic Bernstein basis


def _ramp(x: float, lo: float, hi: float) -> float:
  """Returns the linear 0 -> 1 ramp of x between lo and hi, clamped."""
  return min(1.0, max(0.0, (x - lo) / (hi - lo)))


def _lerp(a: float, b: float, t: float) -> float:
  """Returns a at t=0 and b at t=1."""
  return a + (b - a) * t


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
  """Returns a float colour clamped into a PIL RGB tuple."""
  return tuple(min(255, max(0, round(v))) for v in np.asarray(colour, float).tolist())


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns pixel-centre x (row) and y (column) coordinates in [-0.5, 0.5], for lighting."""
  v = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  return v[None, :], v[:, None]


def draw_face(age: int, rng: np.random.Generator, size: int = 128) -> np.ndarray:
  """Draws one uint8 (size, size, 3) face of the given age; rng supplies all the nuisance."""
  return draw_person(age, rng, size)[0]


def draw_person(age: int, rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, dict[str, str]]:
  """Draws a face as `draw_face` does; returns it and its groups, e.g. {"skin_tone": "dark", "gender": "male"}."""
  a = float(age)
  # Age factors, each monotonic; their ranges overlap to cover the whole 1..90 span.
  t = _ramp(a, 1, 20)
  child = 1.0 - t * t * (3.0 - 2.0 * t)  # head proportions reach adult ones (smoothly) by ~20
  mature = _ramp(a, 12, 32)  # baby fat, blush and full lips fade
  wrinkle = _ramp(a, 25, 85)  # lines appear faint and deepen steadily
  grey = _ramp(a, 30, 75)  # fraction of grey/white hair
  recede = _ramp(a, 35, 85)  # hairline rises, hair thins
  old = _ramp(a, 55, 90)  # sagging jowls and lids, age spots
  baby_hair = 1.0 - _ramp(a, 1, 5)  # toddlers' hair is sparse

  # Identity nuisance. Every draw here and below is made whatever the age, so one rng state
  # gives the same person, pose, light and scene at every age.
  male = rng.random() < 0.5
  skin_index = int(rng.integers(len(_SKIN)))
  skin = _SKIN[skin_index] + rng.uniform(-12, 12, 3)
  skin = skin + (_PINK - skin) * (0.22 * child)  # rosy baby skin ...
  skin = skin * (1 - np.array((0.05, 0.08, 0.11)) * (0.4 * mature + 0.6 * old))  # ... turns sallow
  base_hair = _HAIR[rng.integers(len(_HAIR))] + rng.uniform(-10, 10, 3)
  hair = base_hair + (_GREY - base_hair) * grey
  hair = hair + (skin - hair) * (0.55 * baby_hair)
  eye_colour = _EYES[rng.integers(len(_EYES))] + rng.uniform(-10, 10, 3)
  style = int(rng.choice(3, p=(0.6, 0.3, 0.1) if male else (0.15, 0.35, 0.5)))  # short/mid/long
  fringe = rng.uniform(0.02, 0.05) if not male and rng.random() < 0.35 else 0.0  # gap to brows
  bald_rate = rng.uniform(0.6, 1.0) if male else rng.uniform(0.1, 0.35)
  beard = male and rng.random() < 0.3
  clothes = rng.uniform(20, 235, 3)
  spots = rng.random((16, 4))  # x, y, size, darkness of the age spots (shown as they appear)
  strands = rng.random((12, 3))  # position, length, grey rank of the hair strands

  # Pose nuisance: rotation, scale and shift, as an affine map from face units to canvas pixels.
  canvas = 2 * size  # draw at 2x, box-downsample for anti-aliasing
  theta = rng.uniform(-15, 15) * math.pi / 180
  scale = rng.uniform(0.9, 1.1) * 0.94 * canvas
  ca, sa = round(math.cos(theta), 12) * scale, round(math.sin(theta), 12) * scale
  ox = (0.5 + rng.uniform(-0.04, 0.04)) * canvas
  oy = (0.52 + rng.uniform(-0.04, 0.04)) * canvas

  def pts(x, y, zoom: float = 1.0) -> list[float]:
    """Returns face coordinates (image-size units, origin at the centre) as flat pixel xy."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    xy = np.empty((len(x), 2))
    xy[:, 0], xy[:, 1] = ox + ca * x - sa * y, oy + sa * x + ca * y
    return (xy * zoom).ravel().tolist()

  # Background nuisance: a muted two-colour gradient, vertical or horizontal, and a few shapes.
  c0, c1 = rng.uniform(30, 230, (2, 3))
  c0, c1 = (c + (c.mean() - c) * rng.uniform(0.2, 0.8) for c in (c0, c1))
  ramp = np.linspace(0.0, 1.0, canvas)[:, None, None]
  bg = np.broadcast_to((c0 + (c1 - c0) * ramp).astype(np.uint8), (canvas, canvas, 3))
  img = Image.fromarray(np.ascontiguousarray(bg if rng.random() < 0.5 else bg.transpose(1, 0, 2)))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(0, 4))):
    x0, y0 = rng.uniform(0, canvas, 2)
    r = rng.uniform(0.05, 0.25) * canvas
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape((x0 - r, y0 - r, x0 + r, y0 + r), fill=_rgb(rng.uniform(40, 220, 3)))

  def poly(x, y, colour) -> None:
    """Fills a polygon given in face units."""
    draw.polygon(pts(x, y), fill=_rgb(colour))

  def ellipse(cx, cy, rx, ry, colour) -> None:
    """Fills an axis-aligned (before pose) ellipse."""
    poly(cx + rx * _CIRCLE[:, 0], cy + ry * _CIRCLE[:, 1], colour)

  def curve(p0, p1, p2, colour, width: float) -> None:
    """Strokes a quadratic Bezier curve; width in face units."""
    b0, b1, b2 = _BEZIER
    x, y = b0 * p0[0] + b1 * p1[0] + b2 * p2[0], b0 * p0[1] + b1 * p1[1] + b2 * p2[1]
    draw.line(pts(x, y), fill=_rgb(colour), width=max(1, round(width * scale)))

  # Geometry: a child's head is wider and rounder, with low eyes and a small jaw, nose and mouth.
  hw = _lerp(0.285, 0.33, child) * (1 + 0.04 * (1 - mature))  # head half-width
  yt = _lerp(-0.43, -0.47, child)  # crown
  ye = _lerp(-0.03, 0.08, child)  # eye line
  yc = _lerp(0.40, 0.33, child) + 0.025 * old  # chin, which drops with sagging
  jaw = _lerp(0.32, 0.10, child)  # taper of the lower face
  ex, ew, eh = 0.40 * hw, _lerp(0.058, 0.066, child), _lerp(0.024, 0.036, child)  # eye x, size
  brow = ye - _lerp(0.062, 0.075, child)
  yn, nw = ye + (yc - ye) * _lerp(0.44, 0.40, child), _lerp(0.042, 0.026, child)  # nose
  ym, mw = ye + (yc - ye) * _lerp(0.72, 0.64, child), _lerp(0.078, 0.05, child)  # mouth
  lip = 0.028 * (1 - 0.3 * mature - 0.35 * old) + 0.006 * child
  hc, hs = _HALF[:, 0], _HALF[:, 1]
  jowl = 1 + 0.5 * old * (hs * hc) ** 2  # widening near the jaw angle
  lo_x, lo_y = -hw * hc * (1 - jaw * hs * hs) * jowl, ye + (yc - ye) * hs
  head_x, head_y = np.concatenate((hw * hc, lo_x)), np.concatenate((ye - (ye - yt) * hs, lo_y))

  # Clothes, neck, hair behind the head, ears, head; the head also goes into a texture mask.
  ellipse(0, yc + 0.36, 0.55, 0.3, clothes)
  poly([-0.55 * hw, 0.55 * hw, 0.62 * hw, -0.62 * hw], [yc - 0.12, yc - 0.12, 0.7, 0.7], skin * 0.86)
  vol = 0.03 + 0.015 * style  # hair volume around the skull
  if style > 0 and baby_hair < 0.5:
    bottom = ye + (0.12 if style == 1 else 0.45)
    poly(
      np.concatenate(((hw + vol) * hc, [-(hw + vol) * 1.05, (hw + vol) * 1.05])),
      np.concatenate((ye - (ye - yt + vol) * hs, [bottom, bottom])),
      hair * 0.85,
    )
  for s in (-1, 1):
    ellipse(s * (hw - 0.005), ye + 0.055, 0.035, 0.06, skin * 0.93)
  poly(head_x, head_y, skin)
  mask = Image.new("L", (size, size))
  ImageDraw.Draw(mask).polygon(pts(head_x, head_y, 0.5), fill=255)

  # Blush (young), age spots (old), wrinkles (from ~25).
  for s in (-1, 1):
    ellipse(s * (ex + 0.015), ye + 0.085, 0.05, 0.032, skin + (_PINK - skin) * (0.3 * (1 - mature)))
  for u in spots[: round(16 * old)]:
    r = 0.006 + 0.008 * u[2]
    ellipse(
      _lerp(-0.75, 0.75, u[0]) * hw,
      _lerp(yt + 0.12, yc - 0.08, u[1]),
      r,
      r * 0.8,
      skin + (_SPOT - skin) * (0.25 + 0.25 * u[3]),
    )
  if wrinkle > 0:
    wc, lw = skin * (0.85 - 0.4 * wrinkle), 0.003 + 0.008 * wrinkle  # darker, wider with age
    for k in range(1 + int(3.99 * wrinkle)):  # forehead lines
      y = brow - 0.045 - 0.028 * k
      curve((-0.5 * hw, y + 0.004), (0, y - 0.012), (0.5 * hw, y + 0.004), wc, lw)
    for s in (-1, 1):
      cx, ln = s * (ex + ew + 0.006), 0.015 + 0.035 * wrinkle
      for dy in (-0.5, 0.0, 0.5):  # crow's feet
        curve((cx, ye), (cx + s * ln * 0.5, ye + dy * ln * 0.4), (cx + s * ln, ye + dy * ln), wc, lw * 0.8)
      curve(
        (s * (nw + 0.012), yn - 0.01),
        (s * (mw + 0.035), (yn + ym) / 2),  # nasolabial folds
        (s * (mw + 0.012), ym + 0.03),
        wc,
        lw,
      )
      curve(
        (s * (ex - ew * 0.8), ye + eh + 0.01),
        (s * ex, ye + eh + 0.012 + 0.03 * wrinkle),  # bags
        (s * (ex + ew * 0.8), ye + eh + 0.01),
        wc + (skin - wc) * 0.4,
        lw * 0.8,
      )
      if old > 0:  # marionette lines and neck folds
        curve((s * mw, ym + 0.01), (s * (mw + 0.008), ym + 0.04), (s * (mw + 0.02), ym + 0.03 + 0.06 * old), wc, lw)
        curve((s * 0.5 * hw, yc + 0.03 + 0.02 * s), (0, yc + 0.08), (-s * 0.5 * hw, yc + 0.03), wc * 0.9, lw)

  # Beard (some men): the lower face below the nose, filling in from 16 to ~25.
  if beard and a >= 16:
    below = lo_y >= yn + 0.01
    poly(lo_x[below] * 1.02, lo_y[below] + 0.008, hair + (skin - hair) * (1 - 0.85 * _ramp(a, 15, 26)))

  # Eyes (sclera, iris, pupil, highlight) under upper lids that droop with age; brows.
  for s in (-1, 1):
    cx, ir = s * ex, eh * _lerp(0.92, 1.1, child)
    ellipse(cx, ye, ew, eh, (238, 236, 230))
    ellipse(cx, ye, ir, ir, eye_colour)
    ellipse(cx, ye, ir * 0.45, ir * 0.45, (15, 12, 10))
    ellipse(cx - ir * 0.3, ye - ir * 0.35, ir * 0.2, ir * 0.2, (250, 250, 250))
    ellipse(cx, ye - eh * (2.05 - 0.9 * old), ew * 1.15, eh * 1.05, skin * 0.97)  # lid
    curve((cx - ew, ye), (cx, ye - eh * (2.0 - 0.9 * old)), (cx + ew, ye), (40, 30, 25), 0.004)
    b = base_hair + (_GREY - base_hair) * (0.7 * grey)
    curve(
      (cx - s * ew * 1.1, brow + 0.01),
      (cx - s * 0.01, brow - 0.012 - 0.004 * mature),
      (cx + s * ew * 1.2, brow + 0.006),
      b + (skin - b) * (0.45 * child),
      _lerp(0.012, 0.008, child),
    )

  # Nose: tip shading, nostrils, bridge shadow.
  ellipse(0, yn, nw * 0.9, nw * 0.5, skin * 0.93)
  for s in (-1, 1):
    ellipse(s * nw * 0.45, yn + nw * 0.2, nw * 0.28, nw * 0.15, skin * 0.55)
  curve((0.02, ye + 0.01), (0.025, (ye + yn) / 2), (nw * 0.6, yn - 0.015), skin * 0.87, 0.006)

  # Mouth: corners lift in youth and drop with age, lips thin out.
  cy = ym - 0.006 + 0.02 * old
  lip_colour = skin + (_LIPS - skin) * (0.5 - 0.2 * old)
  poly([-mw, -mw * 0.4, 0, mw * 0.4, mw, 0], [cy, ym - lip * 0.95, ym - lip * 0.6, ym - lip * 0.95, cy, ym], lip_colour)
  poly(
    np.concatenate(([-mw, mw], mw - 2 * mw * _U)),
    np.concatenate(([cy, cy], cy + (ym + lip * 1.3 - cy) * 4 * _U * (1 - _U))),
    lip_colour * 1.05,
  )
  draw.line(
    pts([-mw, -mw * 0.4, 0, mw * 0.4, mw], [cy, ym, ym + 0.002, ym, cy]),
    fill=_rgb(lip_colour * 0.55),
    width=max(1, round(0.005 * scale)),
  )

  # Front hair: a cap from the sides over the crown down to the hairline. The hairline sits at a
  # fraction q of the head height along the outline (so it stays on the head) and rises towards
  # the crown with age, temples first (M pattern), while the cap thins and flattens.
  if baby_hair < 1:
    bald = recede * bald_rate
    ks = np.array([19, 16, 13, 10, 7, 4, 1])  # left -> right along _HALF
    q = np.array([0.25, 0.62 + 0.36 * min(1.0, 1.4 * bald), 0.66 + 0.3 * bald, 0.62 + 0.33 * bald])
    q = np.concatenate((q, q[2::-1]))
    if fringe and a > 3:
      q[1:-1] = (ye - brow + fringe) / ((ye - yt) * hs[ks[1:-1]])
    top = ye - yt + vol * (1 - 0.8 * bald)
    cap = hair + (skin - hair) * (0.45 * bald)
    poly(
      np.concatenate(((hw + vol) * hc, 0.99 * hw * hc[ks])),
      np.concatenate((ye - top * hs, ye - (ye - yt) * hs[ks] * q)),
      cap,
    )
    for u in strands:  # a salt-and-pepper mix as grey rises
      k = 2 + int(17 * u[0])
      qk = np.interp(k, ks[::-1], q[::-1]) * (1 + 0.15 * u[1])
      colour = _GREY if u[2] < grey else base_hair * 0.7
      curve(
        ((hw + vol) * hc[k] * 0.97, ye - top * hs[k] * 0.97),
        ((hw + vol) * hc[k] * 0.93, ye - top * hs[k] * 0.9),
        (0.95 * hw * hc[k], ye - (ye - yt) * hs[k] * qk),
        colour + (cap - colour) * (0.4 + 0.5 * baby_hair),
        0.005,
      )

  # Downsample, then skin texture (rougher with age), lighting and sensor noise. Channel-first
  # float32, so the per-pixel maps broadcast over leading axes (several times faster).
  out = np.asarray(img.resize((size, size), Image.Resampling.BOX)).transpose(2, 0, 1).astype(np.float32)
  noise = rng.random((2, size, size), dtype=np.float32) - np.float32(0.5)
  texture = np.float32((4 + 18 * wrinkle + 8 * old) / 255)  # per unit of the 0..255 mask
  out += np.asarray(mask, dtype=np.float32) * (noise[0] * texture) + noise[1] * np.float32(8)
  gx, gy = _grid(size)
  phi = rng.uniform(0, 2 * math.pi)
  light = gx * round(math.cos(phi), 12) + gy * round(math.sin(phi), 12)
  light = 1 + np.float32(rng.uniform(0, 0.5)) * light
  contrast = rng.uniform(0.75, 1.2)
  gain = rng.uniform(0.7, 1.25) * contrast * rng.uniform(0.92, 1.08, (3, 1, 1))  # exposure, tint
  out -= np.float32(128)
  out *= light * gain.astype(np.float32)
  out += np.float32(128 + rng.uniform(-15, 15))
  image = np.ascontiguousarray(np.clip(out, 0, 255, out=out).astype(np.uint8).transpose(1, 2, 0))
  groups = {"skin_tone": SKIN_TONES[skin_index * len(SKIN_TONES) // len(_SKIN)], "gender": GENDERS[0 if male else 1]}
  return image, groups


def sample_example(seed: int, index: int, size: int = 128) -> tuple[np.ndarray, int]:
  """Returns example `index` of the dataset `seed` as (uint8 image, age), deterministically."""
  image, age, _ = sample_person(seed, index, size)
  return image, age


def sample_person(seed: int, index: int, size: int = 128) -> tuple[np.ndarray, int, dict[str, str]]:
  """Returns example `index` of the dataset `seed` as (uint8 image, age, groups); see `draw_person`."""
  rng = np.random.default_rng([seed, index])
  age = int(rng.integers(MIN_AGE, MAX_AGE + 1))
  image, groups = draw_person(age, rng, size)
  return image, age, groups


def generate(num_examples: int, seed: int, size: int = 128, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Returns images uint8 [N, size, size, 3] and ages int32 [N] for indices start..start+N-1."""
  if num_examples < 0:
    raise errors.UserError(f"demo_faces: num_examples must be >= 0, got {num_examples}")
  images = np.empty((num_examples, size, size, 3), dtype=np.uint8)
  ages = np.empty(num_examples, dtype=np.int32)
  for i in range(num_examples):
    images[i], ages[i] = sample_example(seed, start + i, size)
  return images, ages
