// The aima-metrics web console: plain ES module, no build step. Every figure comes from the API with the
// token typed into the login form.
//
// Why the token lives where it does: it is kept in sessionStorage (this tab only, gone when the tab
// closes, never in a cookie, so no other site can make the browser send it) and sent as
// "Authorization: Bearer". The live alert feed uses fetch() and reads the response body as a stream,
// not EventSource: EventSource cannot set headers, and the alternative, the token in the URL, would put a
// long-lived secret into access logs, proxies and the browser history.

const TOKEN_KEY = "aima_token";
const page = document.getElementById("page");
const hasCharts = typeof window.uPlot === "function";
let me = null;
let feedAbort = null;
const feedItems = [];

const token = () => sessionStorage.getItem(TOKEN_KEY);

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token()}` } });
  if (response.status === 401) {
    logout("the token is unknown, revoked or expired");
    throw new Error("unauthenticated");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || `${response.status}`);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

const fmt = (value, digits = 1) => (value == null ? "–" : Number(value).toFixed(digits));
const gib = (bytes) => (bytes == null ? "–" : (bytes / 2 ** 30).toFixed(1));
const when = (iso) => (iso ? new Date(iso).toISOString().replace("T", " ").slice(0, 19) : "–");

function table(headers, rows) {
  return el("table", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h))), ...rows);
}

function chart(target, title, series, xs, ys) {
  // series: names of the y series; xs: unix seconds; ys: one array per series
  if (!hasCharts) {
    target.append(el("p", { class: "note" }, "charts need the uPlot library: run ./dev setup"));
    return;
  }
  if (!xs.length) return;
  const colours = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
  const opts = {
    title, width: Math.min(1000, window.innerWidth - 60), height: 220,
    series: [{}, ...series.map((label, i) => ({ label, stroke: colours[i % colours.length], width: 2 }))],
  };
  new window.uPlot(opts, [xs, ...ys], target);
}

// -- login ---------------------------------------------------------------------------------------------

function logout(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (feedAbort) feedAbort.abort();
  me = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("login-error").textContent = why || "";
  document.getElementById("login-form").hidden = false;
  page.replaceChildren();
}

async function login() {
  try {
    me = await api("/whoami");
  } catch (error) {
    if (token()) logout(error.message);
    return;
  }
  document.getElementById("login-form").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  const projects = me.projects ? ` · projects ${me.projects.join(", ")}` : "";
  document.getElementById("who").textContent = `${me.name} (${me.role})${projects}`;
  if (me.can.alerts) startFeed();
  route();
}

document.getElementById("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  document.getElementById("token").value = "";
  login();
});
document.getElementById("logout").addEventListener("click", () => logout());

// -- the live alert feed (admins) ----------------------------------------------------------------------

function parseEvents(buffer, onEvent) {
  // Server-sent events are separated by a blank line; returns what is left of an unfinished one.
  let at;
  while ((at = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, at);
    buffer = buffer.slice(at + 2);
    let name = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) name = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (data) onEvent(name, JSON.parse(data));
  }
  return buffer;
}

async function startFeed() {
  if (feedAbort) feedAbort.abort();
  feedAbort = new AbortController();
  const signal = feedAbort.signal;
  let delay = 1000;
  while (!signal.aborted) {
    try {
      const response = await fetch("/alerts/stream", {
        headers: { Authorization: `Bearer ${token()}` }, signal,
      });
      if (!response.ok) throw new Error(`stream: ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      delay = 1000;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = parseEvents(buffer + value, onStreamEvent);
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    setFeedState("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 30000);
  }
}

function setFeedState(text) {
  const state = document.getElementById("feed-state");
  if (state) state.textContent = text;
  document.body.dataset.feed = text;
}

function onStreamEvent(name, data) {
  if (name === "ready") { setFeedState("live"); return; }
  if (name !== "alert" || data.op !== "INSERT") return;
  const alert = data.alert;
  feedItems.unshift({ ...alert, fresh: true });
  feedItems.splice(200);
  if ("Notification" in window && Notification.permission === "granted") {
    const what = alert.annotations?.summary || "";
    new Notification(`${alert.status}: ${alert.rule}`, { body: `${alert.severity} ${what}`, tag: alert.fingerprint });
  }
  if (location.hash === "#alerts" || location.hash === "") renderFeed();
}

