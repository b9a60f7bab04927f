/* mmagg dashboard.
 *
 * Rules this file keeps (the page's Content-Security-Policy enforces the first two):
 * - no inline script, no eval, no inline style attribute in markup;
 * - every piece of data reaches the DOM through textContent or setAttribute, never as HTML,
 *   so a class name such as "<script>alert(1)</script>" shows as those characters;
 * - every request goes to this page's own origin, by a relative URL.
 */
(function () {
  "use strict";

  // Okabe–Ito, ordered so the first colours stay apart for every common colour-vision
  // deficiency; yellow is late because it is faint on white. Dashes and hollow/filled markers
  // add a second, colour-free cue.
  var PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"];
  var DASHES = [[], [8, 4], [2, 3], [12, 3, 2, 3], [4, 4], [16, 4], [1, 3], [8, 2, 2, 2, 2, 2]];
  var AXIS_FONT = "12px system-ui, sans-serif";
  // Auto-refresh period: 10 s, or /dashboard?refresh=SECONDS (2 to 3600).
  var REFRESH_MS = (function () {
    var asked = Number(new URLSearchParams(location.search).get("refresh"));
    return asked >= 2 && asked <= 3600 ? Math.round(asked * 1000) : 10000;
  })();
  var SAMPLE_ROWS = 20;
  // A model with more classes than this opens with only its busiest ones drawn.
  var TOP_CLASSES = 8;
  var STALE_INTERVALS = 3;
  var NICE_BUCKETS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
    604800, 2592000];
  var HIST_EDGES = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

  var state = {
    workspace: null,
    rangeSeconds: 3600,
    custom: null, // {start: Date, end: Date} when the custom range is applied
    filter: "", // "" | "device:<id>" | "source:<id>"
    model: null,
    paused: false,
    timer: null,
    generation: 0,
    renders: 0,
    charts: [],
    // Keyed by class name: null-prototype maps, so "__proto__" or "constructor" is just a name.
    classStyles: Object.create(null),
    // Per model: the classes switched off in the legend.
    hiddenByModel: Object.create(null),
    defaultsApplied: Object.create(null),
    // Confidence statistic of the main chart (a field of /api/trends points).
    stat: "median_confidence",
    // Per model: its reporting interval (from the overview), so buckets are never shorter.
    intervals: Object.create(null),
    // Per model: a notice such as "the demo finished" (GET notices).
    notices: Object.create(null),
  };
  var STAT_NAMES = {
    median_confidence: "Median",
    mean_confidence: "Mean",
    p10_confidence: "10th-percentile",
    best_confidence: "Best sampled",
  };

  function $(id) { return document.getElementById(id); }

  // ---------------------------------------------------------------- DOM helpers (text only)

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function show(node, visible) { node.hidden = !visible; }

  // ---------------------------------------------------------------- time & number formatting

  function toDate(value) {
    if (value === null || value === undefined || value === "") return null;
    if (typeof value === "number") return new Date(value < 1e11 ? value * 1000 : value);
    var s = String(value);
    // A naive ISO time from the backend is UTC (wire format); make Date read it so.
    if (/^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?$/.test(s)) s += "Z";
    var d = new Date(s);
    return isNaN(d.getTime()) ? null : d;
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function formatTime(d) {
    if (!d) return "—";
    var today = new Date();
    var hms = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    if (d.toDateString() === today.toDateString()) return hms;
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + hms;
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
    var s = Math.max(0, Math.round(seconds));
    // Two units at most: "45 s", "3 min 20 s", "2 h 5 min", "3 d 4 h".
    var units = [[86400, "d"], [3600, "h"], [60, "min"], [1, "s"]];
    for (var i = 0; i < units.length - 1; i++) {
      if (s >= units[i][0]) {
        var major = Math.floor(s / units[i][0]);
        var minor = Math.floor((s % units[i][0]) / units[i + 1][0]);
        return major + " " + units[i][1] + (minor ? " " + minor + " " + units[i + 1][1] : "");
      }
    }
    return s + " s";
  }

  function formatConfidence(c) {
    return typeof c === "number" && isFinite(c) ? c.toFixed(3) : "—";
  }

  function toLocalInput(d) {
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  // ---------------------------------------------------------------- HTTP

  function ApiError(status, message) {
    this.status = status;
    this.message = message;
  }

  function request(method, path, params, body) {
    var url = "dashboard/api/" + path;
    if (params) {
      var q = new URLSearchParams();
      Object.keys(params).forEach(function (k) {
        if (params[k] !== null && params[k] !== undefined && params[k] !== "") q.append(k, params[k]);
      });
      var qs = q.toString();
      if (qs) url += "?" + qs;
    }
    var init = {
      method: method,
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        if (!resp.ok) {
          var detail = data && (data.detail || data.message || data.error);
          if (detail && typeof detail !== "string") detail = JSON.stringify(detail);
          throw new ApiError(resp.status, detail || resp.statusText || "request failed");
        }
        return data;
      });
    });
  }

  // ---------------------------------------------------------------- reading the API's shapes
  // The JSON of /dashboard/api/... is documented in docs/server.md; these readers are the only
  // places that know its field names.

  function listOf(data, key) {
    return data && Array.isArray(data[key]) ? data[key] : [];
  }

  function orNull(value) { return value === undefined ? null : value; }

  function readModel(m) {
    return {
      id: String(m.model_id),
      // Over all time, so a model that went silent before the range still shows its age.
      lastReport: toDate(orNull(m.last_report_at_all_time) || m.last_report_at),
      reports: orNull(m.report_count),
      devices: (m.devices || []).map(String),
      sources: (m.sources || []).map(String),
      interval: orNull(m.estimated_interval_seconds),
    };
  }

  // ---------------------------------------------------------------- range & filter

  function currentRange() {
    if (state.custom) return { start: state.custom.start, end: state.custom.end };
    var end = new Date();
    return { start: new Date(end.getTime() - state.rangeSeconds * 1000), end: end };
  }

  // About 120 buckets over the range, but never shorter than the model's reporting interval:
  // a bucket shorter than the interval is empty every other time and the line zig-zags.
  function bucketSecondsFor(range, interval) {
    var span = (range.end - range.start) / 1000;
    var floor = typeof interval === "number" && isFinite(interval) && interval > 0 ? interval : 0;
    for (var i = 0; i < NICE_BUCKETS.length; i++) {
      if (NICE_BUCKETS[i] >= span / 120 && NICE_BUCKETS[i] >= floor) return NICE_BUCKETS[i];
    }
    return NICE_BUCKETS[NICE_BUCKETS.length - 1];
  }

  function rangeParams(range) {
    var p = { startTime: range.start.toISOString(), endTime: range.end.toISOString() };
    if (state.filter.indexOf("device:") === 0) p.device_id = state.filter.slice(7);
    if (state.filter.indexOf("source:") === 0) p.source_id = state.filter.slice(7);
    return p;
  }

  // ---------------------------------------------------------------- session

  function showLogin(message) {
    stopTimer();
    destroyCharts();
    state.workspace = null;
    show($("session"), false);
    show($("app-view"), false);
    show($("login-view"), true);
    $("login-error").textContent = message || "";
    $("api-key").value = "";
    $("api-key").focus();
  }

  function showApp(workspace) {
    state.workspace = workspace;
    $("workspace-name").textContent = workspace || "";
    show($("login-view"), false);
    show($("session"), true);
    show($("app-view"), true);
    readHash();
    refresh();
    startTimer();
  }

  function onLogin(event) {
    event.preventDefault();
    var key = $("api-key").value.trim();
    var error = $("login-error");
    if (!key) {
      error.textContent = "Enter an API key.";
      return;
    }
    error.textContent = "";
    $("login-submit").disabled = true;
    request("POST", "login", null, { api_key: key })
      .then(function (data) {
        $("api-key").value = "";
        return request("GET", "me").then(function (me) {
          showApp(me.workspace || data.workspace);
        });
      })
      .catch(function (err) {
        if (err.status === 403 && err.message) {
          // A valid key without the 'read' scope: the server says what is needed.
          error.textContent = err.message;
        } else if (err.status === 401 || err.status === 403) {
          error.textContent = "That API key was not accepted. Check it and try again.";
        } else if (err.status === 429) {
          error.textContent = "Too many attempts. Wait a moment and try again.";
        } else {
          error.textContent = "Could not sign in: " + (err.message || "the server did not answer") + ".";
        }
        $("api-key").focus();
        $("api-key").select(); // typing replaces the wrong key
      })
      .then(function () { $("login-submit").disabled = false; });
  }

  function onLogout() {
    request("POST", "logout").catch(function () { /* the session is gone either way */ })
      .then(function () {
        location.hash = "";
        showLogin("You are signed out.");
      });
  }

  function handleError(err) {
    if (err && err.status === 401) {
      showLogin("Your session has ended. Sign in again.");
      return;
    }
    var banner = $("app-error");
    banner.textContent = "Could not load data: " + ((err && err.message) || String(err));
    show(banner, true);
  }

  // ---------------------------------------------------------------- refresh loop

  function startTimer() {
    stopTimer();
    state.timer = setInterval(function () {
      if (!state.paused && document.visibilityState !== "hidden") refresh();
    }, REFRESH_MS);
  }

  function stopTimer() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
  }

  function setBusy(busy) {
    document.body.setAttribute("data-busy", busy ? "true" : "false");
  }

  function refresh() {
    if (!state.workspace) return Promise.resolve();
    var gen = ++state.generation;
    var range = currentRange();
    setBusy(true);
    var jobs = [loadFilters(range, gen), loadOverview(range, gen)];
    if (state.model) jobs.push(loadModel(state.model, range, gen));
    return Promise.all(jobs)
      .then(function () {
        if (gen !== state.generation) return;
        show($("app-error"), false);
        state.renders += 1;
        document.body.setAttribute("data-renders", String(state.renders));
        $("refresh-status").textContent = "Updated " + formatTime(new Date()) +
          (state.paused ? " · auto-refresh paused" : " · refreshes every " + REFRESH_MS / 1000 + " s");
      })
      .catch(function (err) { if (gen === state.generation) handleError(err); })
      .then(function () { if (gen === state.generation) setBusy(false); });
  }

  // ---------------------------------------------------------------- filters (devices/sources)

  function loadFilters(range, gen) {
    var params = { startTime: range.start.toISOString(), endTime: range.end.toISOString() };
    if (state.model) params.model = state.model;
    return request("GET", "devices", params)
      .then(function (data) {
        if (gen !== state.generation) return;
        // {"devices": [{"device_id", "sources": [{"source_id", ...}]}]}; ids may be null.
        var devices = [];
        var sources = [];
        listOf(data, "devices").forEach(function (d) {
          var id = orNull(d.device_id);
          if (id !== null && devices.indexOf(String(id)) < 0) devices.push(String(id));
          (d.sources || []).forEach(function (s) {
            var sid = orNull(s.source_id);
            if (sid !== null && sources.indexOf(String(sid)) < 0) sources.push(String(sid));
          });
        });
        sources.sort();
        var select = $("filter-select");
        var keep = state.filter;
        var values = [""];
        clear(select);
        select.appendChild(optionOf("", "All devices and sources"));
        devices.forEach(function (d) { values.push("device:" + d); select.appendChild(optionOf("device:" + d, "Device: " + d)); });
        sources.forEach(function (s) { values.push("source:" + s); select.appendChild(optionOf("source:" + s, "Source: " + s)); });
        if (values.indexOf(keep) < 0 && keep) {
          select.appendChild(optionOf(keep, keep.replace(":", ": ")));
        }
        select.value = keep;
      });
  }

  function optionOf(value, text) {
    var o = el("option", text);
    o.value = value;
    return o;
  }

  // ---------------------------------------------------------------- overview

  function healthOf(model, now) {
    var notice = state.notices[model.id];
    if (notice && notice.kind === "demo_finished") {
      return { cls: "finished", text: "\u25A0 Demo finished", title: notice.message };
    }
    if (!model.lastReport) return { cls: "unknown", text: "? No reports", title: "" };
    var silent = (now - model.lastReport) / 1000;
    var interval = typeof model.interval === "number" && model.interval > 0 ? model.interval : null;
    if (interval === null) {
      return { cls: "unknown", text: "? Interval unknown", title: "Needs two reports to estimate the interval" };
    }
    var title = "Reports about every " + formatDuration(interval) + "; silent for " + formatDuration(silent);
    if (silent > STALE_INTERVALS * interval) {
      return { cls: "stale", text: "\u26A0 Stopped reporting", title: title };
    }
    return { cls: "ok", text: "\u2713 Reporting", title: title };
  }

  function loadOverview(range, gen) {
    // One read: counts, devices and sources over the range; the last report and the interval
    // over all time, so a model that went silent before the range still shows, as stale. The
    // device/source filter is applied by the server, to every number.
    return Promise.all([
      request("GET", "models", rangeParams(range)),
      request("GET", "drift", driftParams(range, null)),
      request("GET", "alerts"),
      request("GET", "notices"),
    ]).then(function (answers) {
      if (gen !== state.generation) return;
      var data = answers[0];
      readNotices(answers[3]);
      renderAlerts(answers[2]);
      var drifts = Object.create(null);
      listOf(answers[1], "models").forEach(function (d) { drifts[String(d.model_id)] = d; });
      var models = listOf(data, "models").map(readModel);
      models.forEach(function (m) { state.intervals[m.id] = m.interval; });
      var body = $("models-body");
      clear(body);
      var now = new Date();
      models.forEach(function (m) {
        var tr = el("tr");
        tr.setAttribute("data-model-id", m.id);
        var name = el("td");
        var link = el("a", m.id, "model-link");
        link.href = "#model=" + encodeURIComponent(m.id);
        link.title = "Open the charts of model " + m.id;
        name.appendChild(link);
        tr.appendChild(name);
        var h = healthOf(m, now);
        var health = el("td", h.text, "health " + h.cls);
        if (h.title) health.title = h.title;
        tr.appendChild(health);
        var last = el("td");
        var when = el("div");
        when.appendChild(el("span", formatTime(m.lastReport), "nowrap"));
        if (m.lastReport) {
          when.appendChild(document.createTextNode(" "));
          when.appendChild(el("span", formatDuration((now - m.lastReport) / 1000) + " ago", "muted nowrap"));
        }
        last.appendChild(when);
        tr.appendChild(last);
        tr.appendChild(el("td", m.reports === null ? "—" : m.reports, "num"));
        var who = m.devices.concat(m.sources.map(function (s) { return "source " + s; }));
        tr.appendChild(el("td", who.length ? who.join(", ") : "—"));
        tr.appendChild(driftCell(drifts[m.id]));
        body.appendChild(tr);
      });
      labelCells($("models-table"));
      show($("models-empty"), models.length === 0);
      if (state.model) {
        var current = models.filter(function (m) { return m.id === state.model; })[0];
        $("model-summary").textContent = current && current.lastReport
          ? healthOf(current, now).text + " · last report " + formatTime(current.lastReport) + " (" + formatDuration((now - current.lastReport) / 1000) +
            " ago) · " + (current.reports === null ? "?" : current.reports) + " reports in range" +
            (current.interval ? " · about every " + formatDuration(current.interval) : "")
          : "No reports from this model" + (state.filter ? " on " + state.filter.replace(":", " ") : "") + ".";
      }
    });
  }

  // ---------------------------------------------------------------- drift, alerts, notices

  // The drift the page shows compares the last quarter of the range with the three quarters
  // before it (the API takes any window and baseline: docs/alerts.md).
  function driftParams(range, modelId) {
    var span = (range.end - range.start) / 1000;
    var p = rangeParams(range);
    delete p.startTime;
    p.window = Math.max(1, Math.round(span / 4));
    p.baseline = Math.max(1, Math.round(span - span / 4));
    if (modelId) p.model = modelId;
    return p;
  }

  var LEVEL_TEXT = { none: "\u2713 stable", moderate: "\u25B2 moderate", significant: "\u26A0 significant", unknown: "? too few data" };

  function formatScore(v) { return typeof v === "number" && isFinite(v) ? v.toFixed(3) : "—"; }

  function driftCell(d) {
    var td = el("td");
    if (!d) { td.appendChild(el("span", "—", "drift unknown")); return td; }
    var worst = null;
    (d.classes || []).forEach(function (c) {
      if (typeof c.psi === "number" && (worst === null || c.psi > worst.psi)) worst = c;
    });
    var level = String(d.level || "unknown");
    var mark = el("span", LEVEL_TEXT[level] || level, "drift " + level);
    mark.setAttribute("data-level", level);
    td.appendChild(mark);
    if (worst) {
      td.appendChild(document.createTextNode(" "));
      td.appendChild(el("span", "PSI " + formatScore(worst.psi) + " (" + worst.class_name + ")", "muted nowrap"));
    }
    var mix = d.class_mix || {};
    if (typeof mix.psi === "number") {
      td.appendChild(el("div", "class mix PSI " + formatScore(mix.psi), "muted nowrap"));
    }
    return td;
  }

  function readNotices(data) {
    state.notices = Object.create(null);
    var messages = [];
    listOf(data, "notices").forEach(function (n) {
      if (n.model_id !== null && n.model_id !== undefined) state.notices[String(n.model_id)] = n;
      if (n.message) messages.push(String(n.message));
    });
    var banner = $("notice-banner");
    banner.textContent = messages.join(" ");
    show(banner, messages.length > 0);
  }

  function alertSubject(labels) {
    var parts = [];
    if (labels.model_id) parts.push(labels.model_id);
    if (labels.class_name !== undefined) parts.push(labels.class_name);
    if (labels.device_id) parts.push("device " + labels.device_id);
    return parts.join(" / ") || "—";
  }

  function formatValue(v) {
    return typeof v === "number" && isFinite(v) ? (Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(3)) : "—";
  }

  function renderAlerts(data) {
    var rules = listOf(data, "rules");
    var alerts = listOf(data, "alerts");
    var recent = listOf(data, "recent");
    show($("alerts-disabled"), !(data && data.enabled) || rules.length === 0);
    var body = $("alerts-body");
    clear(body);
    var order = { firing: 0, pending: 1, resolved: 2 };
    alerts.slice().sort(function (a, b) { return (order[a.state] || 3) - (order[b.state] || 3); }).forEach(function (a) {
      var tr = el("tr");
      tr.setAttribute("data-state", String(a.state));
      tr.setAttribute("data-rule", String(a.rule));
      var labels = a.labels || {};
      tr.appendChild(el("td", String(a.state), "alert-state " + a.state));
      tr.appendChild(el("td", a.rule));
      tr.appendChild(el("td", alertSubject(labels)));
      tr.appendChild(el("td", formatValue(a.value), "num"));
      tr.appendChild(el("td", formatValue(a.threshold), "num"));
      var since = a.state === "resolved" ? a.resolved_at : a.state === "firing" ? a.fired_at : a.active_since;
      tr.appendChild(el("td", formatTime(toDate(since)), "nowrap"));
      body.appendChild(tr);
    });
    show($("alerts-table"), alerts.length > 0);
    labelCells($("alerts-table"));
    var firing = alerts.filter(function (a) { return a.state === "firing"; }).length;
    $("alerts-count").textContent = firing ? firing + " firing" : alerts.length ? "none firing" : "";
    var list = $("alerts-recent");
    clear(list);
    recent.slice(0, 10).forEach(function (e) {
      var li = el("li");
      li.setAttribute("data-status", String(e.status));
      li.appendChild(el("span", formatTime(toDate(e.at)) + " ", "nowrap"));
      li.appendChild(el("strong", String(e.status), "alert-state " + e.status));
      li.appendChild(document.createTextNode(" " + e.rule + " · " + alertSubject(e.labels || {}) + " · value " + formatValue(e.value)));
      list.appendChild(li);
    });
    show($("alerts-none"), recent.length === 0 && !!(data && data.enabled) && rules.length > 0);
  }

  function renderDrift(data, range) {
    var body = $("drift-body");
    clear(body);
    var model = listOf(data, "models")[0];
    var span = (range.end - range.start) / 1000;
    $("drift-hint").textContent = "last " + formatDuration(span / 4) + " vs. the " + formatDuration(span - span / 4) +
      " before; PSI \u2265 0.1 moderate, \u2265 0.25 significant";
    (model ? model.classes : []).forEach(function (c) {
      var tr = el("tr");
      tr.setAttribute("data-class", String(c.class_name));
      tr.setAttribute("data-level", String(c.level));
      tr.appendChild(el("td", c.class_name === "" ? "(no class name)" : c.class_name, "class-name"));
      var score = el("td");
      score.appendChild(el("span", (LEVEL_TEXT[c.level] || c.level), "drift " + c.level));
      score.appendChild(el("span", " " + formatScore(c.psi), "num"));
      tr.appendChild(score);
      tr.appendChild(el("td", formatScore(c.js_distance), "num"));
      tr.appendChild(el("td", formatConfidence(c.recent_median) + " / " + formatConfidence(c.baseline_median), "num"));
      tr.appendChild(el("td", c.recent_count + " / " + c.baseline_count, "num"));
      body.appendChild(tr);
    });
    if (!model || !model.classes.length) {
      var tr = el("tr");
      var td = el("td", "No predictions in this range.", "muted");
      td.colSpan = 5;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    labelCells($("drift-table"));
    var mix = model ? model.class_mix : null;
    $("class-mix").textContent = mix && typeof mix.psi === "number"
      ? "Class mix (each class's share of predictions): PSI " + formatScore(mix.psi) + ", " + (LEVEL_TEXT[mix.level] || mix.level) + "."
      : "Class mix: too few predictions to compare.";
  }

  // ---------------------------------------------------------------- model view

  function readHash() {
    var m = /^#model=(.*)$/.exec(location.hash);
    var id = null;
    if (m) {
      try { id = decodeURIComponent(m[1]); } catch (e) { id = null; }
    }
    state.model = id;
    show($("model-view"), !!id);
    show($("overview"), !id);
    if (id) $("model-name").textContent = id;
    else destroyCharts();
  }

  function onHashChange() {
    var before = state.model;
    readHash();
    if (state.model !== before) {
      clear($("legend"));
      // The link that was clicked is hidden now: move focus where the reader goes next.
      if (state.model) $("model-title").focus();
      refresh().then(function () {
        if (!state.model && before) {
          var links = document.querySelectorAll("#models-body a.model-link");
          for (var i = 0; i < links.length; i++) {
            if (links[i].textContent === before) { links[i].focus(); break; }
          }
        }
      });
    }
  }

  function styleFor(className) {
    // Keep a class's style stable across refreshes and range changes. Past 8 classes the
    // colours repeat, but with another dash and marker fill, so 16 classes stay distinct.
    if (!state.classStyles[className]) {
      var n = Object.keys(state.classStyles).length;
      var cycle = Math.floor(n / PALETTE.length);
      state.classStyles[className] = {
        color: PALETTE[n % PALETTE.length],
        dash: DASHES[(n + 3 * cycle) % DASHES.length],
        hollow: (n + cycle) % 2 === 1,
      };
    }
    return state.classStyles[className];
  }

  function loadModel(modelId, range, gen) {
    var bucket = bucketSecondsFor(range, state.intervals[modelId]);
    var params = rangeParams(range);
    params.model = modelId;
    var seriesParams = Object.assign({ bucket_seconds: bucket }, params);
    var histParams = Object.assign({}, params);
    var sampleParams = Object.assign({ limit: SAMPLE_ROWS }, params);
    return Promise.all([
      request("GET", "trends", seriesParams),
      request("GET", "histogram", histParams),
      request("GET", "samples", sampleParams),
      request("GET", "drift", driftParams(range, modelId)),
    ]).then(function (results) {
      if (gen !== state.generation || modelId !== state.model) return;
      renderDrift(results[3], range);
      $("confidence-caption").textContent = STAT_NAMES[state.stat] + " confidence per class over time";
      var series = readSeries(results[0], range, bucket);
      var hists = readHistograms(results[1]);
      state.lastHists = hists;
      defaultVisibility(modelId, hists);
      // Counts only mean something for classes whose reports carried stats; a result
      // without stats would otherwise show as "1 prediction".
      var withStats = Object.create(null);
      hists.forEach(function (h) { if (!h.fromSamples) withStats[h.name] = true; });
      var totals = Object.create(null);
      hists.forEach(function (h) { totals[h.name] = h.fromSamples ? 0 : total(h.counts); });
      series.classes.forEach(function (c) {
        c.predictions = totals[c.name] || 0;
        if (!withStats[c.name]) c.counts = c.counts.map(function () { return null; });
      });
      renderLegend(series);
      destroyCharts();
      renderLineChart($("confidence-chart"), series, "confidence", range, bucket);
      var hasCounts = series.classes.some(function (c) { return c.counts.some(function (v) { return v !== null; }); });
      show($("counts-chart"), hasCounts);
      show($("counts-figure").querySelector(".readout"), hasCounts);
      show($("counts-empty"), !hasCounts && series.classes.length > 0);
      show($("counts-none"), series.classes.length === 0);
      if (hasCounts) renderLineChart($("counts-chart"), series, "counts", range, bucket);
      renderHistograms(hists);
      renderSamples(listOf(results[2], "samples"));
    });
  }

  function readSeries(data, range, bucket) {
    // GET trends: {"series": [{"class_name", "points": [{"t", "median_confidence",
    // "mean_confidence", "p10_confidence", "best_confidence", "predictions_per_minute"}]}]},
    // aligned on one x axis for uPlot (null where a class has no point in a bucket).
    var raw = listOf(data, "series");
    var xsSet = Object.create(null);
    var perClass = raw.map(function (s) {
      var name = String(orNull(s.class_name) === null ? "" : s.class_name);
      var points = Object.create(null);
      listOf(s, "points").forEach(function (p) {
        var t = toDate(p.t);
        if (!t) return;
        var x = Math.floor(t.getTime() / 1000);
        xsSet[x] = true;
        points[x] = {
          conf: orNull(p[state.stat]),
          count: orNull(p.predictions_per_minute),
        };
      });
      return { name: name, points: points };
    });
    var xs = Object.keys(xsSet).map(Number).sort(function (a, b) { return a - b; });
    perClass.sort(function (a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; });
    return {
      xs: xs,
      bucket: (data && data.bucket_seconds) || bucket,
      classes: perClass.map(function (c) {
        return {
          name: c.name,
          style: styleFor(c.name),
          confidence: xs.map(function (x) { var p = c.points[x]; return p && typeof p.conf === "number" ? p.conf : null; }),
          counts: xs.map(function (x) { var p = c.points[x]; return p && typeof p.count === "number" ? p.count : null; }),
        };
      }),
    };
  }

  function swatch(style) {
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", "34");
    svg.setAttribute("height", "14");
    svg.setAttribute("aria-hidden", "true");
    var line = document.createElementNS(ns, "line");
    line.setAttribute("x1", "1"); line.setAttribute("y1", "7");
    line.setAttribute("x2", "33"); line.setAttribute("y2", "7");
    line.setAttribute("stroke", style.color);
    line.setAttribute("stroke-width", "3");
    if (style.dash.length) line.setAttribute("stroke-dasharray", style.dash.join(" "));
    svg.appendChild(line);
    var dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", "17"); dot.setAttribute("cy", "7"); dot.setAttribute("r", "4");
    dot.setAttribute("stroke", style.color);
    dot.setAttribute("stroke-width", "2");
    dot.setAttribute("fill", style.hollow ? "#ffffff" : style.color);
    svg.appendChild(dot);
    return svg;
  }

  function renderLegend(series) {
    var legend = $("legend");
    clear(legend);
    series.classes.forEach(function (c) {
      var li = el("li");
      li.setAttribute("data-class", c.name);
      // Each entry is a toggle: it shows or hides the class in every chart of the view.
      var button = el("button", null, "legend-toggle");
      button.type = "button";
      button.setAttribute("aria-pressed", hidden()[c.name] ? "false" : "true");
      button.title = "Show or hide this class in the charts";
      button.appendChild(swatch(c.style));
      button.appendChild(el("span", c.name === "" ? "(no class name)" : c.name, "class-name"));
      var known = c.confidence.filter(function (v) { return v !== null; });
      var latest = known.length ? known[known.length - 1] : null;
      var predictions = c.predictions || 0;
      var detail = latest !== null ? STAT_NAMES[state.stat].toLowerCase() + " " + latest.toFixed(2) + " (latest)" : "";
      if (predictions) detail += (detail ? " · " : "") + predictions + " predictions";
      if (detail) button.appendChild(el("span", "(" + detail + ")", "muted"));
      button.addEventListener("click", function () {
        var hide = !hidden()[c.name];
        if (hide) hidden()[c.name] = true;
        else delete hidden()[c.name];
        button.setAttribute("aria-pressed", hide ? "false" : "true");
        applyVisibility();
      });
      li.appendChild(button);
      legend.appendChild(li);
    });
    show($("legend-empty"), series.classes.length === 0);
    updateLegendTools(series.classes.length);
  }

  // ---------------------------------------------------------------- charts (uPlot)

  function hidden() {
    var key = state.model || "";
    if (!state.hiddenByModel[key]) state.hiddenByModel[key] = Object.create(null);
    return state.hiddenByModel[key];
  }

  // First look at a model with many classes: draw its TOP_CLASSES busiest, list all.
  function defaultVisibility(modelId, hists) {
    if (state.defaultsApplied[modelId] || !hists.length) return;
    state.defaultsApplied[modelId] = true;
    if (hists.length <= TOP_CLASSES) return;
    var map = hidden();
    hists.slice().sort(function (a, b) { return total(b.counts) - total(a.counts); })
      .slice(TOP_CLASSES).forEach(function (h) { map[h.name] = true; });
  }

  function total(values) {
    return values.reduce(function (a, v) { return a + (v || 0); }, 0);
  }

  function setAllVisible(onlyTop) {
    var map = hidden();
    Object.keys(map).forEach(function (k) { delete map[k]; });
    if (onlyTop) {
      delete state.defaultsApplied[state.model];
      defaultVisibility(state.model, state.lastHists || []);
    }
    Array.prototype.forEach.call(document.querySelectorAll("#legend li"), function (li) {
      var name = li.getAttribute("data-class");
      li.querySelector("button").setAttribute("aria-pressed", hidden()[name] ? "false" : "true");
    });
    applyVisibility();
  }

  function updateLegendTools(count) {
    show($("legend-tools"), count > TOP_CLASSES);
    $("legend").classList.toggle("many", count > TOP_CLASSES);
    var off = Object.keys(hidden()).length;
    $("legend-count").textContent = "Drawing " + Math.max(0, count - off) + " of " + count + " classes.";
  }

  function applyVisibility() {
    updateLegendTools(document.querySelectorAll("#legend li").length);
    state.charts.forEach(function (c) {
      if (c.names) {
        c.names.forEach(function (name, i) {
          var want = !hidden()[name];
          if (c.plot.series[i + 1].show !== want) c.plot.setSeries(i + 1, { show: want });
        });
      }
      if (c.figure) {
        var visible = !hidden()[c.className];
        show(c.figure, visible);
        if (visible) c.plot.setSize({ width: chartWidth(c.container), height: c.plot.height });
      }
    });
  }

  function destroyCharts() {
    state.charts.forEach(function (c) { c.plot.destroy(); });
    state.charts = [];
  }

  function chartWidth(container) {
    return Math.max(200, Math.floor(container.getBoundingClientRect().width || container.clientWidth || 600));
  }

  function axis(label, values) {
    var a = {
      stroke: "#1b1f24",
      font: AXIS_FONT,
      labelFont: "600 12px system-ui, sans-serif",
      grid: { stroke: "#e5e8ec", width: 1 },
      ticks: { stroke: "#c8ced6", width: 1 },
    };
    if (label) { a.label = label; a.labelSize = 20; }
    if (values) a.values = values;
    return a;
  }

  function timeTicks(range) {
    var span = (range.end - range.start) / 1000;
    var long = span > 86400 * 1.01;
    var short = span <= 1800; // 30 minutes or less: seconds on the axis
    return function (u, splits) {
      return splits.map(function (v) {
        var d = new Date(v * 1000);
        var hm = pad(d.getHours()) + ":" + pad(d.getMinutes()) + (short ? ":" + pad(d.getSeconds()) : "");
        return long ? pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "\n" + hm : hm;
      });
    };
  }

  function readoutFor(container, series, kind) {
    var out = container.parentNode.querySelector(".readout");
    var idle = "Point at the chart to read its values.";
    if (out) out.textContent = idle;
    return function (u) {
      if (!out) return;
      var i = u.cursor.idx;
      if (i === null || i === undefined) { out.textContent = idle; return; }
      var parts = [];
      series.classes.forEach(function (c) {
        var v = (kind === "confidence" ? c.confidence : c.counts)[i];
        if (v !== null && v !== undefined) {
          parts.push((c.name === "" ? "(no class name)" : c.name) + " " + (kind === "confidence" ? v.toFixed(3) : v.toFixed(1) + "/min"));
        }
      });
      out.textContent = formatTime(new Date(series.xs[i] * 1000)) + " · " + (parts.length ? parts.join(" · ") : "no data");
    };
  }

  function renderLineChart(container, series, kind, range, bucket) {
    clear(container);
    var data = [series.xs];
    var uSeries = [{ label: "Time" }];
    series.classes.forEach(function (c) {
      data.push(kind === "confidence" ? c.confidence : c.counts);
      uSeries.push({
        label: c.name,
        stroke: c.style.color,
        width: 2,
        dash: c.style.dash,
        spanGaps: false,
        show: !hidden()[c.name],
        points: { show: true, size: 7, width: 2, stroke: c.style.color, fill: c.style.hollow ? "#ffffff" : c.style.color },
      });
    });
    var pointCount = data.slice(1).reduce(function (a, ys) {
      return a + ys.filter(function (v) { return v !== null; }).length;
    }, 0);
    container.setAttribute("data-series", String(series.classes.length));
    container.setAttribute("data-points", String(pointCount));
    container.setAttribute("data-range-start", String(Math.floor(range.start / 1000)));
    container.setAttribute("data-range-end", String(Math.floor(range.end / 1000)));
    container.setAttribute("data-bucket-seconds", String(bucket));
    container.setAttribute("data-time-format", (range.end - range.start) / 1000 <= 1800 ? "hh:mm:ss" : "hh:mm");
    var mobile = window.innerWidth < 600;
    var opts = {
      width: chartWidth(container),
      height: mobile ? 220 : 280,
      legend: { show: false },
      cursor: { drag: { x: false, y: false }, points: { size: 8 } },
      scales: {
        x: { time: true, range: function () { return [Math.floor(range.start / 1000), Math.ceil(range.end / 1000)]; } },
        y: kind === "confidence"
          ? { range: [0, 1] }
          : { range: function (u, min, max) { return [0, Math.max(1, Math.ceil((max || 0) * 1.1))]; } },
      },
      axes: [axis(null, timeTicks(range)), axis(kind === "confidence" ? STAT_NAMES[state.stat].toLowerCase() + " confidence" : "predictions / min")],
      series: uSeries,
      hooks: { setCursor: [readoutFor(container, series, kind)] },
    };
    var plot = new uPlot(opts, data, container);
    state.charts.push({
      plot: plot,
      container: container,
      names: series.classes.map(function (c) { return c.name; }),
    });
  }

  function readHistograms(data) {
    // {"classes": [{"class_name", "counts": [10 ints], "results_with_stats"}]}
    var out = [];
    listOf(data, "classes").forEach(function (h) {
      var counts = h.counts;
      if (!Array.isArray(counts)) return;
      out.push({
        name: String(orNull(h.class_name) === null ? "" : h.class_name),
        counts: counts.map(Number),
        fromSamples: !h.results_with_stats,
      });
    });
    out.sort(function (a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; });
    return out;
  }

  function renderHistograms(hists) {
    var box = $("histograms");
    clear(box);
    var bars = uPlot.paths.bars({ size: [0.9, 60] });
    hists.forEach(function (h) {
      var style = styleFor(h.name);
      var fig = el("figure", null, "histogram");
      fig.setAttribute("data-class", h.name);
      show(fig, !hidden()[h.name]);
      var cap = el("figcaption");
      cap.appendChild(swatch(style));
      cap.appendChild(el("span", h.name === "" ? "(no class name)" : h.name, "class-name"));
      var sum = total(h.counts);
      fig.appendChild(cap);
      fig.appendChild(el("p", sum + (h.fromSamples ? " sampled confidences (no stats)" : " predictions"), "hist-note"));
      var body = el("div", null, "chart-body");
      body.setAttribute("role", "img");
      body.setAttribute("aria-label", "Histogram of confidence for class " + h.name + ": " + h.counts.join(", "));
      fig.appendChild(body);
      box.appendChild(fig);
      var xs = HIST_EDGES.slice(0, 10).map(function (e) { return e + 0.05; });
      var plot = new uPlot({
        width: chartWidth(body),
        height: 140,
        legend: { show: false },
        cursor: { show: false },
        scales: {
          x: { time: false, range: [0, 1] },
          y: { range: function (u, min, max) { return [0, Math.max(1, max || 0)]; } },
        },
        axes: [
          axis(null, function (u, vals) { return vals.map(function (v) { return v.toFixed(1); }); }),
          axis(null),
        ],
        series: [
          {},
          { label: h.name, stroke: style.color, fill: style.color + "B3", width: 1, paths: bars, points: { show: false } },
        ],
      }, [xs, h.counts], body);
      state.charts.push({ plot: plot, container: body, figure: fig, className: h.name });
    });
    show($("histograms-empty"), hists.length === 0);
  }

  // Narrow screens show each row as a block of "label: value" lines (dashboard.css).
  function labelCells(table) {
    var labels = Array.prototype.map.call(table.querySelectorAll("thead th"), function (th) {
      return th.textContent.trim();
    });
    Array.prototype.forEach.call(table.querySelectorAll("tbody tr"), function (tr) {
      Array.prototype.forEach.call(tr.children, function (td, i) {
        if (labels[i] && td.colSpan === 1) td.setAttribute("data-label", labels[i]);
      });
    });
  }

  function renderSamples(samples) {
    var body = $("samples-body");
    clear(body);
    samples.forEach(function (s) {
      var tr = el("tr");
      tr.appendChild(el("td", formatTime(toDate(s.t)), "nowrap"));
      tr.appendChild(el("td", orNull(s.class_name) === null ? "" : s.class_name, "class-name"));
      tr.appendChild(el("td", formatConfidence(s.confidence), "num"));
      var id = el("td");
      id.appendChild(el("code", s.inference_id || "—"));
      tr.appendChild(id);
      tr.appendChild(el("td", s.model_type || "—", "nowrap"));
      var device = s.device_id || "—";
      var source = s.source_id;
      tr.appendChild(el("td", source ? device + " / " + source : device, "nowrap"));
      body.appendChild(tr);
    });
    if (!samples.length) {
      var tr = el("tr");
      var td = el("td", "No samples in this range.", "muted");
      td.colSpan = 6;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    labelCells($("samples-table"));
  }

  function onResize() {
    state.charts.forEach(function (c) {
      var w = chartWidth(c.container);
      if (Math.abs(w - c.plot.width) > 2) c.plot.setSize({ width: w, height: c.plot.height });
    });
  }

  // ---------------------------------------------------------------- controls

  function onRangeChange() {
    var v = $("range-select").value;
    if (v === "custom") {
      show($("custom-range"), true);
      var r = currentRange();
      if (!$("custom-start").value) $("custom-start").value = toLocalInput(r.start);
      if (!$("custom-end").value) $("custom-end").value = toLocalInput(r.end);
      $("custom-start").focus();
      return;
    }
    show($("custom-range"), false);
    state.custom = null;
    state.rangeSeconds = Number(v);
    refresh();
  }

  function onCustomApply() {
    var start = new Date($("custom-start").value);
    var end = new Date($("custom-end").value);
    if (isNaN(start.getTime()) || isNaN(end.getTime()) || start >= end) {
      var banner = $("app-error");
      banner.textContent = "The custom range needs a start before its end.";
      show(banner, true);
      return;
    }
    show($("app-error"), false);
    state.custom = { start: start, end: end };
    refresh();
  }

  function onTogglePause() {
    state.paused = !state.paused;
    var b = $("refresh-toggle");
    b.setAttribute("aria-pressed", state.paused ? "true" : "false");
    b.textContent = state.paused ? "Resume auto-refresh" : "Pause auto-refresh";
    if (!state.paused) refresh();
    else $("refresh-status").textContent = "Auto-refresh paused";
  }

  function init() {
    $("login-form").addEventListener("submit", onLogin);
    $("logout-button").addEventListener("click", onLogout);
    $("range-select").addEventListener("change", onRangeChange);
    $("custom-apply").addEventListener("click", onCustomApply);
    $("filter-select").addEventListener("change", function () {
      state.filter = $("filter-select").value;
      refresh();
    });
    $("refresh-toggle").addEventListener("click", onTogglePause);
    $("refresh-now").addEventListener("click", function () { refresh(); });
    $("stat-select").addEventListener("change", function () {
      state.stat = STAT_NAMES[$("stat-select").value] ? $("stat-select").value : "median_confidence";
      refresh();
    });
    $("back-button").addEventListener("click", function () { location.hash = ""; });
    $("show-all").addEventListener("click", function () { setAllVisible(false); });
    $("show-top").addEventListener("click", function () { setAllVisible(true); });
    window.addEventListener("hashchange", onHashChange);
    // Hidden tabs skip their refreshes; catch up as soon as the tab is looked at again.
    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "visible" && state.workspace && !state.paused) refresh();
    });
    var resizeTimer = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(onResize, 100);
    });
    // A link may open a range: /dashboard?from=ISO&to=ISO (`mmagg replay` prints one).
    var asked = new URLSearchParams(location.search);
    var from = toDate(asked.get("from")), to = toDate(asked.get("to"));
    if (from && to && from < to) {
      state.custom = { start: from, end: to };
      $("range-select").value = "custom";
      $("custom-start").value = toLocalInput(from);
      $("custom-end").value = toLocalInput(to);
      show($("custom-range"), true);
    }
    document.body.setAttribute("data-renders", "0");
    request("GET", "me")
      .then(function (me) { showApp(me.workspace); })
      .catch(function (err) {
        showLogin(err.status === 401 || err.status === 403 ? "" : "Could not reach the server: " + err.message);
      });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
