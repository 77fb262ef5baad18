// The sentiment-over-time page: upload a clip, POST it to /v1/timeline, draw the answer.
// Plain DOM and inline SVG; nothing is loaded from elsewhere.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = { positive: "#1a9850", neutral: "#8c8c8c", negative: "#d73027" };
let current = null; // { answer, scale }

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function fmt(x, digits = 2) {
  return x === null || x === undefined ? "n/a" : Number(x).toFixed(digits);
}

function clock(s) {
  const m = Math.floor(s / 60);
  const sec = s - m * 60;
  return `${m}:${sec.toFixed(1).padStart(4, "0")}`;
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function labelScale(name, headers) {
  try {
    const r = await fetch(`/v2/models/${encodeURIComponent(name)}`, { headers });
    if (r.ok) {
      const meta = await r.json();
      if (Array.isArray(meta.label_scale)) return meta.label_scale.map(Number);
    }
  } catch (e) { /* fall back below */ }
  return null;
}

async function analyse(file) {
  if (!file) return;
  if (typeof jobsMode === "function" && jobsMode()) return submitJob(file); // jobs.js
  const video = $("#video");
  if (video.dataset.url) URL.revokeObjectURL(video.dataset.url);
  video.dataset.url = URL.createObjectURL(file);
  video.src = video.dataset.url;
  $("#result").classList.remove("hidden");
  $("#plot").replaceChildren();
  $("#segments tbody").replaceChildren();
  setStatus(`Analysing ${file.name} (${(file.size / 1024).toFixed(0)} KiB)…`);

  const form = new FormData();
  form.append("file", file, file.name);
  const transcript = $("#transcript").value.trim();
  if (transcript) form.append("transcript", transcript);
  const headers = {};
  const token = $("#token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  const started = performance.now();
  let answer;
  try {
    const r = await fetch("/v1/timeline", { method: "POST", body: form, headers });
    answer = await r.json();
    if (!r.ok) {
      const err = answer && answer.error ? `${answer.error.type}: ${answer.error.message}` : r.statusText;
      setStatus(`The server refused the clip (${r.status}) ${err}`, true);
      return;
    }
  } catch (e) {
    setStatus(`The request failed: ${e}`, true);
    return;
  }
  const scale = (await labelScale(answer.model.name, headers)) || symmetricScale(answer);
  current = { answer, scale };
  render();
  const secs = ((performance.now() - started) / 1000).toFixed(1);
  const n = answer.segments.length;
  setStatus(`${file.name}: ${n} segment${n === 1 ? "" : "s"}, ${fmt(answer.duration_s, 1)} s, answered in ${secs} s.`);
}

function symmetricScale(answer) {
  const top = Math.max(1, ...answer.segments.map((s) => Math.abs(s.score)), Math.abs(answer.sentiment.score));
  return [-top, top];
}

function render() {
  const { answer } = current;
  drawPlot();
  $("#overall-score").textContent = fmt(answer.sentiment.score);
  const label = $("#overall-label");
  label.textContent = answer.sentiment.label;
  label.className = `label ${answer.sentiment.label}`;
  $("#overall-method").textContent = answer.overall_method === "clip"
    ? "Scored on the whole clip at once."
    : "Duration-weighted mean of the segments (the clip is longer than one model call).";
  drawBars($("#attribution"), ["text", "audio", "visual"].map((m) => [m, answer.attribution[m]]), true);
  const stages = Object.entries(answer.timings_ms).filter(([k, v]) => k !== "total" && v > 0);
  stages.push(["total", answer.timings_ms.total]);
  drawBars($("#timings"), stages, false, " ms");
  const m = answer.model;
  $("#model-info").textContent = `${m.name} v${m.version} on ${m.device} (scan ${m.scan_backend}); ${answer.clips_scored} model inputs, largest batch ${answer.largest_batch}.`;
  fillTable();
}

function drawBars(container, rows, signed, unit = "") {
  container.replaceChildren();
  const top = Math.max(1e-9, ...rows.map(([, v]) => Math.abs(v || 0)));
  for (const [name, value] of rows) {
    const row = document.createElement("div");
    row.className = "bar";
    row.dataset.name = name;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    if (value !== null && value !== undefined) {
      const frac = Math.abs(value) / top;
      if (signed) {
        fill.className = `fill ${value < 0 ? "neg" : "pos"}`;
        fill.style.width = `${frac * 50}%`;
        fill.style.left = value < 0 ? `${50 - frac * 50}%` : "50%";
        const center = document.createElement("div");
        center.className = "center";
        track.appendChild(center);
      } else {
        fill.className = "fill";
        fill.style.left = "0";
        fill.style.width = `${frac * 100}%`;
      }
      track.appendChild(fill);
    }
    const label = document.createElement("span");
    label.textContent = name;
    const val = document.createElement("span");
    val.className = "value";
    val.textContent = value === null || value === undefined ? "n/a" : (signed ? (value >= 0 ? "+" : "") + fmt(value, 3) : fmt(value, 1) + unit);
    row.append(label, track, val);
    container.appendChild(row);
  }
}

function drawPlot() {
  const { answer, scale } = current;
  const host = $("#plot");
  host.replaceChildren();
  const W = 640, H = 260, L = 44, R = 12, T = 12, B = 28;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" }, host);
  const duration = Math.max(answer.duration_s, 1e-3);
  const [lo, hi] = scale;
  const x = (t) => L + (t / duration) * (W - L - R);
  const y = (v) => T + (1 - (Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo)) * (H - T - B);
  svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }, root);
  svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }, root);
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    svg("line", { class: Math.abs(v) < 1e-9 ? "zero" : "axis", x1: L, y1: y(v), x2: W - R, y2: y(v), opacity: 0.6 }, root);
    svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, root).textContent = v.toFixed(1);
  }
  const ticks = Math.min(8, Math.max(2, Math.floor(duration)));
  for (let i = 0; i <= ticks; i++) {
    const t = (duration * i) / ticks;
    svg("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" }, root).textContent = clock(t);
  }
  const points = [];
  answer.segments.forEach((seg, i) => {
    const x0 = x(seg.start), x1 = Math.max(x(seg.end), x0 + 2);
    const y0 = y(0), ys = y(seg.score);
    const rect = svg("rect", {
      class: "seg", "data-index": i, x: x0, width: x1 - x0,
      y: Math.min(y0, ys), height: Math.max(2, Math.abs(y0 - ys)),
      fill: COLORS[seg.label] || COLORS.neutral, opacity: 0.85,
    }, root);
    svg("title", {}, rect).textContent = `${clock(seg.start)}–${clock(seg.end)}  ${fmt(seg.score)} ${seg.label}${seg.transcript ? "\n" + seg.transcript : ""}`;
    rect.addEventListener("click", () => seek(seg.start));
    points.push(`${(x0 + x1) / 2},${ys}`);
  });
  if (points.length > 1) svg("polyline", { class: "trend", points: points.join(" ") }, root);
  svg("line", { class: "playhead", id: "playhead", x1: L, y1: T, x2: L, y2: H - B }, root);
  root.dataset.segments = String(answer.segments.length);
  current.x = x;
}

