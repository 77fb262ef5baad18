// Live mode: microphone (and camera) through getUserMedia, streamed over WS /v1/stream
// (docs/STREAMING.md, protocol 1): f32le PCM at 16 kHz in 100 ms messages, JPEG frames from a
// canvas at 5 per second; the updates drawn as a rolling plot of the score, and the words.
// Uses $, svg, fmt and clock from app.js. Nothing is loaded from elsewhere.
"use strict";

const LIVE_RATE = 16000; // the stream's audio rate (the server's grid is built on 16 kHz)
const LIVE_PIECE = 1600; // samples per audio message: 100 ms
const LIVE_FRAME_MS = 200; // a video frame every 200 ms (the extractor samples 5 per second)
const LIVE_FRAME_WIDTH = 320;
const LIVE_WINDOW_S = 30; // the plot shows the last 30 s
const KIND_AUDIO = 1;
const KIND_VIDEO = 2;

let live = null; // the running stream's state

function liveStatus(text, isError = false) {
  const el = $("#live-status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// One binary message: kind, 3 reserved bytes, float64 timestamp, uint32 length, payload.
function mediaMessage(kind, timestamp, payload) {
  const bytes = new Uint8Array(16 + payload.byteLength);
  const view = new DataView(bytes.buffer);
  view.setUint8(0, kind);
  view.setFloat64(4, timestamp, true);
  view.setUint32(12, payload.byteLength, true);
  bytes.set(new Uint8Array(payload.buffer || payload, payload.byteOffset || 0, payload.byteLength), 16);
  return bytes.buffer;
}

function f32le(samples) {
  const out = new DataView(new ArrayBuffer(samples.length * 4));
  for (let i = 0; i < samples.length; i++) out.setFloat32(i * 4, samples[i], true);
  return new Uint8Array(out.buffer);
}

// A resampler from the audio context's rate down to LIVE_RATE: each output sample is the mean
// of the input samples its span covers (a box filter against aliasing); state carries over.
function makeDownsampler(inRate, outRate) {
  if (inRate === outRate) return (x) => x;
  const ratio = inRate / outRate;
  let carry = new Float32Array(0);
  let pos = 0;
  return (x) => {
    const buf = new Float32Array(carry.length + x.length);
    buf.set(carry);
    buf.set(x, carry.length);
    const out = [];
    while (pos + ratio <= buf.length) {
      const a = Math.floor(pos), b = Math.min(buf.length, Math.ceil(pos + ratio));
      let sum = 0;
      for (let i = a; i < b; i++) sum += buf[i];
      out.push(sum / Math.max(1, b - a));
      pos += ratio;
    }
    const keep = Math.floor(pos);
    carry = buf.slice(keep);
    pos -= keep;
    return Float32Array.from(out);
  };
}

function sendOrQueue(message) {
  if (!live) return;
  if (live.open && live.ws.readyState === WebSocket.OPEN) live.ws.send(message);
  else if (!live.open) live.queue.push(message);
}

function onSamples(block) {
  if (!live || live.stopping) return;
  let samples = live.downsample(block);
  const room = live.limit - live.sent - live.buffered;
  if (samples.length >= room) samples = samples.subarray(0, Math.max(0, room));
  live.buffer.push(samples);
  live.buffered += samples.length;
  while (live.buffered >= LIVE_PIECE) flushAudio(LIVE_PIECE);
  if (live.sent + live.buffered >= live.limit) stopLive(); // "stop after" reached
}

function flushAudio(count) {
  const piece = new Float32Array(count);
  let filled = 0;
  while (filled < count && live.buffer.length) {
    const head = live.buffer[0];
    const take = Math.min(head.length, count - filled);
    piece.set(head.subarray(0, take), filled);
    filled += take;
    if (take === head.length) live.buffer.shift();
    else live.buffer[0] = head.subarray(take);
  }
  live.buffered -= filled;
  if (!filled) return;
  sendOrQueue(mediaMessage(KIND_AUDIO, live.sent / LIVE_RATE, f32le(piece.subarray(0, filled))));
  live.sent += filled;
  $("#live-status").dataset.sentSeconds = (live.sent / LIVE_RATE).toFixed(3);
}

function grabFrame() {
  if (!live || live.stopping || live.frameBusy) return;
  const video = $("#live-video");
  if (video.readyState < 2 || !video.videoWidth) return;
  const scale = Math.min(1, LIVE_FRAME_WIDTH / video.videoWidth);
  const canvas = live.canvas;
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  const at = live.sent / LIVE_RATE; // stream time: the audio clock
  live.frameBusy = true;
  canvas.toBlob(async (blob) => {
    try {
      if (blob && live && !live.stopping) {
        sendOrQueue(mediaMessage(KIND_VIDEO, Math.max(at, live.lastFrame), new Uint8Array(await blob.arrayBuffer())));
        live.lastFrame = Math.max(at, live.lastFrame);
        live.frames += 1;
      }
    } finally {
      if (live) live.frameBusy = false;
    }
  }, "image/jpeg", 0.8);
}

async function audioTap(ctx) {
  if (ctx.audioWorklet) {
    await ctx.audioWorklet.addModule("/static/pcm-worklet.js");
    const node = new AudioWorkletNode(ctx, "pcm-tap");
    node.port.onmessage = (e) => onSamples(e.data);
    return node;
  }
  const node = ctx.createScriptProcessor(4096, 1, 1); // browsers without AudioWorklet
  node.onaudioprocess = (e) => onSamples(new Float32Array(e.inputBuffer.getChannelData(0)));
  return node;
}

// An audio context at the stream's rate lets the browser resample; a browser that cannot (or
// cannot connect a microphone to it) gets one at its own rate, resampled here.
function audioContext(rate) {
  try {
    return rate ? new AudioContext({ sampleRate: rate }) : new AudioContext();
  } catch (e) {
    return new AudioContext();
  }
}

async function startLive() {
  if (live) return;
  const camera = $("#live-camera").checked;
  $("#live-start").disabled = true;
  $("#live-words").textContent = "";
  $("#live-final").textContent = "";
  $("#live-score").textContent = "–";
  const label = $("#live-label");
  label.textContent = "–";
  label.className = "label";
  liveStatus("Asking for the microphone" + (camera ? " and camera…" : "…"));
  // The audio graph is ready before the microphone opens, so that no sound is lost.
  let ctx = audioContext(LIVE_RATE);
  let tap, media, source;
  try {
    tap = await audioTap(ctx);
    media = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 }, video: camera });
    try {
      source = ctx.createMediaStreamSource(media);
    } catch (e) {
      ctx.close().catch(() => {});
      ctx = audioContext(null);
      tap = await audioTap(ctx);
      source = ctx.createMediaStreamSource(media);
    }
  } catch (e) {
    ctx.close().catch(() => {});
    if (media) for (const track of media.getTracks()) track.stop();
    liveStatus(`No microphone${camera ? " or camera" : ""}: ${e.message || e}`, true);
    $("#live-start").disabled = false;
    return;
  }
  const hasVideo = camera && media.getVideoTracks().length > 0;
  const limitS = Number($("#live-limit").value);
  live = {
    ws: null, ctx, media, open: false, stopping: false, queue: [], buffer: [], buffered: 0,
    sent: 0, frames: 0, lastFrame: 0, frameBusy: false, canvas: document.createElement("canvas"),
    downsample: makeDownsampler(ctx.sampleRate, LIVE_RATE), points: [], words: [], updates: 0,
    timer: null, nodes: [], limit: limitS > 0 ? Math.round(limitS * LIVE_RATE) : Infinity,
  };
  const mute = ctx.createGain();
  mute.gain.value = 0; // the tap must reach the destination to run; nothing is heard
  source.connect(tap);
  tap.connect(mute);
  mute.connect(ctx.destination);
  live.nodes = [source, tap, mute];
  ctx.resume().catch(() => {});
  if (hasVideo) {
    const video = $("#live-video");
    video.srcObject = media;
    video.classList.remove("hidden");
    video.play().catch(() => {});
    live.timer = setInterval(grabFrame, LIVE_FRAME_MS);
  }

  $("#live-plot").dataset.updates = "0";
  const token = $("#token").value.trim();
  const protocols = ["cmamba.v1"];
  if (token) protocols.push(`cmamba.token.${token}`);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/stream`, protocols);
  ws.binaryType = "arraybuffer";
  live.ws = ws;
  const state = live;
  ws.onopen = () => {
    const start = {
      type: "start",
      audio: { format: "f32le", sample_rate: LIVE_RATE },
      video: hasVideo ? { format: "jpeg" } : null,
      update_interval_s: 1.0,
    };
    const hint = $("#transcript").value.trim();
    if (hint) start.transcript_hint = hint;
    ws.send(JSON.stringify(start));
  };
  ws.onmessage = (e) => onLiveMessage(state, JSON.parse(e.data));
  ws.onclose = (e) => onLiveClose(state, e);
  $("#live-stop").disabled = false;
  liveStatus("Connecting…");
}

function releaseMedia(state) {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  for (const node of state.nodes) { try { node.disconnect(); } catch (e) { /* gone */ } }
  state.nodes = [];
  for (const track of state.media.getTracks()) track.stop();
  if (state.ctx.state !== "closed") state.ctx.close().catch(() => {});
  const video = $("#live-video");
  video.srcObject = null;
  video.classList.add("hidden");
}

function stopLive() {
  if (!live || live.stopping) return;
  live.stopping = true;
  if (live.buffered) flushAudio(live.buffered);
  releaseMedia(live);
  $("#live-stop").disabled = true;
  if (live.ws.readyState === WebSocket.OPEN && live.open) {
    live.ws.send(JSON.stringify({ type: "stop" }));
    liveStatus("Stopping: waiting for the final answer…");
  } else {
    live.ws.close();
  }
}

function showSentiment(sentiment) {
  $("#live-score").textContent = fmt(sentiment.score);
  const label = $("#live-label");
  label.textContent = sentiment.label;
  label.className = `label ${sentiment.label}`;
}

function onLiveMessage(state, msg) {
  if (msg.type === "ready") {
    state.open = true;
    for (const m of state.queue) state.ws.send(m);
    state.queue = [];
    liveStatus(`Streaming (${msg.modalities.join(", ")})…`);
  } else if (msg.type === "update") {
    state.updates += 1;
    state.points.push([msg.stream_time_s, msg.sentiment.score, msg.sentiment.label]);
    for (const w of msg.words) state.words.push(w.text);
    $("#live-words").textContent = state.words.join(" ");
    showSentiment(msg.sentiment);
    $("#live-stats").textContent = `at ${clock(msg.stream_time_s)} · lag ${fmt(msg.lag_s, 1)} s · ${fmt(msg.latency_ms, 0)} ms${msg.dropped_frames ? ` · ${msg.dropped_frames} frames dropped` : ""}`;
    $("#live-plot").dataset.updates = String(state.updates);
    drawLivePlot(state);
    if (!state.stopping) liveStatus(`Streaming: ${state.updates} update${state.updates === 1 ? "" : "s"}, ${msg.modalities.active.join(", ") || "no modality"} active.`);
  } else if (msg.type === "final") {
    const result = msg.result;
    showSentiment(result.sentiment);
    const transcript = result.modalities && result.modalities.transcript;
    if (transcript) $("#live-words").textContent = transcript;
    const final = $("#live-final");
    final.textContent = `Final answer over ${fmt(msg.stream_time_s, 1)} s: ${fmt(result.sentiment.score, 3)} ${result.sentiment.label} (${msg.reason}).`;
    final.dataset.score = String(result.sentiment.score);
    final.dataset.label = result.sentiment.label;
    state.points.push([msg.stream_time_s, result.sentiment.score, result.sentiment.label]);
    drawLivePlot(state);
    state.final = msg;
  } else if (msg.type === "error") {
    state.error = `${msg.error.type}: ${msg.error.message}`;
  }
}

function onLiveClose(state, event) {
  if (!state.stopping) {
    state.stopping = true;
    releaseMedia(state);
  }
  if (state.final) liveStatus(`Stream ended after ${state.updates} update${state.updates === 1 ? "" : "s"}.`);
  else liveStatus(`The stream closed (${event.code}${state.error ? ` ${state.error}` : event.reason ? ` ${event.reason}` : ""}).`, event.code !== 1000);
  if (live === state) live = null;
  $("#live-start").disabled = false;
  $("#live-stop").disabled = true;
}

function drawLivePlot(state) {
  const host = $("#live-plot");
  host.replaceChildren();
  const W = 640, H = 200, L = 40, R = 10, T = 10, B = 24;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" }, host);
  const end = Math.max(LIVE_WINDOW_S, ...state.points.map((p) => p[0]));
  const begin = end - LIVE_WINDOW_S;
  const shown = state.points.filter((p) => p[0] >= begin);
  const top = Math.max(1, ...shown.map((p) => Math.abs(p[1])));
  const x = (t) => L + ((t - begin) / LIVE_WINDOW_S) * (W - L - R);
  const y = (v) => T + (1 - (v + top) / (2 * top)) * (H - T - B);
  svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }, root);
  svg("line", { class: "zero", x1: L, y1: y(0), x2: W - R, y2: y(0) }, root);
  for (const v of [-top, top]) svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, root).textContent = v.toFixed(1);
  for (let i = 0; i <= 6; i++) {
    const t = begin + (LIVE_WINDOW_S * i) / 6;
    if (t >= 0) svg("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" }, root).textContent = clock(t);
  }
  if (shown.length > 1) svg("polyline", { class: "trend", points: shown.map((p) => `${x(p[0])},${y(p[1])}`).join(" ") }, root);
  for (const [t, v, label] of shown) {
    svg("circle", { class: "pt", cx: x(t), cy: y(v), r: 3, fill: COLORS[label] || COLORS.neutral }, root);
  }
  root.dataset.points = String(shown.length);
}

$("#live-start").addEventListener("click", startLive);
$("#live-stop").addEventListener("click", stopLive);
