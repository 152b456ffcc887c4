// genq status page: reads the JSON API every 2 s. No build step, no dependencies.
"use strict";

const KEY_STORAGE = "genq.apiKey";
const REFRESH_MS = 2000;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

const $ = (id) => document.getElementById(id);
let selectedJob = null;
let needKey = false;
let batchesMissing = false;

class AuthError extends Error {}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE);
}

// GET a path of the API; null on 404, AuthError on 401.
async function getJSON(path) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw new AuthError(await errorMessage(response));
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(path + ": " + (await errorMessage(response)));
  return response.json();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function badge(status) {
  return el("span", { class: "badge " + status, text: status });
}

function when(value) {
  if (value === null || value === undefined) return "—";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return date.toLocaleString();
}

function shortTime(value) {
  if (!value) return "—";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return date.toLocaleTimeString();
}

function renderJobs(page) {
  const tbody = $("jobs");
  const rows = page.data.map((job) => {
    const tr = el(
      "tr",
      { "data-job-id": job.id, title: job.id },
      el("td", { class: "mono", text: job.id.slice(0, 16) + "…" }),
      el("td", {}, badge(job.status)),
      el("td", { class: "mono", text: job.model }),
      el("td", { class: "prompt", text: job.prompt }),
      el("td", { text: job.usage.completion_tokens ?? "—" }),
      el("td", { title: when(job.created_at), text: shortTime(job.created_at) }),
    );
    if (job.id === selectedJob) tr.classList.add("selected");
    tr.addEventListener("click", () => selectJob(job.id));
    return tr;
  });
  tbody.replaceChildren(...rows);
  $("no-jobs").hidden = rows.length > 0;
  const counts = {};
  for (const job of page.data) counts[job.status] = (counts[job.status] || 0) + 1;
  const parts = Object.entries(counts).map(([status, n]) => n + " " + status);
  $("job-summary").textContent = parts.length ? "(" + parts.join(", ") + ")" : "";
  $("jobs-section").hidden = false;
}

function renderBatches(page) {
  const section = $("batches-section");
  if (page === null) {
    // No batches API on this server: hide the section for good.
    batchesMissing = true;
    section.hidden = true;
    return;
  }
  const rows = page.data.map((batch) => {
    const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
    const total = counts.total || 0;
    const done = counts.completed + counts.failed;
    const okPct = total ? (100 * counts.completed) / total : 0;
    const failPct = total ? (100 * counts.failed) / total : 0;
    const bar = el(
      "span",
      { class: "progress", role: "progressbar", "aria-valuenow": String(done),
        "aria-valuemax": String(total) },
      el("span", { class: "bar", style: `width:${okPct}%;display:block` }),
      el("span", { class: "bar failed", style: `left:${okPct}%;width:${failPct}%` }),
    );
    const label = `${done} / ${total}` + (counts.failed ? ` (${counts.failed} failed)` : "");
    return el(
      "tr",
      { "data-batch-id": batch.id },
      el("td", { class: "mono", text: batch.id }),
      el("td", {}, badge(batch.status)),
      el("td", {}, bar, el("span", { class: "progress-label", text: label })),
      el("td", { title: when(batch.created_at), text: shortTime(batch.created_at) }),
    );
  });
  $("batches").replaceChildren(...rows);
  section.hidden = rows.length === 0;
}

function renderDetail(job) {
  if (job === null) {
    closeDetail();
    return;
  }
  $("detail-id").textContent = job.id;
  const status = $("detail-status");
  status.textContent = job.status;
  status.className = "badge " + job.status;
  $("detail-model").textContent = job.model;
  const usage = job.usage;
  $("detail-usage").textContent =
    `${usage.prompt_tokens ?? "—"} prompt, ${usage.completion_tokens ?? "—"} generated`;
  $("detail-created").textContent = when(job.created_at);
  $("detail-started").textContent = when(job.started_at);
  $("detail-finished").textContent = when(job.finished_at);
  $("detail-worker").textContent = job.worker || "—";
  $("detail-prompt").textContent = job.prompt;
  $("detail-output").textContent = job.output ?? (FINAL.has(job.status) ? "(none)" : "…");
  $("detail-params").textContent = JSON.stringify(job.params, null, 2);
  $("detail-error-box").hidden = !job.error;
  $("detail-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("detail").hidden = false;
}

function closeDetail() {
  selectedJob = null;
  $("detail").hidden = true;
  for (const tr of document.querySelectorAll("#jobs tr.selected")) tr.classList.remove("selected");
}

async function selectJob(id) {
  selectedJob = id;
  for (const tr of document.querySelectorAll("#jobs tr")) {
    tr.classList.toggle("selected", tr.dataset.jobId === id);
  }
  try {
    renderDetail(await getJSON("/v1/jobs/" + encodeURIComponent(id)));
  } catch (error) {
    handleError(error);
  }
}

function showKeyForm(message) {
  needKey = true;
  $("refreshed").textContent = "API key needed";
  $("key-form").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  $("jobs-section").hidden = true;
  $("batches-section").hidden = true;
  $("detail").hidden = true;
}

function showKeyInfo() {
  const key = apiKey();
  $("key-info").hidden = !key;
  $("forget-key").hidden = !key;
  $("key-info").textContent = key ? "key " + key.slice(0, 10) + "…" : "";
}

function handleError(error) {
  if (error instanceof AuthError) {
    showKeyForm(apiKey() ? error.message : "");
    return;
  }
  $("load-error").textContent = "Could not load: " + error.message;
  $("load-error").hidden = false;
}

async function refresh() {
  if (needKey) return;
  try {
    const jobs = await getJSON("/v1/jobs?limit=50");
    renderJobs(jobs);
    if (!batchesMissing) renderBatches(await getJSON("/v1/batches?limit=10"));
    if (selectedJob) renderDetail(await getJSON("/v1/jobs/" + encodeURIComponent(selectedJob)));
    $("load-error").hidden = true;
    $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    handleError(error);
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, REFRESH_MS);
}

function init() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-form").hidden = true;
    needKey = false;
    showKeyInfo();
    refresh();
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    showKeyInfo();
    closeDetail();
    needKey = false;
    refresh();
  });
  $("detail-close").addEventListener("click", closeDetail);
  showKeyInfo();
  loop();
}

document.addEventListener("DOMContentLoaded", init);
