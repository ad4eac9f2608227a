// serve_core dashboard: polls dashboard/data (relative to the page) and draws tables and SVG charts.
// No dependencies, no build step; every element is built with the DOM API (text never parsed as HTML).
(function () {
  "use strict";

  var POLL_MS = 1500;
  var SHOWN_ERRORS = 12;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var FIELDS = ["rps", "eps", "p50", "p95", "p99"];
  var PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                 "#9c755f", "#bab0ac"];
  var LINE_COLORS = {rps: "#4e79a7", eps: "#e15759", p50: "#59a14f", p95: "#f28e2b", p99: "#e15759"};
  var state = {seq: 0, t: [], endpoints: {}, backends: {}, horizon: 600, colors: {}, last: null};

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAll(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, children) {
    var node = document.createElementNS(SVG_NS, tag);
    setAll(node, attrs);
    append(node, children);
    return node;
  }

  function setAll(node, attrs) {
    Object.keys(attrs || {}).forEach(function (key) {
      if (attrs[key] !== null && attrs[key] !== undefined) node.setAttribute(key, String(attrs[key]));
    });
  }

  function append(node, children) {
    if (children === null || children === undefined) return;
    (Array.isArray(children) ? children : [children]).forEach(function (child) {
      if (child === null || child === undefined) return;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    });
  }

  function cell(field, value, cls) {
    return el("td", {"data-field": field, "class": cls || null}, value);
  }

  function colorOf(tag) {
    if (!(tag in state.colors)) {
      state.colors[tag] = PALETTE[Object.keys(state.colors).length % PALETTE.length];
    }
    return state.colors[tag];
  }

  function fmtCount(value) {
    return value === null || value === undefined ? "–" : String(value);
  }

  function fmtRate(value) {
    if (value === null || value === undefined) return "–";
    return value < 10 ? value.toFixed(2) : value.toFixed(value < 100 ? 1 : 0);
  }

  function fmtMs(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    var ms = seconds * 1000;
    if (ms === 0) return "0";
    return (ms < 1 ? ms.toFixed(3) : ms < 10 ? ms.toFixed(2) : ms.toFixed(1)) + " ms";
  }

  function fmtAxisSeconds(seconds) {  // short: the axis has room for about six characters
    var ms = seconds * 1000;
    if (ms === 0) return "0";
    if (ms >= 1000) return (seconds < 10 ? seconds.toFixed(1) : seconds.toFixed(0)) + " s";
    return (ms >= 10 ? ms.toFixed(0) : ms >= 1 ? ms.toFixed(1) : ms.toFixed(2)) + " ms";
  }

  function fmtTime(wall) {
    var date = new Date(wall * 1000);
    return date.toLocaleTimeString([], {hour12: false});
  }

  function niceCeil(value) {
    if (!(value > 0)) return 1;
    var power = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * power >= value) return steps[i] * power;
    }
    return 10 * power;
  }

  function nulls(count) {
    var out = new Array(count);
    for (var i = 0; i < count; i++) out[i] = null;
    return out;
  }

  function fillTable(id, rows) {
    var table = document.getElementById(id);
    table.tBodies[0].replaceChildren.apply(table.tBodies[0], rows);
    var empty = document.getElementById(id + "-empty");
    if (empty) empty.hidden = rows.length > 0;
    table.hidden = rows.length === 0;
  }

  // ------------------------------------------------------------------ history
  function mergeSeries(kind, incoming, before, added) {
    var names = {};
    Object.keys(state[kind]).concat(Object.keys(incoming)).forEach(function (name) { names[name] = true; });
    var merged = {};
    Object.keys(names).forEach(function (name) {
      var old = state[kind][name] || null;
      var inc = incoming[name] || null;
      merged[name] = {};
      FIELDS.forEach(function (field) {
        var head = old ? old[field] : nulls(before);
        var tail = inc ? inc[field] : nulls(added);
        merged[name][field] = head.concat(tail);
      });
    });
    state[kind] = merged;
  }

  function mergeHistory(history, horizon) {
    if (history.seq < state.seq) {  // the server restarted: its sequence began again
      state.t = []; state.endpoints = {}; state.backends = {};
    }
    var before = state.t.length;
    var added = history.t.length;
    mergeSeries("endpoints", history.endpoints, before, added);
    mergeSeries("backends", history.backends, before, added);
    state.t = state.t.concat(history.t);
    state.seq = history.seq;
    state.horizon = horizon;
    var newest = state.t.length ? state.t[state.t.length - 1] : 0;
    var cut = 0;
    while (cut < state.t.length && state.t[cut] < newest - horizon) cut++;
    if (cut > 0) {
      state.t = state.t.slice(cut);
      ["endpoints", "backends"].forEach(function (kind) {
        Object.keys(state[kind]).forEach(function (name) {
          var series = state[kind][name];
          FIELDS.forEach(function (field) { series[field] = series[field].slice(cut); });
          if (FIELDS.every(function (field) { return series[field].every(function (v) { return v === null; }); })) {
            delete state[kind][name];  // nothing left in the window
          }
        });
      });
    }
  }

  // ------------------------------------------------------------------ charts
  // A line chart of several series over the time axis [now - horizon, now]; null values break the line.
  function lineChart(title, lines, format, now, floor, axisFormat) {
    var width = 280, height = 120, left = 52, right = 8, top = 8, bottom = 20;
    var plotW = width - left - right, plotH = height - top - bottom;
    var start = now - state.horizon;
    var max = 0;
    lines.forEach(function (line) {
      line.values.forEach(function (v) { if (v !== null && v > max) max = v; });
    });
    max = niceCeil(Math.max(max, floor));
    var x = function (t) { return left + plotW * Math.max(0, t - start) / state.horizon; };
    var y = function (v) { return top + plotH * (1 - v / max); };
    var parts = [svg("rect", {x: left, y: top, width: plotW, height: plotH, "class": "plot"})];
    [0, 0.5, 1].forEach(function (fraction) {
      var value = max * fraction;
      parts.push(svg("line", {x1: left, x2: left + plotW, y1: y(value), y2: y(value), "class": "grid"}));
      parts.push(svg("text", {x: left - 4, y: y(value) + 4, "text-anchor": "end", "class": "axis"}, axisFormat(value)));
    });
    [[start, "-10 min"], [start + state.horizon / 2, "-5 min"], [now, "now"]].forEach(function (tick, index) {
      var anchor = index === 0 ? "start" : index === 2 ? "end" : "middle";
      parts.push(svg("text", {x: x(tick[0]), y: height - 5, "text-anchor": anchor, "class": "axis"}, tick[1]));
    });
    lines.forEach(function (line) {
      var path = "", pen = false;
      line.values.forEach(function (v, i) {
        if (v === null || state.t[i] < start) { pen = false; return; }
        path += (pen ? "L" : "M") + x(state.t[i]).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = true;
      });
      if (path) parts.push(svg("path", {d: path, stroke: line.color, "class": "series"}));
    });
    var legend = el("div", {"class": "legend"}, lines.map(function (line) {
      var latest = null;
      for (var i = line.values.length - 1; i >= 0; i--) {
        if (line.values[i] !== null) { latest = line.values[i]; break; }
      }
      return el("span", {"class": "key", "data-series": line.key}, [
        svg("svg", {width: 10, height: 10}, svg("rect", {width: 10, height: 10, fill: line.color})),
        " " + line.label + " ", el("b", {}, latest === null ? "–" : format(latest)),
      ]);
    }));
    return el("figure", {"class": "chart"}, [
      el("figcaption", {}, title),
      svg("svg", {viewBox: "0 0 " + width + " " + height, width: width, height: height, role: "img"}, parts),
      legend,
    ]);
  }

  function chartCard(kind, name, series, now, latencyNote) {
    var rate = lineChart("rate (per second)", [
      {key: "rps", label: "requests", color: LINE_COLORS.rps, values: series.rps},
      {key: "eps", label: "errors", color: LINE_COLORS.eps, values: series.eps},
    ], fmtRate, now, 1, fmtRate);
    var latency = lineChart("latency" + latencyNote, ["p50", "p95", "p99"].map(function (p) {
      return {key: p, label: p, color: LINE_COLORS[p], values: series[p]};
    }), fmtMs, now, 0.001, fmtAxisSeconds);
    return el("div", {"class": "card", "data-kind": kind, "data-name": name}, [
      el("h3", {}, [el("span", {"class": "muted"}, kind + " "), name]), el("div", {"class": "charts"}, [rate, latency]),
    ]);
  }

  // ------------------------------------------------------------------ tables
  function trafficBar(traffic) {
    var tags = Object.keys(traffic).sort();
    if (!tags.length) return el("span", {"class": "muted"}, "no traffic");
    var width = 160, offset = 0;
    var rects = tags.map(function (tag) {
      var w = width * traffic[tag];
      var rect = svg("rect", {x: offset, y: 0, width: Math.max(0, w), height: 12, fill: colorOf(tag)},
                     svg("title", {}, tag + " " + Math.round(traffic[tag] * 100) + "%"));
      offset += w;
      return rect;
    });
    var bar = svg("svg", {width: width, height: 12, "class": "bar"}, rects);
    var legend = tags.map(function (tag) {
      return el("span", {"class": "split", "data-backend": tag}, [
        svg("svg", {width: 8, height: 8}, svg("rect", {width: 8, height: 8, fill: colorOf(tag)})),
        " " + tag + " " + Math.round(traffic[tag] * 1000) / 10 + "%",
      ]);
    });
    return el("div", {}, [bar, el("div", {"class": "splits"}, legend)]);
  }

  function endpointRow(ep) {
    return el("tr", {"data-name": ep.name}, [
      cell("name", ep.name, "name"),
      cell("route", ep.route === null ? "(Python only)" : ep.route, ep.route === null ? "muted" : "mono"),
      cell("methods", ep.methods.join(", ")),
      el("td", {"data-field": "traffic"}, trafficBar(ep.traffic)),
      cell("requests", fmtCount(ep.requests), "num"),
      cell("errors", fmtCount(ep.errors), ep.errors ? "num bad" : "num"),
      cell("waiting", fmtCount(ep.waiting), "num"),
    ]);
  }

  function backendRow(be, shared) {
    var batch = (be.max_batch_size === null ? "–" : be.max_batch_size) + " / " +
                (be.recent_batch_size === null ? "–" : Math.round(be.recent_batch_size * 10) / 10);
    var perInstance = shared ? Object.keys(be.instances).sort().map(function (id) {
      var counts = be.instances[id];
      return el("div", {"class": "mono", "data-instance": id}, id + ": " + counts.running + " / " + counts.desired);
    }) : "–";
    var short = be.ready < be.desired;
    return el("tr", {"data-name": be.tag}, [
      el("td", {"data-field": "tag", "class": "name"}, [
        svg("svg", {width: 8, height: 8}, svg("rect", {width: 8, height: 8, fill: colorOf(be.tag)})), " " + be.tag,
      ]),
      cell("executor", be.executor),
      cell("desired", fmtCount(be.desired), "num"),
      cell("running", fmtCount(be.running), "num"),
      cell("ready", fmtCount(be.ready), short ? "num warn" : "num"),
      cell("queue", fmtCount(be.queue), "num"),
      cell("in_flight", fmtCount(be.in_flight), "num"),
      cell("batch", batch, "num"),
      cell("requests", fmtCount(be.requests), "num"),
      cell("errors", fmtCount(be.errors), be.errors ? "num bad" : "num"),
      el("td", {"data-field": "instances"}, perInstance),
    ]);
  }

  function instanceRow(inst) {
    return el("tr", {"data-name": inst.id, "class": inst.this ? "this" : null}, [
      cell("id", inst.id + (inst.this ? " (this one)" : ""), "mono"),
      cell("http", inst.http || "–", "mono"),
      cell("executor", inst.executor),
      cell("revision", inst.revision, "num"),
      cell("last_seen", inst.last_seen_s + " s ago", "num"),
    ]);
  }

  function errorRow(error) {
    var exception = [error.type + (error.kind && error.kind !== "user_error" ? " (" + error.kind + ")" : "") +
      (error.count > 1 ? " \u00d7" + error.count : "")];
    if (error.message) exception.push(el("div", {"class": "muted"}, error.message));
    if (error.traceback) {
      exception.push(el("details", {}, [el("summary", {}, "traceback"), el("pre", {}, error.traceback)]));
    }
    return el("tr", {"data-id": error.id}, [
      cell("time", fmtTime(error.time), "mono"),
      cell("id", error.id, "mono"),
      cell("request", error.method ? error.method + " " + error.path : "handle call", "mono"),
      cell("endpoint", error.endpoint),
      cell("backend", error.backend || "–"),
      el("td", {"data-field": "type", "class": "mono"}, exception),
    ]);
  }

  // ------------------------------------------------------------------ render
  function render(data) {
    mergeHistory(data.history, data.horizon_s);
    var inst = data.instance;
    document.getElementById("instance").textContent =
      inst.id + " · " + inst.state + " · executor " + inst.executor + " · http " + (inst.http || "(served by the host app)") +
      " · store revision " + inst.revision + (inst.debug ? " · debug" : "");
    var status = document.getElementById("status");
    status.textContent = "live · " + fmtTime(data.time);
    status.className = "status live";

    fillTable("endpoints", data.endpoints.map(endpointRow));
    var shared = data.instances.length > 1;
    fillTable("backends", data.backends.map(function (be) { return backendRow(be, shared); }));
    fillTable("instances", data.instances.map(instanceRow));
    var errors = data.errors.slice().reverse();
    fillTable("errors", errors.slice(0, SHOWN_ERRORS).map(errorRow));
    document.getElementById("errors-more").textContent = errors.length > SHOWN_ERRORS ?
      "Newest " + SHOWN_ERRORS + " of the " + errors.length + " kept; every error id is in the server log." : "";

    var now = data.time;
    var cards = [];
    data.endpoints.forEach(function (ep) {
      if (state.endpoints[ep.name]) {
        cards.push(chartCard("endpoint", ep.name, state.endpoints[ep.name], now, " (from the latency buckets)"));
      }
    });
    data.backends.forEach(function (be) {
      if (state.backends[be.tag]) cards.push(chartCard("backend", be.tag, state.backends[be.tag], now, ""));
    });
    var charts = document.getElementById("charts");
    charts.replaceChildren.apply(charts, cards.length ? cards : [el("p", {"class": "empty"}, "Collecting…")]);
    document.body.setAttribute("data-updated", String(data.history.seq));
  }

  function offline(error) {
    var status = document.getElementById("status");
    status.textContent = "offline · " + (error && error.message ? error.message : "no answer");
    status.className = "status offline";
  }

  function poll() {
    fetch("dashboard/data?since=" + state.seq, {cache: "no-store", headers: {Accept: "application/json"}})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(render)
      .catch(offline)
      .then(function () { window.setTimeout(poll, POLL_MS); });
  }

  poll();
})();
