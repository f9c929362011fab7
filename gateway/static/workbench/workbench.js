// The policy workbench: plain DOM, no framework, no build step, nothing loaded from outside.
// The admin token lives in sessionStorage (this tab only) and travels as a header.
"use strict";

const TOKEN_KEY = "gateway-admin-token";
const COLORS = ["#1570ef", "#d92d20", "#079455", "#dc6803", "#7a5af8", "#0e9384", "#c11574", "#667085"];
const state = { policies: [], etag: null, editing: null, writable: true, auditCursor: null };

const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) {
    const td = el("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "" : String(c);
    tr.appendChild(td);
  }
  return tr;
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401) signOut("The admin token was refused.");
  return { status: resp.status, ok: resp.ok, data };
}

function errorText(res) {
  const e = res.data && res.data.error;
  return e ? e.message : "HTTP " + res.status;
}

// -- sign-in -----------------------------------------------------------------------------------

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  const res = await api("GET", "/admin/policies/overview");
  if (!res.ok) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("signin-error").textContent = res.status === 401 ? "Wrong admin token." : errorText(res);
    return;
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  $("whoami").textContent = "signed in (admin)";
  showPolicies(res.data);
  loadDatasets();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("app").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
  $("whoami").textContent = "";
  $("signin-error").textContent = message || "";
}

// -- tabs --------------------------------------------------------------------------------------

function showTab(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + name;
  if (name === "policies") refreshPolicies();
  if (name === "audit") refreshAudit(true);
  if (name === "try") fillTrySources();
}

// -- policies ----------------------------------------------------------------------------------

async function refreshPolicies() {
  const res = await api("GET", "/admin/policies/overview");
  if (res.ok) showPolicies(res.data);
}

function showPolicies(data) {
  state.policies = data.data;
  state.writable = data.writable;
  $("policies-dir").textContent = "Directory: " + data.directory + (data.writable ? "" : " (read-only)") +
    ". Guards loaded: " + data.guards_loaded.join(", ");
  const body = $("policies-table").tBodies[0];
  body.replaceChildren();
  for (const p of data.data) {
    const edit = el("button", "Edit", { type: "button", "data-name": p.name });
    edit.addEventListener("click", () => { showTab("edit"); openPolicy(p.name); });
    const status = p.error ? el("span", "reload error: " + p.error, { class: "error" }) : "ok";
    body.appendChild(row([p.name, p.version, status, p.loaded_at, (p.judges || []).join(", "), edit]));
  }
  const select = $("edit-policy");
  const current = select.value;
  select.replaceChildren(...data.data.map((p) => el("option", p.name, { value: p.name })));
  if (current) select.value = current;
  const ro = $("edit-readonly");
  ro.hidden = data.writable;
  ro.textContent = data.writable ? "" : "Saving is off: " + data.read_only_reason;
  $("save-btn").disabled = !data.writable;
}

// -- edit --------------------------------------------------------------------------------------

function renderGutter(errorLines) {
  const lines = $("editor").value.split("\n").length;
  const gutter = $("gutter");
  gutter.replaceChildren();
  for (let i = 1; i <= lines; i++) {
    const span = el("span", i, { "data-line": String(i) });
    if (errorLines && errorLines.has(i)) span.classList.add("err");
    gutter.appendChild(span);
  }
  gutter.scrollTop = $("editor").scrollTop;
}

function showErrors(errors) {
  const list = $("edit-errors");
  list.replaceChildren();
  const lines = new Set();
  for (const e of errors) {
    if (e.line) lines.add(e.line);
    list.appendChild(el("li", (e.line ? "line " + e.line + ": " : "") + e.field + ": " + e.message, { "data-line": String(e.line || "") }));
  }
  if (lines.size) {  // bring the first error into view
    const lineHeight = parseFloat(getComputedStyle($("editor")).lineHeight) || 19.5;
    $("editor").scrollTop = Math.max(0, (Math.min(...lines) - 4) * lineHeight);
  }
  renderGutter(lines);
}

