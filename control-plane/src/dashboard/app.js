// The control plane's dashboard: the REST API (/v1/…) read and changed with the operator's
// own token, which stays in this tab's sessionStorage. Every value from the API reaches the
// page as text (textContent), never as markup.
"use strict";

const REFRESH_MS = 3000;
const VALIDATE_DELAY_MS = 300;
const state = { token: sessionStorage.getItem("nip-token") || "", served: "", version: null, validating: null, edited: false };
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + state.token };
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  return { status: response.status, data };
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell === null || cell === undefined ? "" : String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function when(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "";
}

function problems(data) {
  const list = element("ul");
  for (const problem of (data && data.errors) || []) list.appendChild(element("li", (problem.path ? problem.path + ": " : "") + problem.message));
  if (!list.children.length) list.appendChild(element("li", (data && data.error) || "refused"));
  return list;
}

async function signIn(token) {
  state.token = token;
  const answer = await api("GET", "/v1/proxies");
  if (answer.status === 401 || answer.status === 403) {
    $("sign-in-error").textContent = (answer.data && answer.data.error) || "this token is not accepted";
    sessionStorage.removeItem("nip-token");
    return;
  }
  sessionStorage.setItem("nip-token", token);
  $("sign-in").hidden = true;
  $("main").hidden = false;
  $("sign-out").hidden = false;
  await loadConfig();
  await refresh();
  await searchLogs();
  setInterval(refresh, REFRESH_MS);
}

async function refresh() {
  await Promise.all([refreshFleet(), refreshTraffic(), refreshHistory(), refreshEvents(), refreshCanary()]);
}

async function refreshFleet() {
  const answer = await api("GET", "/v1/proxies");
  if (answer.status !== 200) return;
  const regions = new Map();
  for (const proxy of answer.data) {
    const region = proxy.region || "(no region)";
    if (!regions.has(region)) regions.set(region, []);
    regions.get(region).push(proxy);
  }
  const container = $("regions");
  container.replaceChildren();
  if (!regions.size) container.appendChild(element("p", "No proxy has connected yet."));
  for (const [region, proxies] of [...regions.entries()].sort()) {
    const block = element("div", null, "region");
    block.appendChild(element("h3", `${region} — ${proxies.filter((p) => p.connected).length} of ${proxies.length} connected`));
    const table = element("table");
    table.appendChild(row(["node", "zone", "connected", "config version", "health", "last NACK"]));
    for (const proxy of proxies) {
      const healthy = proxy.connected && !proxy.last_nack && proxy.config_version;
      const health = element("span", healthy ? "in sync" : proxy.connected ? "updating" : "disconnected", healthy ? "ok" : "error");
      const nack = proxy.last_nack ? element("span", proxy.last_nack.reason, "nack") : "-";
      const tr = row([proxy.node_id, proxy.zone, proxy.connected ? "yes" : "no", proxy.config_version || "-", health, nack]);
      tr.dataset.node = proxy.node_id;
      table.appendChild(tr);
    }
    block.appendChild(table);
    container.appendChild(block);
  }
}

async function refreshTraffic() {
  const answer = await api("GET", "/v1/traffic");
  if (answer.status !== 200) return;
  const rows = $("traffic-rows");
  rows.replaceChildren();
  if (!answer.data.routes.length) {
    rows.appendChild(row(["no records in the last minute (control_plane.stream_access_logs: true in a proxy's file)", "", "", "", ""]));
  }
  for (const route of answer.data.routes) {
    const tr = row([
      route.route || "(no route)",
      route.requests_per_second.toFixed(2),
      (route.error_rate * 100).toFixed(1) + " %",
      route.p50_ms.toFixed(1) + " ms",
      route.p99_ms.toFixed(1) + " ms",
    ]);
    tr.dataset.route = route.route;
    rows.appendChild(tr);
  }
}

async function searchLogs(event) {
  if (event) event.preventDefault();
  const query = new URLSearchParams({ limit: "50" });
  for (const [field, name] of [["log-route", "route"], ["log-status", "status"], ["log-proxy", "proxy"]]) {
    const value = $(field).value.trim();
    if (value) query.set(name, value);
  }
  const response = await fetch("/v1/logs?" + query.toString(), { headers: { authorization: "Bearer " + state.token } });
  const text = await response.text();
  const rows = $("log-rows");
  rows.replaceChildren();
  if (response.status !== 200) {
    let message = "search refused";
    try { message = JSON.parse(text).error; } catch (_) { /* not JSON */ }
    $("log-error").textContent = message;
    return;
  }
  $("log-error").textContent = "";
  const records = text.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line)).filter((r) => r.node);
  records.reverse(); // newest first
  for (const r of records) {
    rows.appendChild(row([r.start_time, r.node, r.status, r.method, r.path, r.duration_ms.toFixed(1), r.route, r.upstream_host]));
  }
  if (!records.length) rows.appendChild(row(["no records match", "", "", "", "", "", "", ""]));
}

