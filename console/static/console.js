// The softrelay console's one script: keeps the server-rendered pages live.
//
// - The event stream /api/v1/events sends the overview JSON every tick (event
//   `overview`). Each element with data-figure="<path>" shows the value at that path in
//   its data-format (the same formats as console/markup.py, so a number reads the same
//   before and after an update); a table body with a table format (pbx_links, pushes,
//   shedding) is rebuilt; each chart (data-chart) takes the newest points of its series.
// - On the other pages every section with data-refresh (and an id) is fetched again,
//   as this page's HTML, at most every REFRESH_MS while the page is visible.
// - Action forms (data-action) are posted with the session's CSRF token in the
//   X-CSRF-Token header (from <meta name="csrf-token">), the answer shown in
//   #action-result.
// Text from the server goes into the page as textContent, never as markup.
"use strict";

(() => {
  const NONE = "\u2014";
  const REFRESH_MS = 5000;
  const MAX_POINTS = 10000; // points a chart keeps per series (console/settings.py)
  const RETRY_MS = [1000, 2000, 5000, 10000, 30000];
  const WHOLE_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6];
  const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";

  // --- formats (console/markup.py FORMATS) ---------------------------------------

  const number = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const UNITS = [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]];
  const FORMATS = {
    count: (v) => (number(v) === null ? NONE : String(Math.round(v))),
    decimal: (v) => (number(v) === null ? NONE : v.toFixed(2)),
    percent: (v) => (number(v) === null ? NONE : `${(v * 100).toFixed(1)} %`),
    ms: (v) => {
      if (number(v) === null) return NONE;
      return Math.abs(v) < 10 ? `${v.toFixed(1)} ms` : `${v.toFixed(0)} ms`;
    },
    time: (v) => {
      if (number(v) === null) return NONE;
      const iso = new Date(Math.floor(v) * 1000).toISOString();
      return `${iso.slice(0, 19).replace("T", " ")} UTC`;
    },
    duration: (v) => {
      if (number(v) === null) return NONE;
      let left = Math.max(0, Math.floor(v));
      const parts = [];
      for (const [unit, seconds] of UNITS) {
        if (left >= seconds || (unit === "s" && parts.length === 0)) {
          parts.push(`${Math.floor(left / seconds)} ${unit}`);
          left %= seconds;
        } else if (parts.length > 0) {
          break;
        }
        if (parts.length === 2) break;
      }
      return parts.join(" ");
    },
    health: (v) => (v === null || v === undefined ? NONE : v === true ? "ok" : "down"),
    plain: (v) => (v === null || v === undefined ? NONE : String(v)),
  };

  const cell = (value, className) => {
    const td = document.createElement("td");
    td.textContent = value;
    if (className) td.className = className;
    return td;
  };
  const row = (cells, className) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    if (className) tr.className = className;
    return tr;
  };

  // The rows of the overview's live tables, cell for cell as console/views.py renders them.
  const TABLES = {
    pbx_links: (links) =>
      links.map((link) =>
        row(
          [
            cell(FORMATS.plain(link.serial)),
            cell(link.online ? "online" : "offline"),
            cell(FORMATS.plain(link.transport)),
            cell(FORMATS.time(link.since), "when"),
          ],
          link.online ? "up" : "down",
        ),
      ),
    pushes: (pushes) =>
      pushes.map((push) =>
        row([
          cell(FORMATS.plain(push.provider)),
          cell(FORMATS.plain(push.outcome)),
          cell(FORMATS.count(push.count), "num"),
        ]),
      ),
    shedding: (shedding) =>
      Object.keys(shedding)
        .sort()
        .map((where) => row([cell(where), cell(FORMATS.count(shedding[where]), "num")])),
  };

  const lookup = (doc, path) => {
    let value = doc;
    for (const key of path.split(".")) {
      if (value === null || typeof value !== "object" || !(key in value)) return undefined;
      value = value[key];
    }
    return value;
  };

  function updateFigures(doc) {
    for (const element of document.querySelectorAll("[data-figure]")) {
      const path = element.dataset.figure;
      const value = lookup(doc, path);
      if (value === undefined) continue;
      const table = TABLES[element.dataset.format];
      if (table) {
        const rows = table(value || (path === "shedding" ? {} : []));
        element.replaceChildren(...rows);
        const empty = document.querySelector(`[data-empty="${path}"]`);
        if (empty) empty.hidden = rows.length > 0;
        const whole = element.closest("table");
        if (whole) whole.hidden = rows.length === 0;
      } else {
        const format = FORMATS[element.dataset.format] || FORMATS.plain;
        element.textContent = format(value);
      }
    }
  }

  // --- charts (uPlot) ------------------------------------------------------------

  // Points of several series at different times, on one x axis (null where a series has
  // no point at that time).
  function aligned(series) {
    const names = Object.keys(series).sort();
    const times = new Set();
    for (const name of names) for (const [t] of series[name]) times.add(t);
    const xs = [...times].sort((a, b) => a - b);
    const columns = names.map((name) => {
      const at = new Map(series[name]);
      return xs.map((t) => (at.has(t) ? at.get(t) : null));
    });
    return { names, data: [xs, ...columns] };
  }

  // `incoming` replaces what `old` holds from its first time on: a stream that sends
  // the whole history and one that sends only the newest points both end up right.
  function merged(old, incoming) {
    if (!incoming || incoming.length === 0) return old || [];
    const first = incoming[0][0];
    const kept = (old || []).filter(([t]) => t < first);
    return kept.concat(incoming).slice(-MAX_POINTS);
  }

  class Chart {
    constructor(element) {
      this.element = element;
      this.name = element.dataset.chart;
      this.format = FORMATS[element.dataset.format] || FORMATS.plain;
      this.percent = element.dataset.format === "percent";
      this.counts = element.dataset.format === "count";
      this.series = JSON.parse(element.dataset.series || "{}");
      this.plot = null;
      this.names = "";
      element.replaceChildren(); // the no-JavaScript note
      new ResizeObserver(() => this.resize()).observe(element);
      this.draw();
    }

    label(name) {
      return name === this.name ? this.element.dataset.label || "value" : name.split(".").pop();
    }

    update(series) {
      for (const [name, points] of Object.entries(series)) {
        if (name === this.name || name.startsWith(`${this.name}.`) || this.name === "nodes") {
          this.series[name] = merged(this.series[name], points);
        }
      }
      this.draw();
    }

    draw() {
      const { names, data } = aligned(this.series);
      const key = names.join("\n");
      if (this.plot && key === this.names) {
        this.plot.setData(data);
        return;
      }
      // A new series (a provider's first push, a node joining): a new plot.
      if (this.plot) this.plot.destroy();
      this.names = key;
      const format = this.format;
      const options = {
        width: Math.max(this.element.clientWidth, 200),
        height: 180,
        legend: { show: names.length > 1, live: false },
        // The console's times read in UTC (as console/markup.py writes them).
        tzDate: (seconds) => uPlot.tzDate(new Date(seconds * 1000), "Etc/UTC"),
        scales: {
          // One point alone would stretch the axis over years: a minute around it.
          x: { time: true, range: (u, min, max) => (min === max ? [min - 60, max + 1] : [min, max]) },
          y: {
            range: (u, min, max) => (this.percent ? [0, 1] : [0, max > 0 ? max * 1.1 : 1]),
          },
        },
        axes: [
          // HH:MM:SS in UTC: the charts reach back minutes, not days.
          { space: 80, values: (u, values) => values.map((t) => FORMATS.time(t).slice(11, 19)) },
          {
            size: 70,
            values: (u, values) => values.map((v) => format(v)),
            // Counts step by whole numbers (a tick at 2.5 flows would read "3").
            ...(this.counts ? { incrs: WHOLE_STEPS } : {}),
          },
        ],
        series: [
          { value: (u, v) => FORMATS.time(v) },
          ...names.map((name, i) => ({
            label: this.label(name),
            stroke: COLOURS[i % COLOURS.length],
            width: 2,
            spanGaps: true,
            value: (u, v) => format(v),
          })),
        ],
      };
      this.plot = new uPlot(options, data, this.element);
    }

    resize() {
      if (this.plot) this.plot.setSize({ width: Math.max(this.element.clientWidth, 200), height: 180 });
    }
  }

  const charts = [];
  if (typeof uPlot === "function") {
    for (const element of document.querySelectorAll("[data-chart]")) charts.push(new Chart(element));
  }

  // The cluster page: flows per node, sampled from the node table at each refresh.
  function sampleNodes() {
    const chart = charts.find((c) => c.name === "nodes");
    if (!chart) return;
    const now = Date.now() / 1000;
    const series = {};
    for (const tr of document.querySelectorAll("#nodes tr[data-node]")) {
      series[tr.dataset.node] = [[now, Number(tr.dataset.flows)]];
    }
    chart.update(series);
  }

  // --- refreshing the other pages' sections ----------------------------------------

  let lastRefresh = Date.now();
  let refreshing = false;

  async function refreshSections(force) {
    if (refreshing || document.hidden) return;
    if (!force && Date.now() - lastRefresh < REFRESH_MS) return;
    if (!document.querySelector("[data-refresh][id]")) return;
    refreshing = true;
    lastRefresh = Date.now();
    try {
      const answer = await fetch(location.href, { headers: { Accept: "text/html" } });
      if (answer.redirected && new URL(answer.url).pathname === "/login") {
        location.assign("/login");
        return;
      }
      if (!answer.ok) return;
      const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
      for (const section of fresh.querySelectorAll("[data-refresh][id]")) {
        const old = document.getElementById(section.id);
        if (old) old.replaceWith(document.importNode(section, true));
      }
      sampleNodes();
    } catch (error) {
      setLive("not live: the console does not answer");
    } finally {
      refreshing = false;
    }
  }

  // --- the event stream ------------------------------------------------------------

  const live = document.getElementById("live");
  const setLive = (text) => {
    if (live) live.textContent = text;
  };

  let failures = 0;
  function listen() {
    const events = new EventSource("/api/v1/events");
    events.addEventListener("overview", (event) => {
      failures = 0;
      const doc = JSON.parse(event.data);
      setLive("live");
      updateFigures(doc);
      for (const chart of charts) if (chart.name !== "nodes") chart.update(doc.series || {});
      refreshSections(false);
    });
    events.addEventListener("error", async () => {
      if (events.readyState !== EventSource.CLOSED) {
        setLive("reconnecting\u2026");
        return;
      }
      // Closed for good (an answer other than 200): logged out, or the session expired.
      const check = await fetch("/api/v1/overview", { headers: { Accept: "application/json" } })
        .catch(() => null);
      if (check && check.status === 401) {
        location.assign("/login");
        return;
      }
      setLive("not live: reconnecting\u2026");
      setTimeout(listen, RETRY_MS[Math.min(failures, RETRY_MS.length - 1)]);
      failures += 1;
    });
  }

  // --- actions ---------------------------------------------------------------------

  // An action's JSON answer in a line: its figures that say something (a count that is
  // not 0, a verdict, a time), nested objects one level deep.
  function summary(answer, depth = 0) {
    if (answer === null || typeof answer !== "object") return String(answer);
    const parts = [];
    for (const [key, value] of Object.entries(answer)) {
      if (Array.isArray(value)) parts.push(`${key}: ${value.length}`);
      else if (value !== null && typeof value === "object") {
        if (depth === 0) parts.push(`${key}: ${summary(value, 1) || "none"}`);
      } else if (key.endsWith("_at")) parts.push(`${key}: ${FORMATS.time(value)}`);
      else if (value !== 0) parts.push(`${key} ${value}`);
    }
    return parts.join(depth === 0 ? " \u00b7 " : ", ");
  }

  for (const form of document.querySelectorAll("form[data-action]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const output = document.getElementById("action-result");
      const button = form.querySelector("button");
      if (button) button.disabled = true;
      try {
        const answer = await fetch(form.dataset.action, {
          method: "POST",
          headers: { "X-CSRF-Token": csrf, Accept: "application/json" },
        });
        const body = await answer.json().catch(() => null);
        const label = button ? button.textContent : form.dataset.action;
        if (output) {
          output.textContent = answer.ok
            ? `${label}: done. ${summary(body)}`
            : `${label}: refused (${answer.status}) ${body && body.detail ? body.detail : ""}`;
        }
        await refreshSections(true);
      } catch (error) {
        if (output) output.textContent = "The console does not answer.";
      } finally {
        if (button) button.disabled = false;
      }
    });
  }

  if (typeof EventSource === "function" && document.body.dataset.page) {
    sampleNodes();
    listen();
  }
})();