async function openPolicy(name) {
  $("edit-policy").value = name;
  const res = await api("GET", "/admin/policies/" + encodeURIComponent(name) + "/source");
  if (!res.ok) { $("edit-status").textContent = errorText(res); return; }
  state.editing = name;
  state.etag = res.data.etag;
  $("editor").value = res.data.yaml;
  $("edit-version").textContent = "version " + res.data.version + (res.data.error ? " (last reload failed: " + res.data.error + ")" : "");
  $("edit-status").textContent = "";
  $("edit-status").className = "";
  showErrors([]);
}

async function validateDraft() {
  const res = await api("POST", "/admin/policies/validate", { yaml: $("editor").value, name: state.editing });
  if (!res.ok) { $("edit-status").textContent = errorText(res); return false; }
  showErrors(res.data.errors);
  $("edit-status").className = res.data.valid ? "saved" : "error";
  $("edit-status").textContent = res.data.valid ? "Valid (version " + res.data.policy.version + ")" : res.data.errors.length + " error(s)";
  return res.data.valid;
}

async function saveDraft() {
  const name = state.editing;
  const res = await api("PUT", "/admin/policies/" + encodeURIComponent(name), { yaml: $("editor").value, etag: state.etag });
  const status = $("edit-status");
  if (res.status === 409) {
    status.className = "conflict";
    status.textContent = "Conflict: " + errorText(res) + " Your text is still in the editor.";
    return;
  }
  if (res.status === 400 && res.data && res.data.error && res.data.error.errors) {
    showErrors(res.data.error.errors);
    status.className = "error";
    status.textContent = "Not saved: " + errorText(res);
    return;
  }
  if (!res.ok) { status.className = "error"; status.textContent = "Not saved: " + errorText(res); return; }
  state.etag = res.data.etag;
  showErrors([]);
  status.className = "saved";
  status.textContent = "Saved: version " + res.data.version + " is live.";
  $("edit-version").textContent = "version " + res.data.version;
}

// -- try ---------------------------------------------------------------------------------------

function fillTrySources() {
  const select = $("try-source");
  const current = select.value;
  const options = state.policies.map((p) => el("option", p.name + " (saved, v" + p.version + ")", { value: "saved:" + p.name }));
  if (state.editing) options.unshift(el("option", state.editing + " (unsaved draft in the editor)", { value: "draft" }));
  select.replaceChildren(...options);
  if (current && [...select.options].some((o) => o.value === current)) select.value = current;
}

function readFile(input, asDataUrl) {
  return new Promise((resolve, reject) => {
    const file = input.files && input.files[0];
    if (!file) { resolve(null); return; }
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    if (asDataUrl) reader.readAsDataURL(file); else reader.readAsText(file);
  });
}

function topScore(categories) {
  let best = null;
  for (const [k, c] of Object.entries(categories)) if (!best || c.score > best[1].score) best = [k, c];
  return best ? best[0] + " " + best[1].score.toFixed(3) : "";
}

