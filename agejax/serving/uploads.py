"""A request's images from its body: multipart field `files`, or JSON {"images": [base64, ...]}.

With them, two options, each a query parameter, a form field or a JSON key: `aligned` (the images
are face crops) and `under` (threshold ages, "18,25": each face gets its P(age < T) as `p_under`).

The event loop only collects the body's bytes (`guard.Guard` bounds their size, time and the total
held over all requests); parsing runs in a small thread pool of its own, so a hostile body never
stalls the loop and at most `PARSE_THREADS` bodies are parsed at once. JSON is screened before it
is parsed: its nesting and its number of values are bounded by what a valid request can hold, so
`json.loads` never builds millions of objects or recurses deeply. Every refusal is a `Refused`
carrying its one-line JSON answer.
"""

import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import email.message
import functools
import json
import re
import threading
from collections.abc import Callable
from typing import Protocol

import python_multipart.multipart as multipart
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from agejax import labels
from agejax.serving import guard
from agejax.serving.guard import error

MAX_NAME_CHARS = 255  # longer file names are cut (with "…") in answers and logs
PARSE_THREADS = 2  # bodies parsed at once; more wait their turn
MAX_JSON_DEPTH = 8  # a valid body nests 2 deep ({"images": [...]}); the slack keeps the schema's messages
MAX_JSON_ESCAPES = 1 << 16  # backslashes in a JSON body: base64 has none, names a few \uXXXX each
MAX_BOUNDARY_CHARS = 70  # RFC 2046's limit on a multipart boundary
MAX_PART_HEADER_BYTES = 64 * 1024  # file names may be long (they are cut later); python-multipart's default is 4 KB
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
MAX_THRESHOLDS = 32  # `under` ages in one request: each face answers one probability per age


@dataclasses.dataclass
class Upload:
  """A request's images: names, bytes, whether they are face crops already, and the ages T of P(age < T) asked."""

  names: list[str]
  datas: list[bytes]
  aligned: bool
  under: tuple[int, ...] = ()


class Refused(Exception):
  """A request that gets the error answer it carries."""

  def __init__(self, response: Response):
    super().__init__(response.status_code)
    self.response = response


class UploadLimits(Protocol):
  """The limits a request's body is read under (`app.Settings` has them; app imports this module)."""

  max_files: int
  max_body_bytes: int
  body_timeout_s: float


async def read_upload(request: Request, settings: UploadLimits) -> Upload:
  """Reads a request's images (multipart field `files`, or JSON); raises `Refused`.

  Args:
    request: the request; its body is read to its end here.
    settings: the server's `app.Settings` (max_files, max_body_bytes, body_timeout_s).
  """
  kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
  parse: Callable[[list[bytes], int], tuple[list[str], list[bytes], dict[str, list[str]]]]
  if kind == "multipart/form-data":
    parse = functools.partial(_parse_multipart, _boundary(request.headers["content-type"]))
  elif kind == "application/json":
    parse = _parse_json
  else:
    raise Refused(
      error(415, 'send multipart/form-data (images in the field "files") or application/json {"images": [base64]}')
    )
  chunks = await read_body(request, settings)
  names, datas, form = await parse_off_loop(parse, chunks, settings.max_files)
  aligned = _aligned(request.query_params.getlist("aligned") + form["aligned"])
  try:
    under = thresholds(request.query_params.getlist("under") + form["under"])
  except ValueError as e:
    raise Refused(error(400, str(e))) from None
  if not datas:
    raise Refused(
      error(
        400, 'no complete file in the body: send images as multipart form field "files" (a truncated upload has none)'
      )
    )
  if len(datas) > settings.max_files:
    raise Refused(error(413, f"{len(datas)} images: at most {settings.max_files} in one request (--max_files)"))
  return Upload([_name(n) for n in names], datas, aligned, under)