async function refreshCanary() {
  const answer = await api("GET", "/v1/config");
  const banner = $("canary-banner");
  if (answer.status === 200 && answer.data.canary) {
    const canary = answer.data.canary;
    banner.textContent = `Canary in progress: version ${canary.version} on region ${canary.canary_region}, waiting for its proxies to ACK.`;
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
  if (answer.status === 200 && answer.data.version !== state.version && !state.edited) {
    setServed(answer.data);
  }
}

function setServed(config) {
  state.served = config.yaml;
  state.version = config.version;
  $("config-version").textContent = `version ${config.version}, by ${config.author}`;
  $("editor").value = config.yaml;
  $("diff").textContent = "(no change)";
  $("apply").disabled = true;
  $("validation").replaceChildren(element("span", "valid: what is served", "ok"));
}

async function loadConfig() {
  const answer = await api("GET", "/v1/config");
  if (answer.status === 200) setServed(answer.data);
  else $("validation").replaceChildren(element("span", (answer.data && answer.data.error) || "no config yet"));
}

async function validate() {
  const yaml = $("editor").value;
  state.edited = yaml !== state.served;
  const answer = await api("POST", "/v1/validate", { yaml });
  if (yaml !== $("editor").value) return; // typed on meanwhile: the next check answers
  const out = $("validation");
  if (answer.status === 200) {
    const ok = element("span", "valid", "ok");
    out.replaceChildren(ok);
    for (const note of answer.data.notes || []) out.appendChild(element("div", "note: " + note));
    $("diff").textContent = answer.data.diff || "(no change)";
    $("apply").disabled = !answer.data.diff;
  } else {
    out.replaceChildren(element("span", "invalid", "error"), problems(answer.data));
    $("diff").textContent = "(fix the config to see the change)";
    $("apply").disabled = true;
  }
}

async function apply(event) {
  event.preventDefault();
  const body = { yaml: $("editor").value, message: $("message").value || "from the dashboard" };
  const region = $("canary").value.trim();
  if (region) body.canary = { region, timeout_seconds: 30 };
  $("apply").disabled = true;
  $("apply-result").textContent = region ? `applying: canary on ${region}, waiting for its proxies…` : "applying…";
  const answer = await api("POST", "/v1/config", body);
  const result = $("apply-result");
  if (answer.status === 200 || answer.status === 201) {
    const version = answer.data.revision ? answer.data.revision.version : "";
    const said = { unchanged: `unchanged: version ${version} is already served`, promoted: `version ${version}: canary ACKed, promoted to every proxy` };
    result.replaceChildren(element("span", said[answer.data.result] || `version ${version} applied and pushed to every proxy`, "ok"));
    state.edited = false;
    await loadConfig();
  } else if (answer.data && answer.data.state === "aborted") {
    result.replaceChildren(element("span", `canary rolled back, version ${answer.data.version} not applied: ${answer.data.reason}`, "error"));
  } else {
    result.replaceChildren(element("span", "refused:", "error"), problems(answer.data));
  }
  await refresh();
}

async function rollback(version) {
  if (!window.confirm(`Roll back to version ${version}? Every proxy gets that config as a new version.`)) return;
  const answer = await api("POST", `/v1/rollback/${version}`, { message: "rolled back from the dashboard" });
  const result = $("apply-result");
  if (answer.status === 200 || answer.status === 201) {
    result.replaceChildren(element("span", `rolled back: version ${answer.data.revision.version} restores version ${version}`, "ok"));
    state.edited = false;
    await loadConfig();
  } else {
    result.replaceChildren(element("span", "rollback refused:", "error"), problems(answer.data));
  }
  await refresh();
}

async function refreshHistory() {
  const answer = await api("GET", "/v1/history?limit=20");
  if (answer.status !== 200) return;
  const rows = $("history-rows");
  rows.replaceChildren();
  for (const revision of answer.data) {
    const what = revision.restored_from ? `rollback to ${revision.restored_from}` : revision.message || revision.action;
    const stateText = revision.canary_region ? `${revision.state} (${revision.canary_region})` : revision.state;
    let action = "";
    if (revision.version !== state.version && revision.state !== "aborted") {
      action = element("button", `Roll back to ${revision.version}`);
      action.addEventListener("click", () => rollback(revision.version));
    }
    const tr = row([revision.version, when(revision.created_at_ms), revision.author, what, stateText, action]);
    tr.dataset.version = revision.version;
    rows.appendChild(tr);
  }
}

async function refreshEvents() {
  const answer = await api("GET", "/v1/events?limit=30");
  if (answer.status !== 200) return;
  const list = $("event-list");
  list.replaceChildren();
  for (const event of answer.data) {
    list.appendChild(element("li", `${when(event.at_ms)} ${event.actor}: ${event.action}${event.version ? " v" + event.version : ""} ${event.detail || ""}`));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem("nip-token");
    window.location.reload();
  });
  $("editor").addEventListener("input", () => {
    clearTimeout(state.validating);
    state.validating = setTimeout(validate, VALIDATE_DELAY_MS);
  });
  $("apply-form").addEventListener("submit", apply);
  $("log-search").addEventListener("submit", searchLogs);
  if (state.token) signIn(state.token);
});
