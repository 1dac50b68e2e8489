// The page: sends each chosen or dropped photo to POST /v1/predict, then draws the photo with its
// faces boxed and aged, and each face's age distribution as an SVG bar chart. No libraries.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PHOTO_MAX_SIDE = 560; // the canvas's longer side, in CSS pixels
const CHART = { width: 520, height: 150, left: 34, right: 8, top: 10, bottom: 24 };
const UNDER = 18; // each face shows its P(age < 18): the server's calibrated mass before the 18th birthday

const drop = document.getElementById("drop");
const input = document.getElementById("files");
const aligned = document.getElementById("aligned");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
let pending = 0;

input.addEventListener("change", () => {
  handle(input.files);
  input.value = ""; // choosing the same file again fires "change" again
});
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  handle(event.dataTransfer.files);
});

// One request per photo: a bad file fails alone, and the server batches the concurrent faces.
function handle(files) {
  for (const file of files) predictOne(file);
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function predictOne(file) {
  const card = element("article", { class: "photo" });
  card.append(element("h2", {}, file.name));
  results.prepend(card);
  pending += 1;
  setStatus(`Predicting ${pending} photo(s)…`);
  try {
    const body = new FormData();
    body.append("files", file, file.name);
    const url = `/v1/predict?under=${UNDER}` + (aligned.checked ? "&aligned=true" : "");
    const response = await fetch(url, { method: "POST", body });
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    await show(card, file, answer.results[0], answer.min_age, answer.timing_ms);
  } catch (err) {
    card.append(element("p", { class: "none error" }, `Not predicted: ${err.message}`));
  } finally {
    pending -= 1;
    setStatus(pending ? `Predicting ${pending} photo(s)…` : "");
  }
}

async function show(card, file, result, minAge, timing) {
  // The server applied the photo's EXIF orientation, and so does createImageBitmap: boxes line up.
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, PHOTO_MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = element("canvas", { width: Math.round(bitmap.width * scale), height: Math.round(bitmap.height * scale) });
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  // The boxes are SVG over the photo, in the photo's own pixels (the API's box units), so they stay
  // on the faces at any displayed size and can be read back from the page.
  const boxes = svgElement("svg", {
    class: "boxes", viewBox: `0 0 ${bitmap.width} ${bitmap.height}`, preserveAspectRatio: "none", "aria-hidden": "true",
  });
  result.faces.forEach((face, i) => drawBox(boxes, face, i, scale));
  const photo = element("div", { class: "photo-frame" });
  photo.append(canvas, boxes);

  const list = element("div", { class: "faces" });
  if (!result.faces.length) list.append(element("p", { class: "none" }, "No face found."));
  result.faces.forEach((face, i) => {
    const item = element("div", { class: "face" });
    const [low, high] = face.interval80;
    const label = element("p", { class: "age-label" }, `Face ${i + 1}: age ${face.age.toFixed(1)} `);
    const details = element("small", {}, `80%: ${low.toFixed(0)}–${high.toFixed(0)} · peak ${face.argmax_age.toFixed(0)} · std ${face.std.toFixed(1)} · `);
    const under = face.p_under[String(UNDER)];
    details.append(element("span", { class: "p-under", "data-p": under }, `P(age < ${UNDER}) ${(100 * under).toFixed(1)}%`));
    label.append(details);
    item.append(label, chart(face, minAge));
    list.append(item);
  });
  list.append(element("p", { class: "none" }, `Server time ${timing.total.toFixed(0)} ms (model ${timing.model.toFixed(1)} ms).`));
  const body = element("div", { class: "body" });
  body.append(photo, list);
  card.append(body);
}

// A face's box and its "n: age" tag, in photo pixels; `scale` is the canvas's size over the photo's.
function drawBox(svg, face, i, scale) {
  const [x, y, w, h] = face.box;
  const line = Math.max(2, Math.round(PHOTO_MAX_SIDE / 200)); // in displayed pixels
  svg.append(svgElement("rect", { class: "face-box", x, y, width: w, height: h, "stroke-width": line }));
  const size = Math.max(13, line * 7) / scale; // the tag's font size in photo pixels
  const pad = 4 / scale;
  const text = svgElement("text", { class: "face-tag", "font-size": size, x: x + pad, "dominant-baseline": "hanging" }, `${i + 1}: ${face.age.toFixed(1)}`);
  const th = size + 2 * pad;
  const ty = y - th >= 0 ? y - th : y + h; // above the box, or below it at the photo's top edge
  text.setAttribute("y", ty + pad);
  const tag = svgElement("rect", { class: "face-tag-back", x, y: ty, width: (text.textContent.length * 0.62 * size) + 2 * pad, height: th });
  svg.append(tag, text);
}

// Bars of P(age), the 80% interval darker, a line at the predicted (expected) age.
function chart(face, minAge) {
  const { width, height, left, right, top, bottom } = CHART;
  const probs = face.distribution;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const peak = Math.max(...probs) || 1;
  const barW = plotW / probs.length;
  const x = (age) => left + (age - minAge + 0.5) * barW;
  const svg = svgElement("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
  svg.append(svgElement("title", {}, `Age distribution: predicted ${face.age.toFixed(1)}`));
  const [low, high] = face.interval80;
  probs.forEach((p, i) => {
    const age = minAge + i;
    const h = (p / peak) * plotH;
    const bar = svgElement("rect", {
      class: age >= Math.floor(low) && age <= Math.ceil(high) ? "bar inside" : "bar",
      x: left + i * barW, y: top + plotH - h, width: Math.max(barW - 0.5, 0.5), height: h,
    });
    bar.append(svgElement("title", {}, `age ${age}: ${(100 * p).toFixed(2)}%`));
    svg.append(bar);
  });
  svg.append(svgElement("line", { class: "axis", x1: left, x2: width - right, y1: top + plotH, y2: top + plotH }));
  svg.append(svgElement("line", { class: "axis", x1: left, x2: left, y1: top, y2: top + plotH }));
  const firstTick = Math.ceil(minAge / 10) * 10;
  for (let age = firstTick; age < minAge + probs.length; age += 10) {
    svg.append(svgElement("text", { x: x(age), y: height - 8, "text-anchor": "middle" }, String(age)));
  }
  svg.append(svgElement("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, `${(100 * peak).toFixed(0)}%`));
  svg.append(svgElement("line", { class: "mean", x1: x(face.age), x2: x(face.age), y1: top, y2: top + plotH }));
  svg.append(svgElement("text", { x: x(face.age) + 4, y: top + 10 }, face.age.toFixed(1)));
  return svg;
}

function element(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgElement(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
