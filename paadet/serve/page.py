"""The web page served at ``/``: pick or drop an image, see its detections drawn, filter by score.

One self-contained HTML file (no external scripts, fonts or styles), kept here as a string so that it
ships inside the package. The API-key field is on the page only when the server requires a key
(:func:`page_html`). It posts the file's bytes to ``POST /v1/detect`` and draws the answer on a
canvas; the ``Server-Timing`` header gives the milliseconds per stage. For tests and tools the page
exposes what it drew: ``#drawn-count`` holds the number of boxes drawn, ``#drawn`` (``data-boxes``)
their JSON, and ``body[data-state]`` is ``done`` (or ``error``) once a result is shown.
"""

from __future__ import annotations

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>paadet serve</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 1.2em; text-align: center; margin-bottom: 1em; }
  #drop.over { border-color: #06c; background: #eef5ff; }
  #controls { display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap; margin-bottom: 1em; }
  canvas { width: 640px; max-width: 100%; height: auto; border: 1px solid #ccc; }
  #timings { font-family: ui-monospace, monospace; white-space: pre; }
  .error { color: #b00; }
</style>
</head>
<body data-state="idle">
<h1>paadet serve</h1>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<div id="controls">
  <label>score &ge; <input type="range" id="thr" min="0" max="1" step="0.01" value="0.3">
    <output id="thr-value">0.30</output></label>
<!--api-key-->  <span>boxes drawn: <span id="drawn-count">0</span> of <span id="total-count">0</span></span>
  <span id="status"></span>
</div>
<canvas id="canvas" width="640" height="360"></canvas>
<div id="timings"></div>
<div id="drawn" data-boxes="[]" hidden></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
                 "#46f0f0", "#f032e6", "#bcf60c", "#008080", "#9a6324"];
let bitmap = null, answer = null;

function draw() {
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  if (!bitmap || !answer) return;
  canvas.width = answer.width; canvas.height = answer.height;
  ctx.drawImage(bitmap, 0, 0, answer.width, answer.height);
  const thr = parseFloat($("thr").value);
  $("thr-value").textContent = thr.toFixed(2);
  const shown = answer.detections.filter((d) => d.score >= thr);
  const lw = Math.max(1, Math.round(Math.max(answer.width, answer.height) / 400));
  ctx.lineWidth = lw; ctx.font = `${Math.max(10, 6 * lw)}px sans-serif`; ctx.textBaseline = "top";
  for (const d of shown) {
    const [x1, y1, x2, y2] = d.bbox, colour = palette[d.label % palette.length];
    ctx.strokeStyle = colour; ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.name} ${d.score.toFixed(2)}`, w = ctx.measureText(text).width + 4, h = Math.max(10, 6 * lw) + 4;
    ctx.fillStyle = colour; ctx.fillRect(x1, Math.max(0, y1 - h), w, h);
    ctx.fillStyle = "#fff"; ctx.fillText(text, x1 + 2, Math.max(0, y1 - h) + 2);
  }
  $("drawn-count").textContent = String(shown.length);
  $("total-count").textContent = String(answer.detections.length);
  $("drawn").dataset.boxes = JSON.stringify(shown.map((d) => ({bbox: d.bbox, score: d.score, label: d.label})));
}

function serverTiming(header) {
  const out = [];
  for (const part of (header || "").split(",")) {
    const m = part.trim().match(/^([\w-]+).*?dur=([\d.]+)/);
    if (m) out.push([m[1], parseFloat(m[2])]);
  }
  return out;
}

async function detect(file) {
  document.body.dataset.state = "busy";
  $("status").textContent = "detecting..."; $("status").className = "";
  const started = performance.now();
  try {
    const headers = {};
    if ($("key") && $("key").value) headers["Authorization"] = "Bearer " + $("key").value;
    const response = await fetch("/v1/detect", {method: "POST", body: file, headers});
    const body = await response.json();
    if (!response.ok) throw new Error(`${response.status}: ${body.error || response.statusText}`);
    const roundTrip = performance.now() - started;
    bitmap = await createImageBitmap(file);
    answer = body;
    draw();
    const lines = serverTiming(response.headers.get("Server-Timing"))
      .map(([n, ms]) => `${n.padEnd(12)} ${ms.toFixed(1)} ms`);
    lines.push(`${"round trip".padEnd(12)} ${roundTrip.toFixed(1)} ms`);
    $("timings").textContent = lines.join("\n");
    $("status").textContent = `${body.width}x${body.height}, ${body.detections.length} detections`;
    document.body.dataset.state = "done";
  } catch (err) {
    $("status").textContent = String(err.message || err); $("status").className = "error";
    document.body.dataset.state = "error";
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) detect(e.target.files[0]); });
$("thr").addEventListener("input", draw);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) detect(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""

_KEY_FIELD = '  <label>API key <input type="password" id="key" size="16" autocomplete="off"></label>\n'


def page_html(require_key: bool) -> str:
    """The page, with the API-key field only when ``POST /v1/detect`` requires a key."""
    return PAGE_HTML.replace("<!--api-key-->", _KEY_FIELD if require_key else "")