async function tryIt() {
  const source = $("try-source").value;
  const body = { prompt: $("try-prompt").value };
  if (source === "draft") body.draft = $("editor").value; else body.policy = source.slice("saved:".length);
  const image = await readFile($("try-image"), true);
  if (image) body.image = image;
  if ($("try-answer").value) body.answer = $("try-answer").value;
  const outcome = $("try-outcome");
  outcome.className = "outcome";
  outcome.textContent = "…";
  const res = await api("POST", "/admin/policies/dry-run", body);
  const tbody = $("try-guards").tBodies[0];
  tbody.replaceChildren();
  $("try-diff").replaceChildren();
  if (!res.ok) {
    outcome.textContent = "Cannot try: " + errorText(res);
    $("try-json").textContent = JSON.stringify(res.data, null, 2);
    return;
  }
  const d = res.data;
  const response = d.response;
  if (response.status === 400) {
    outcome.className = "outcome blocked";
    outcome.textContent = "Blocked (400 content_filter) by " + (d.input.decided_by.join(", ") || "a failed guard") + ": " + d.input.reasons.join("; ");
  } else if (d.output && d.output.blocked) {
    outcome.className = "outcome blocked";
    outcome.textContent = "Answer withheld (finish_reason content_filter) by " + d.output.decided_by.join(", ");
  } else {
    outcome.className = "outcome allowed";
    const hits = Object.keys(d.input.hits).concat(d.output ? Object.keys(d.output.hits) : []);
    outcome.textContent = "Allowed (200)" + (hits.length ? ", annotated: " + hits.join(", ") : "");
  }
  for (const g of d.guards) {
    const verdict = g.error ? "error: " + g.error : Object.entries(g.categories).filter(([, c]) => c.detected || c.severity !== "safe").map(([k, c]) => k + " " + c.severity).join(", ") || "nothing found";
    tbody.appendChild(row([g.stage, g.guard, verdict, topScore(g.categories), g.latency_ms]));
  }
  if (d.difference) {
    const diff = $("try-diff");
    diff.appendChild(el("li", "Saved policy answers " + d.difference.status.saved + ", the draft " + d.difference.status.draft + "."));
    for (const c of d.difference.changes) diff.appendChild(el("li", c.stage + " " + c.what + ": saved " + (c.saved ?? "no hit") + " → draft " + (c.draft ?? "no hit")));
    if (!d.difference.changes.length) diff.appendChild(el("li", "No difference from the saved version."));
  }
  $("try-json").textContent = JSON.stringify(response.status === 400 ? response.body : response, null, 2);
}

// -- evaluate ----------------------------------------------------------------------------------

async function loadDatasets() {
  const res = await api("GET", "/admin/policies/datasets");
  if (!res.ok) return;
  const select = $("eval-dataset");
  select.replaceChildren(el("option", "(none)", { value: "" }), ...res.data.data.map((n) => el("option", n, { value: n })));
}

const fmt = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(2));

async function evaluateDraft() {
  const body = { policy: state.editing || $("edit-policy").value, draft: $("editor").value || undefined };
  const text = await readFile($("eval-file"), false);
  if (text) body.jsonl = text; else if ($("eval-dataset").value) body.dataset = $("eval-dataset").value;
  $("eval-status").textContent = "running…";
  const res = await api("POST", "/admin/policies/evaluate", body);
  if (!res.ok) { $("eval-status").textContent = errorText(res); return; }
  const d = res.data;
  $("eval-status").textContent = d.lines + " lines; blocked: saved " + (d.saved ? d.saved.blocked : "n/a") + ", draft " + (d.draft ? d.draft.blocked : "n/a");
  const tbody = $("eval-table").tBodies[0];
  tbody.replaceChildren();
  const cats = new Set([...Object.keys((d.saved || {}).categories || {}), ...Object.keys((d.draft || {}).categories || {})]);
  for (const c of cats) {
    const s = ((d.saved || {}).categories || {})[c] || {};
    const r = ((d.draft || {}).categories || {})[c] || {};
    tbody.appendChild(row([c, fmt(s.precision), fmt(s.recall), fmt(s.fpr), fmt(r.precision), fmt(r.recall), fmt(r.fpr)]));
  }
  const changed = $("eval-changed");
  changed.replaceChildren();
  for (const c of d.changed) {
    changed.appendChild(el("li", "line " + c.line + ": " + JSON.stringify(c.text) + " expected [" + c.expected.join(", ") + "]: saved [" + c.saved.hits.join(", ") + "] → draft [" + c.draft.hits.join(", ") + "]"));
  }
  if (!d.changed.length) changed.appendChild(el("li", "No line changed."));
}

// -- audit -------------------------------------------------------------------------------------

function auditParams() {
  const params = new URLSearchParams();
  for (const f of ["since", "until", "key", "policy", "category", "action", "stage"]) {
    const v = $("audit-" + f).value.trim();
    if (v) params.set(f, v);
  }
  return params;
}