async def read_body(request: Request, settings: UploadLimits) -> list[bytes]:
  """A request's body to its end, as the chunks it came in (`guard.Guard` bounds them); raises `Refused`."""
  try:
    return [chunk async for chunk in request.stream()]  # to its end: what follows is the disconnect
  except guard.BodyTooLarge:
    raise Refused(guard.too_large(settings.max_body_bytes)) from None
  except guard.BodyTimeout:
    raise Refused(guard.too_slow(settings.body_timeout_s)) from None
  except guard.BuffersFull as e:
    raise Refused(e.response) from None
  except ClientDisconnect:  # nobody is left to read an answer
    raise Refused(error(400, "the client disconnected before sending the whole body")) from None


_parsers: concurrent.futures.ThreadPoolExecutor | None = None
_parsers_lock = threading.Lock()


async def parse_off_loop(fn, *args):
  """Runs fn(*args) in the parse threads (made on first use) and returns its result."""
  global _parsers
  with _parsers_lock:
    if _parsers is None:
      _parsers = concurrent.futures.ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="agejax-parse")
  return await asyncio.get_running_loop().run_in_executor(_parsers, fn, *args)


def _boundary(content_type: str) -> str:
  """A multipart body's boundary, checked from its Content-Type before any of the body is read."""
  boundary = _options(content_type).get_param("boundary")
  if not isinstance(boundary, str) or not boundary:
    raise Refused(error(400, "bad multipart body: its Content-Type names no boundary"))
  if len(boundary) > MAX_BOUNDARY_CHARS:
    raise Refused(
      error(400, f"bad multipart body: a boundary of {len(boundary)} characters, over RFC 2046's {MAX_BOUNDARY_CHARS}")
    )
  if not boundary.isascii():
    raise Refused(error(400, "bad multipart body: its boundary is not ASCII"))
  return boundary


def _parse_multipart(
  boundary: str, chunks: list[bytes], max_files: int
) -> tuple[list[str], list[bytes], dict[str, list[str]]]:
  """In a parse thread: (file names, their bytes, the form's `aligned` and `under` values) of a multipart body."""
  parts: list[tuple[list[tuple[str, str]], bytearray]] = []
  header = ["", ""]
  ended = False

  def on_part_begin() -> None:
    if len(parts) >= max_files + 8:
      raise Refused(error(413, f"more than {max_files} files in one request (--max_files)"))
    parts.append(([], bytearray()))

  def on_header_end() -> None:
    parts[-1][0].append((header[0].lower(), header[1]))
    header[:] = ["", ""]

  def on_end() -> None:
    nonlocal ended
    ended = True

  callbacks = {
    "on_part_begin": on_part_begin,
    "on_part_data": lambda data, start, end: parts[-1][1].extend(data[start:end]),
    "on_header_field": lambda data, start, end: header.__setitem__(0, header[0] + _text(data[start:end])),
    "on_header_value": lambda data, start, end: header.__setitem__(1, header[1] + _text(data[start:end])),
    "on_header_end": on_header_end,
    "on_end": on_end,
  }
  parser = multipart.MultipartParser(boundary, callbacks, max_header_size=MAX_PART_HEADER_BYTES)  # type: ignore[arg-type]
  try:
    for i in range(len(chunks)):
      chunk, chunks[i] = chunks[i], b""  # each chunk freed once parsed: the body is held once, not twice
      parser.write(chunk)
    parser.finalize()
  except (multipart.MultipartParseError, ValueError) as e:
    raise Refused(error(400, f"bad multipart body: {_one_line(e)}")) from None
  names: list[str] = []
  datas: list[bytes] = []
  form: dict[str, list[str]] = {"aligned": [], "under": []}
  for i, (headers, data) in enumerate(parts):
    try:  # RFC 2231 names may declare any codec; one that fails is the client's error
      disposition = _options(dict(headers).get("content-disposition", ""), "content-disposition")
      field = disposition.get_param("name", header="content-disposition")
      filename = disposition.get_filename()
    except (ValueError, LookupError) as e:
      raise Refused(error(400, f"bad multipart body: part {i}'s Content-Disposition: {_one_line(e)}")) from None
    if field == "files":
      if filename is None:
        raise Refused(error(400, 'the form field "files" must hold files (multipart file parts), not text'))
      names.append(_valid_name(filename, f"files[{len(names)}]'s filename") or f"files[{len(names)}]")
      datas.append(bytes(data))
    elif field in form:
      if filename is not None:
        raise Refused(error(400, f'the form field "{field}" must be text ({_FORM_TEXT[field]}), not a file'))
      form[field].append(data.decode("utf-8", "replace"))
    else:
      raise Refused(
        error(
          400, f'unexpected form field {field!r} (part {i}): send images in the field "files" (and "aligned", "under")'
        )
      )
  if not ended and datas:  # the body stopped inside a part: its last file is cut
    raise Refused(error(400, "the multipart body ends before its closing boundary (a truncated upload)"))
  return names, datas, form


