// The Jobs panel: long recordings sent to POST /v1/jobs, listed with progress bars (polled),
// and a finished one opened as the timeline view. Uses app.js's helpers ($, render, current...).
"use strict";

const JOB_POLL_MS = 1500;
const jobFiles = new Map(); // job id -> the File uploaded from this page (for the video)
let jobTimer = null;

function authHeaders() {
  const headers = {};
  const token = $("#token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

function jobsMode() {
  return $("#as-job").checked;
}

async function submitJob(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  setStatus(`Sending ${file.name} (${(file.size / 1048576).toFixed(1)} MiB) as a job…`);
  try {
    const r = await fetch("/v1/jobs", { method: "POST", body: form, headers: authHeaders() });
    const body = await r.json();
    if (r.status !== 202) {
      const err = body && body.error ? `${body.error.type}: ${body.error.message}` : r.statusText;
      setStatus(`The server refused the job (${r.status}) ${err}`, true);
      return;
    }
    jobFiles.set(body.id, file);
    setStatus(`${file.name}: queued as job ${body.id.slice(0, 8)}; see Jobs below.`);
  } catch (e) {
    setStatus(`The request failed: ${e}`, true);
    return;
  }
  refreshJobs();
}

function jobRow(job) {
  const tr = document.createElement("tr");
  tr.dataset.id = job.id;
  tr.dataset.state = job.state;
  const name = document.createElement("td");
  name.textContent = job.filename || job.id.slice(0, 8);
  const state = document.createElement("td");
  state.className = "job-state";
  state.textContent = job.state;
  const progress = document.createElement("td");
  const bar = document.createElement("div");
  bar.className = "progress";
  const fill = document.createElement("div");
  fill.className = `fill ${job.state}`;
  const fraction = job.progress.fraction === null ? 0 : job.progress.fraction;
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  bar.appendChild(fill);
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuenow", (fraction * 100).toFixed(0));
  const caption = document.createElement("span");
  caption.className = "note";
  const total = job.progress.media_seconds;
  caption.textContent = total === null
    ? (job.progress.stage || "")
    : `${clock(job.progress.done_seconds)} of ${clock(total)}${job.progress.stage ? " · " + job.progress.stage : ""}`;
  progress.append(bar, caption);
  const action = document.createElement("td");
  if (job.state === "succeeded") {
    const open = document.createElement("button");
    open.className = "open-job";
    open.textContent = "Open";
    open.addEventListener("click", () => openJob(job));
    action.appendChild(open);
  } else if (job.error) {
    action.textContent = job.error.message;
    action.className = "note";
  }
  tr.append(name, state, progress, action);
  return tr;
}

async function refreshJobs() {
  clearTimeout(jobTimer);
  let listed;
  try {
    const r = await fetch("/v1/jobs?limit=20", { headers: authHeaders() });
    if (!r.ok) {
      $("#jobs-note").textContent = r.status === 401 ? "Type the API token to see the jobs." : `Jobs unavailable (${r.status}).`;
      jobTimer = setTimeout(refreshJobs, JOB_POLL_MS * 4);
      return;
    }
    listed = await r.json();
  } catch (e) {
    jobTimer = setTimeout(refreshJobs, JOB_POLL_MS * 4);
    return;
  }
  const body = $("#jobs tbody");
  body.replaceChildren(...listed.jobs.map(jobRow));
  $("#jobs-note").textContent = listed.jobs.length ? "" : "No jobs yet: tick “Run as a job” and choose a recording.";
  const busy = listed.jobs.some((j) => j.state === "queued" || j.state === "running");
  jobTimer = setTimeout(refreshJobs, busy ? JOB_POLL_MS : JOB_POLL_MS * 4);
}

async function openJob(job) {
  setStatus(`Opening job ${job.id.slice(0, 8)}…`);
  const headers = authHeaders();
  const r = await fetch(`/v1/jobs/${job.id}/result`, { headers });
  const answer = await r.json();
  if (!r.ok) {
    setStatus(`The job has no result (${r.status}) ${answer.error ? answer.error.message : ""}`, true);
    return;
  }
  const video = $("#video");
  if (video.dataset.url) URL.revokeObjectURL(video.dataset.url);
  const file = jobFiles.get(job.id);
  video.dataset.url = file ? URL.createObjectURL(file) : "";
  video.src = video.dataset.url;
  $("#result").classList.remove("hidden");
  const scale = (await labelScale(answer.model.name, headers)) || symmetricScale(answer);
  current = { answer, scale };
  render();
  const n = answer.segments.length;
  setStatus(`${job.filename || job.id}: job result, ${n} segment${n === 1 ? "" : "s"}, ${fmt(answer.duration_s, 1)} s.`);
}

refreshJobs();