async function refreshAudit(reset) {
  const params = auditParams();
  params.set("limit", "50");
  if (!reset && state.auditCursor) params.set("cursor", state.auditCursor);
  const res = await api("GET", "/admin/audit?" + params.toString());
  const tbody = $("audit-table").tBodies[0];
  if (reset) tbody.replaceChildren();
  if (!res.ok) { tbody.appendChild(row(["Cannot read the audit log: " + errorText(res)])); return; }
  for (const e of res.data.data) {
    const cats = Object.entries(e.categories).map(([k, c]) => k + " (" + (c.severity || c.action) + ", " + c.score + ")").join(", ");
    tbody.appendChild(row([e.time, e.action, e.stage, e.policy + " v" + e.policy_version, e.key_name || e.key_id || "", cats, e.decided_by.join(", "), e.request_id || ""]));
  }
  state.auditCursor = res.data.next_cursor;
  $("audit-more").hidden = !state.auditCursor;
  if (reset) drawChart();
}

async function drawChart() {
  const params = auditParams();
  const res = await api("GET", "/admin/audit/summary?" + params.toString());
  const svg = $("audit-chart");
  const legend = $("audit-legend");
  svg.replaceChildren();
  legend.replaceChildren();
  if (!res.ok) return;
  const buckets = res.data.buckets;
  const cats = Object.keys(res.data.categories).sort();
  const NS = "http://www.w3.org/2000/svg";
  const width = 720, height = 160, pad = 20;
  const max = Math.max(1, ...buckets.map((b) => Object.values(b.categories).reduce((a, n) => a + n, 0)));
  const barW = buckets.length ? (width - 2 * pad) / buckets.length : 0;
  const axis = document.createElementNS(NS, "line");
  for (const [k, v] of Object.entries({ x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#98a2b3" })) axis.setAttribute(k, v);
  svg.appendChild(axis);
  buckets.forEach((b, i) => {
    let y = height - pad;
    cats.forEach((c, ci) => {
      const n = b.categories[c] || 0;
      if (!n) return;
      const h = (n / max) * (height - 2 * pad);
      y -= h;
      const rect = document.createElementNS(NS, "rect");
      for (const [k, v] of Object.entries({ x: pad + i * barW + 1, y, width: Math.max(1, barW - 2), height: h, fill: COLORS[ci % COLORS.length] })) rect.setAttribute(k, v);
      const title = document.createElementNS(NS, "title");
      title.textContent = c + ": " + n + " (" + new Date(b.start_ms).toISOString() + ")";
      rect.appendChild(title);
      svg.appendChild(rect);
    });
  });
  const label = document.createElementNS(NS, "text");
  label.setAttribute("x", pad); label.setAttribute("y", 12); label.setAttribute("font-size", "11");
  label.textContent = res.data.total + " decisions; max " + max + " per bar";
  svg.appendChild(label);
  cats.forEach((c, ci) => {
    const span = el("span");
    const swatch = el("i");
    swatch.style.background = COLORS[ci % COLORS.length];
    span.append(swatch, c + " " + res.data.categories[c]);
    legend.appendChild(span);
  });
}

// -- wiring ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value); $("token").value = ""; });
  $("signout").addEventListener("click", () => signOut(""));
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("edit-policy").addEventListener("change", () => openPolicy($("edit-policy").value));
  $("edit-load").addEventListener("click", () => openPolicy($("edit-policy").value));
  $("editor").addEventListener("input", () => renderGutter(null));
  $("editor").addEventListener("scroll", () => { $("gutter").scrollTop = $("editor").scrollTop; });
  $("validate-btn").addEventListener("click", validateDraft);
  $("save-btn").addEventListener("click", saveDraft);
  $("try-btn").addEventListener("click", tryIt);
  $("eval-btn").addEventListener("click", evaluateDraft);
  $("audit-form").addEventListener("submit", (ev) => { ev.preventDefault(); refreshAudit(true); });
  $("audit-more").addEventListener("click", () => refreshAudit(false));
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
});