_FORM_TEXT = {"aligned": "true or false", "under": "ages such as 18,25"}


def _parse_json(chunks: list[bytes], max_files: int) -> tuple[list[str], list[bytes], dict[str, list[str]]]:
  """In a parse thread: (names, bytes, `aligned` and `under` values) of a JSON body {"images": [...], ...}."""
  body = b"".join(chunks)
  chunks.clear()
  screen_json(body, max_values=4 * max_files + 64)
  try:  # UTF-8 only (RFC 8259): json.loads would also guess UTF-16 and 32, whose bytes the screen can't read
    text = body.decode("utf-8")
  except UnicodeDecodeError as e:
    raise Refused(error(400, f"the JSON body is not UTF-8: {_one_line(e)}")) from None
  del body
  try:
    doc = json.loads(text)
  except ValueError as e:
    raise Refused(error(400, f"the body is not JSON: {_one_line(e)}")) from None
  del text
  if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
    raise Refused(error(400, 'the JSON body must be an object with "images": a list of base64 strings'))
  unknown = set(doc) - {"images", "aligned", "names", "under"}
  if unknown:
    raise Refused(
      error(400, f"unexpected JSON key(s) {sorted(map(ascii, unknown))}: use images, aligned, names and under")
    )
  images = doc["images"]
  if len(images) > max_files:
    raise Refused(error(413, f"{len(images)} images: at most {max_files} in one request (--max_files)"))
  names = doc.get("names", [f"images[{i}]" for i in range(len(images))])
  if not isinstance(names, list) or len(names) != len(images) or not all(isinstance(n, str) for n in names):
    raise Refused(error(400, '"names" must be a list of strings, one per image'))
  names = [_valid_name(name, f"names[{i}]") for i, name in enumerate(names)]
  datas = []
  for i, text in enumerate(images):
    if not isinstance(text, str):
      raise Refused(error(400, f"images[{i}] must be a base64 string, not {type(text).__name__}"))
    if text.startswith("data:") and "," in text:  # a data: URL, as a browser's FileReader gives
      text = text.split(",", 1)[1]
    try:
      datas.append(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as e:
      raise Refused(error(400, f"images[{i}] is not valid base64: {e}", file=names[i])) from None
  aligned = doc.get("aligned", None)
  if aligned is not None and not isinstance(aligned, bool):
    raise Refused(error(400, f'"aligned" must be true or false, not {ascii(aligned)[:40]}'))
  return names, datas, {"aligned": [] if aligned is None else [str(aligned)], "under": _json_under(doc.get("under"))}


def _json_under(value: object) -> list[str]:
  """A JSON body's `under` as text values: a string ("18,25"), a whole age (18) or a list of whole ages."""
  if value is None:
    return []
  items = value if isinstance(value, list) else [value]
  if len(items) > MAX_THRESHOLDS or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in items):
    raise Refused(error(400, f'"under" must be ages such as "18,25", 18 or [18, 25], not {ascii(value)[:40]}'))
  return [str(v) for v in items]