function fillTable() {
  const body = $("#segments tbody");
  body.replaceChildren();
  current.answer.segments.forEach((seg, i) => {
    const tr = document.createElement("tr");
    tr.dataset.index = i;
    const cells = [
      `${clock(seg.start)}–${clock(seg.end)}`,
      seg.transcript || (seg.source === "window" ? "(no speech)" : ""),
      fmt(seg.score), seg.label,
      fmt(seg.attribution.text, 3), fmt(seg.attribution.audio, 3), fmt(seg.attribution.visual, 3),
    ];
    cells.forEach((text, j) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (j === 2 || j >= 4) td.className = "num";
      if (j === 3) { const s = document.createElement("span"); s.className = `label ${seg.label}`; s.textContent = text; td.textContent = ""; td.appendChild(s); }
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => seek(seg.start));
    body.appendChild(tr);
  });
}

function seek(t) {
  const video = $("#video");
  try { video.currentTime = t; } catch (e) { /* not seekable yet */ }
  movePlayhead(t);
}

function movePlayhead(t) {
  if (!current || !current.x) return;
  const head = document.getElementById("playhead");
  if (head) { head.setAttribute("x1", current.x(t)); head.setAttribute("x2", current.x(t)); }
  document.querySelectorAll("#segments tbody tr").forEach((tr) => {
    const seg = current.answer.segments[Number(tr.dataset.index)];
    tr.classList.toggle("current", t >= seg.start && t < seg.end);
  });
}

function init() {
  const zone = $("#drop-zone");
  $("#file-input").addEventListener("change", (e) => analyse(e.target.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]);
  });
  $("#video").addEventListener("timeupdate", (e) => movePlayhead(e.target.currentTime));
}

init();