function alertItem(alert) {
  const labels = Object.entries(alert.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  return el("li", { class: alert.fresh ? "new" : "", "data-fingerprint": alert.fingerprint, "data-status": alert.status },
    el("span", { class: `badge ${alert.status}` }, alert.status), " ",
    el("strong", {}, alert.rule), ` ${alert.severity} · ${when(alert.event_time)} · ${labels} `,
    el("span", { class: "note" }, alert.annotations?.summary || ""));
}

function renderFeed() {
  const list = document.getElementById("feed");
  if (list) list.replaceChildren(...feedItems.map(alertItem));
}

async function alertsPage() {
  if (!me.can.alerts) {
    page.replaceChildren(el("h1", {}, "Alerts"),
      el("p", { class: "note", id: "alerts-admin-only" },
        "The alert feed is for admin tokens: alerts are fleet-wide and carry no project, so a user or " +
        "finance token does not see them."));
    return;
  }
  const button = el("button", { id: "notify" }, "Enable browser notifications");
  button.addEventListener("click", () => Notification.requestPermission().then(() => alertsPage()));
  const permission = "Notification" in window ? Notification.permission : "unsupported";
  page.replaceChildren(
    el("h1", {}, "Alerts ", el("span", { class: "note", id: "feed-state" }, document.body.dataset.feed || "connecting")),
    permission === "default" ? button : el("p", { class: "note" }, `browser notifications: ${permission}`),
    el("h2", {}, "Live feed"), el("ul", { id: "feed" }),
    el("h2", {}, "Firing now"), el("div", { id: "current" }));
  renderFeed();
  const current = await api("/alerts?state=current&limit=200");
  document.getElementById("current").replaceChildren(table(["rule", "severity", "since", "labels", "value"],
    current.alerts.map((a) => el("tr", {}, el("td", {}, a.rule), el("td", {}, a.severity), el("td", {}, when(a.starts_at)),
      el("td", {}, Object.entries(a.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ")), el("td", { class: "num" }, fmt(a.value, 2))))));
}

// -- fleet ---------------------------------------------------------------------------------------------

async function fleetPage() {
  if (!me.can.fleet) {
    page.replaceChildren(el("h1", {}, "Fleet"), el("p", { class: "note" },
      "This token may not read GPU metrics (it needs the scopes of utilization, memory and temperature)."));
    return;
  }
  const fleet = await api("/fleet");
  const charts = el("div", { id: "fleet-chart" });
  page.replaceChildren(el("h1", {}, `Fleet: ${fleet.gpus} GPUs, ${fleet.idle} idle (below ${fleet.idle_below} %)`), charts);
  for (const host of fleet.hosts) {
    page.append(el("h2", {}, host.host), table(
      ["GPU", "model", "utilization %", "memory GiB", "temperature °C", "power W", "seen"],
      host.gpus.map((g) => el("tr", { class: g.idle ? "idle" : "" },
        el("td", {}, `${g.gpu}${g.mig_instance ? ` / ${g.mig_instance}` : ""} `, g.idle ? el("span", { class: "badge idle-badge" }, "idle") : ""),
        el("td", {}, g.gpu_model), el("td", { class: "num" }, fmt(g.utilization_percent)),
        el("td", { class: "num" }, `${gib(g.memory_used_bytes)} / ${gib(g.memory_total_bytes)}`),
        el("td", { class: "num" }, fmt(g.temperature_celsius)), el("td", { class: "num" }, fmt(g.power_watts, 0)),
        el("td", {}, when(g.last_seen))))));
  }
  if (!fleet.hosts.length) page.append(el("p", { class: "note" }, "no GPU sample in the last 5 minutes"));
  const hosts = [...new Set(fleet.history.map((r) => r.host))];
  const times = [...new Set(fleet.history.map((r) => Date.parse(r.minute) / 1000))].sort((a, b) => a - b);
  const ys = hosts.map((h) => times.map((t) => fleet.history.find((r) => r.host === h && Date.parse(r.minute) / 1000 === t)?.utilization_percent ?? null));
  chart(charts, "mean GPU utilization % per host (last hour)", hosts, times, ys);
}

// -- costs ---------------------------------------------------------------------------------------------

async function costsPage() {
  const [budgets, costs] = await Promise.all([api("/budgets"), api("/costs?group_by=project&period=day")]);
  const charts = el("div", { id: "costs-chart" });
  page.replaceChildren(el("h1", {}, "Costs against budgets"), table(
    ["project", "budget", "spent €", "budget €", "used", "forecast €"],
    budgets.budgets.map((b) => {
      const over = (b.forecast_eur ?? 0) > (b.budget_eur ?? Infinity);
      const used = b.budget_utilization_percent ?? 0;
      return el("tr", { "data-project": b.project },
        el("td", {}, b.project), el("td", {}, b.budget), el("td", { class: "num" }, fmt(b.spent_eur, 2)),
        el("td", { class: "num" }, fmt(b.budget_eur, 2)),
        el("td", {}, el("span", { class: `bar ${used > 100 ? "over" : ""}`, style: `width:${Math.min(used, 100)}px` }), ` ${fmt(used, 0)} %`),
        el("td", { class: `num ${over ? "over" : ""}` }, fmt(b.forecast_eur, 2)));
    })), charts);
  // Rows of no project carry the energy of GPUs no job held (idle): no GPU-hour cost, so not in the chart.
  const groups = [...new Set(costs.rows.map((r) => r.project))];
  const projects = groups.filter((p) => p != null);
  const times = [...new Set(costs.rows.map((r) => Date.parse(r.period_start ?? r.time) / 1000))].sort((a, b) => a - b);
  const ys = projects.map((p) => times.map((t) => costs.rows.find((r) => r.project === p && Date.parse(r.period_start ?? r.time) / 1000 === t)?.cost_eur ?? null));
  chart(charts, "GPU cost € per project and day (last 30 days)", projects, times, ys);
  const total = (rows, key) => (rows.some((r) => r[key] != null) ? rows.reduce((sum, r) => sum + (r[key] ?? 0), 0) : null);
  page.append(el("h2", {}, "GPU cost and energy per project (last 30 days)"), el("div", { id: "costs-energy" }, table(
    ["project", "GPU cost €", "energy kWh", "energy €"],
    groups.map((p) => {
      const rows = costs.rows.filter((r) => r.project === p);
      return el("tr", { "data-energy": p ?? "" },
        el("td", {}, p ?? "no project (idle GPUs)"), el("td", { class: "num" }, fmt(total(rows, "cost_eur"), 2)),
        el("td", { class: "num" }, fmt(total(rows, "energy_kwh"), 1)),
        el("td", { class: "num" }, fmt(total(rows, "energy_cost_eur"), 2)));
    }))));
  page.append(el("p", { class: "note" }, me.projects ? `only this token's projects: ${me.projects.join(", ")}` : "all projects"));
}

// -- jobs ----------------------------------------------------------------------------------------------

async function jobsPage() {
  const jobs = await api("/jobs?limit=100");
  page.replaceChildren(el("h1", {}, "Jobs (last 24 hours)"), table(
    ["job", "project", "state", "first event", "last event", "host"],
    jobs.jobs.map((j) => el("tr", { "data-job": j.job_id },
      el("td", {}, el("a", { href: `#job/${encodeURIComponent(j.job_id)}` }, j.job_id)), el("td", {}, j.project),
      el("td", {}, j.state), el("td", {}, when(j.first_event)), el("td", {}, when(j.last_event)),
      el("td", {}, j.host ?? "")))));
}

async function jobPage(jobId) {
  const job = await api(`/jobs/${encodeURIComponent(jobId)}`);
  const charts = el("div", { id: "job-chart" });
  const cost = job.cost ? `${fmt(job.cost.cost_eur, 2)} ${job.cost.currency}` : "not yet computed";
  page.replaceChildren(el("h1", {}, `Job ${job.job_id}`),
    el("p", {}, `project ${job.project} · ${job.state} · started ${when(job.started)} · ended ${when(job.ended)} · ` +
      `${job.duration_seconds == null ? "not started" : `${fmt(job.duration_seconds / 60, 1)} min`} · cost ${cost}`),
    el("h2", {}, "Events"), table(["time", "event", "host", "GPUs", "model", "error"],
      job.events.map((e) => el("tr", {}, el("td", {}, when(e.time)), el("td", {}, e.event), el("td", {}, e.host ?? ""),
        el("td", { class: "num" }, e.gpu_count), el("td", {}, e.gpu_model ?? ""), el("td", {}, e.error ?? "")))),
    el("h2", {}, "Timings"), table(["kind", "kernel", "count", "mean s", "min s", "max s", "total s"],
      job.timings.map((t) => el("tr", {}, el("td", {}, t.kind), el("td", {}, t.kernel ?? ""), el("td", { class: "num" }, t.count),
        el("td", { class: "num" }, fmt(t.mean_seconds, 4)), el("td", { class: "num" }, fmt(t.min_seconds, 4)),
        el("td", { class: "num" }, fmt(t.max_seconds, 4)), el("td", { class: "num" }, fmt(t.total_seconds, 2))))),
    el("h2", {}, `GPU use of its host${job.hosts.length === 1 ? "" : "s"} (${job.hosts.join(", ")})`), charts);
  if (job.gpu_use === null) {
    charts.append(el("p", { class: "note" }, "this token may not read GPU metrics"));
    return;
  }
  const gpus = [...new Set(job.gpu_use.map((r) => `${r.host}/${r.gpu_uuid}`))];
  const times = [...new Set(job.gpu_use.map((r) => Date.parse(r.minute) / 1000))].sort((a, b) => a - b);
  const ys = gpus.map((g) => times.map((t) => job.gpu_use.find((r) => `${r.host}/${r.gpu_uuid}` === g && Date.parse(r.minute) / 1000 === t)?.utilization_percent ?? null));
  if (!times.length) charts.append(el("p", { class: "note" }, "no GPU sample of its host while it ran"));
  chart(charts, "GPU utilization % while the job ran", gpus, times, ys);
}

// -- routing -------------------------------------------------------------------------------------------

async function route() {
  if (!me) return;
  const hash = location.hash || "#alerts";
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", hash.startsWith(link.getAttribute("href")));
  try {
    if (hash.startsWith("#job/")) await jobPage(decodeURIComponent(hash.slice(5)));
    else if (hash === "#fleet") await fleetPage();
    else if (hash === "#costs") await costsPage();
    else if (hash === "#jobs") await jobsPage();
    else await alertsPage();
    document.body.dataset.page = hash.slice(1).split("/")[0];
  } catch (error) {
    page.replaceChildren(el("p", { class: "error", id: "page-error" }, error.message));
  }
}

window.addEventListener("hashchange", route);
if (token()) login();
else document.getElementById("login-form").hidden = false;