_JSON_STRUCTURE = re.compile(rb'["\[\]{},:]')


def screen_json(body: bytes, max_values: int, hint: str = "a request takes at most a list of images and names") -> None:
  """Refuses a JSON body nested deeper than MAX_JSON_DEPTH or holding more than `max_values` values.

  Counts the structural characters outside strings (each value, key and container has one) without
  building anything, so `json.loads` then parses at most `max_values` values: a body of millions of
  empty objects or lists, or one nested 100,000 deep, is refused before it costs memory or recursion.
  A body that is not JSON at all passes here and `json.loads` says where it breaks.
  """
  if body.count(b"\\") > MAX_JSON_ESCAPES:
    raise Refused(error(400, f"the JSON body has over {MAX_JSON_ESCAPES} escapes (backslashes)"))
  depth = values = 0
  at = 0
  while match := _JSON_STRUCTURE.search(body, at):
    char, at = body[match.start()], match.end()
    values += 1
    if values > max_values:
      raise Refused(error(413, f"the JSON body holds over {max_values} values: {hint}"))
    if char == 0x22:  # '"': skip the string
      at = _string_end(body, at)
      if at < 0:
        return
    elif char in b"[{":
      depth += 1
      if depth > MAX_JSON_DEPTH:
        raise Refused(error(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels"))
    elif char in b"]}":
      depth -= 1


def _string_end(body: bytes, at: int) -> int:
  """The index after the quote that closes the JSON string starting at `at` (-1: none)."""
  while (quote := body.find(b'"', at)) >= 0:
    escapes = 0
    while quote - escapes > at and body[quote - escapes - 1] == 0x5C:  # backslashes: bounded by MAX_JSON_ESCAPES
      escapes += 1
    if escapes % 2 == 0:
      return quote + 1
    at = quote + 1
  return -1


def _valid_name(name: str, field: str) -> str:
  """`name` if it can be written as UTF-8 (the answer's JSON); a lone surrogate is the client's error."""
  try:
    name.encode("utf-8")
  except UnicodeEncodeError as e:
    bad = ascii(name[e.start : e.end])
    raise Refused(error(400, f"{field} is not valid Unicode: it holds a lone surrogate {bad}", field=field)) from None
  return name


def _name(name: str) -> str:
  return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:300]


def _options(value: str, header: str = "content-type") -> email.message.Message:
  """A header value parsed like a MIME header (RFC 2231's filename*=UTF-8''... included)."""
  message = email.message.Message()
  message[header] = value
  return message


def _text(data: bytes) -> str:
  return bytes(data).decode("utf-8", "replace")  # browsers send file names as raw UTF-8


def thresholds(values: list[str]) -> tuple[int, ...]:
  """The ages of every `under` value given ("18,25"; each age once, in order); raises ValueError in one line."""
  try:
    ages = labels.check_thresholds(age for value in values for age in labels.parse_thresholds(value))
  except ValueError as e:
    raise ValueError(f"under: {e}") from None
  if len(ages) > MAX_THRESHOLDS:
    raise ValueError(f"under: {len(ages)} ages, at most {MAX_THRESHOLDS} in one request")
  return ages


def _aligned(values: list[str]) -> bool:
  try:
    flags = {_flag(v) for v in values}
  except ValueError as e:
    raise Refused(error(400, str(e))) from None
  if len(flags) > 1:
    raise Refused(error(400, f"aligned given {len(values)} times with different values {values}: send it once"))
  return flags.pop() if flags else False


def _flag(value: str) -> bool:
  value = str(value).strip().lower()
  if value not in _TRUE + _FALSE:
    raise ValueError(f"aligned={value!r}: use true or false")
  return value in _TRUE
