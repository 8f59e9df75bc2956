// Streaming page of a Sluice job, after the Streaming tab of the Spark UI.
// It polls api/streaming and redraws everything from that one document; no
// libraries, so the page works on a host without internet access.
"use strict";

const API_URL = "api/streaming"; // relative: the page may sit behind a path prefix
const REFRESH_MS = 2000;
const FETCH_TIMEOUT_MS = 5000;
const CHART_HEIGHT = 170;
const HISTOGRAM_BINS = 10;
const PHASES = ["plan", "fetch", "plugin", "deliver", "commit"];
const SVG_NS = "http://www.w3.org/2000/svg";

// The quantities Spark charts, each read off one batch.
const STATISTICS = [
  { title: "Input rate", unit: "records/s", value: inputRate },
  { title: "Scheduling delay", unit: "ms", value: (batch) => batch.scheduling_delay_ms },
  { title: "Processing time", unit: "ms", value: (batch) => batch.processing_ms },
  { title: "Total delay", unit: "ms", value: (batch) => batch.total_delay_ms },
];
const TOTALS = [
  ["batches", "Batches"], ["records_in", "Records in"], ["outputs", "Outputs"],
  ["rejected", "Rejected"], ["dead_letters", "Dead letters"], ["skipped", "Skipped"],
];

// Detail rows the user opened, by batch_time_ms: the table is rebuilt on every
// refresh and they must stay open across that.
const openBatches = new Set();
let lastData = null; // redrawn on resize
let lastUpdated = null; // clock time of lastData, shown while the job is unreachable

// ---- formatting --------------------------------------------------------------

const integerFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const decimalFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const compactFormat = new Intl.NumberFormat(undefined, { notation: "compact" });

const formatInt = (n) => integerFormat.format(n);
// Small values keep one decimal (a rate of 2.5/s); large ones need none.
const formatValue = (n) => (Math.abs(n) < 100 ? decimalFormat : integerFormat).format(n);
// Axis labels must fit a narrow margin, so 120000 becomes 120K there.
const formatTick = (n) => (Math.abs(n) >= 10000 ? compactFormat : decimalFormat).format(n);
const pad = (n, width = 2) => String(n).padStart(width, "0");

function formatClock(ms, withMillis = true) {
  const d = new Date(ms);
  const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withMillis ? `${hms}.${pad(d.getMilliseconds(), 3)}` : hms;
}

function formatDateTime(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${formatClock(ms, false)}`;
}

function formatDuration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const [days, hours, minutes] = [Math.floor(s / 86400), Math.floor(s / 3600) % 24, Math.floor(s / 60) % 60];
  if (days) return `${days}d ${hours}h`;
  if (hours) return `${hours}h ${pad(minutes)}m`;
  if (minutes) return `${minutes}m ${pad(s % 60)}s`;
  return `${s}s`;
}

// "sha256:ab12cd34ef…" → "sha256:ab12cd34", the form builds take everywhere else.
const shortDigest = (digest) => digest.replace(/^((?:\w+:)?[0-9a-f]{8}).*$/i, "$1");

function inputRate(batch, job) {
  return batch.records_in / (Math.max(job.batch_interval_ms, 1) / 1000);
}

// ---- DOM helpers ---------------------------------------------------------------

// Text goes in as text nodes, never as HTML: topics and builds come from outside.
function el(tag, attrs = {}, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

function svgEl(tag, attrs = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

function fill(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

const numCell = (text, extraClass = "") => el("td", { class: `num ${extraClass}`.trim() }, text);
const badge = (text, kind) => el("span", { class: `badge badge-${kind}` }, text);
const emptyRow = (columns, text) => el("tr", { class: "empty" }, el("td", { colspan: columns }, text));

// ---- header ----------------------------------------------------------------------

function renderJob(job, totals) {
  const plugin = job.plugin;
  const build = `${plugin.name} ${plugin.version} (${shortDigest(plugin.digest)})`;
  document.title = `${job.group} · Streaming · Sluice`;
  const parts = [
    el("h1", {}, job.group, el("span", { class: "member" }, job.member)),
    el("p", { class: "meta" }, "running ", el("strong", {}, build),
      ` · ${plugin.kind} · state schema v${plugin.state_schema_version}`,
      ` · batch every ${formatInt(job.batch_interval_ms)} ms`,
      ` · up ${formatDuration(Date.now() - job.started_at_ms)} (since ${formatDateTime(job.started_at_ms)})`),
    job.probation ? el("p", { class: "probation" }, "On probation: ", el("strong", {}, job.probation)) : null,
    el("dl", { class: "totals" }, ...TOTALS.map(([key, label]) =>
      el("div", {}, el("dt", {}, label), el("dd", {}, formatInt(totals[key] ?? 0))))),
  ];
  document.getElementById("job").replaceChildren(...parts.filter(Boolean));
}

// ---- statistics charts -----------------------------------------------------------

function renderStatistics(data) {
  const { batches, job } = data;
  const host = document.getElementById("stats");
  hideTooltip(); // its chart is about to be replaced
  const summary = batches.length
    ? `${formatInt(batches.length)} ${batches.length === 1 ? "batch" : "batches"} shown of up to ` +
      `${formatInt(data.history_size)} kept, ${formatClock(batches[0].batch_time_ms)} to ` +
      `${formatClock(batches.at(-1).batch_time_ms)}.`
    : "";
  document.getElementById("stats-summary").textContent = summary;
  if (!batches.length) {
    host.replaceChildren(el("p", { class: "empty" }, "No batches yet."));
    return;
  }
  host.replaceChildren();
  for (const statistic of STATISTICS) {
    const points = batches.map((batch) => ({ t: batch.batch_time_ms, v: statistic.value(batch, job) }));
    const average = points.reduce((sum, p) => sum + p.v, 0) / points.length;
    const row = statisticRow(statistic, average);
    host.append(row); // charts are drawn at their laid-out pixel width, so text stays crisp
    const ticks = niceTicks(Math.max(...points.map((p) => p.v)));
    const [timeline, histogram] = row.querySelectorAll(".timeline, .histogram");
    timeline.append(drawTimeline(points, ticks, average, statistic, timeline.clientWidth));
    histogram.append(drawHistogram(points, ticks, average, histogram.clientWidth));
  }
}

// One row: label with the average, timeline, and a histogram sharing its y axis.
function statisticRow(statistic, average) {
  return el("div", { class: "stat-row" },
    el("div", { class: "stat-label" }, el("div", { class: "stat-title" }, statistic.title),
      el("div", { class: "stat-avg" }, `avg ${formatValue(average)} ${statistic.unit}`)),
    el("div", { class: "timeline" }), el("div", { class: "histogram" }));
}

// Axis ticks from zero, spaced 1, 2 or 5 times a power of ten, ending past max.
function niceTicks(max, count = 4) {
  if (!(max > 0)) return [0, 1];
  const rough = max / count;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
  const steps = Math.ceil(max / step - 1e-9);
  return Array.from({ length: steps + 1 }, (_, i) => Number((i * step).toPrecision(12)));
}

// The plotted rectangle inside a chart: room above for the unit, below for ticks.
function plotArea(width, left) {
  const [top, right, bottom] = [18, width - 14, CHART_HEIGHT - 24];
  return { left, top, right, bottom, width: right - left };
}

// Value → y pixel, shared by a timeline and its histogram so their rows line up.
function yScale(ticks, plot) {
  const top = ticks.at(-1);
  return (value) => plot.bottom - (value / top) * (plot.bottom - plot.top);
}

function chartSvg(className, width, label, children) {
  return svgEl("svg", { class: `chart ${className}`, width, height: CHART_HEIGHT,
    viewBox: `0 0 ${width} ${CHART_HEIGHT}`, role: "img", "aria-label": label }, ...children);
}

function horizontalGrid(ticks, y, plot, withLabels) {
  return ticks.flatMap((tick) => [
    svgEl("line", { class: "grid", x1: plot.left, x2: plot.right, y1: y(tick), y2: y(tick) }),
    withLabels ? svgEl("text", { class: "tick", x: plot.left - 6, y: y(tick), "text-anchor": "end",
      "dominant-baseline": "middle" }, formatTick(tick)) : null,
  ]).filter(Boolean);
}

function drawTimeline(points, ticks, average, statistic, width) {
  const plot = plotArea(width, 52);
  const [t0, t1] = [points[0].t, points.at(-1).t];
  const x = (t) => plot.left + (t1 === t0 ? plot.width / 2 : ((t - t0) / (t1 - t0)) * plot.width);
  const y = yScale(ticks, plot);
  const line = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join("");
  const area = `${line}L${x(t1).toFixed(1)},${plot.bottom}L${x(t0).toFixed(1)},${plot.bottom}Z`;
  const svg = chartSvg("timeline", width, `${statistic.title} over time`, [
    ...horizontalGrid(ticks, y, plot, true),
    ...timeAxis(t0, t1, x, plot),
    svgEl("text", { class: "axis-title", x: plot.left, y: 11 }, statistic.unit),
    svgEl("path", { class: "area", d: area }),
    svgEl("path", { class: "line", d: line }),
    svgEl("line", { class: "average", x1: plot.left, x2: plot.right, y1: y(average), y2: y(average) }),
    ...points.map((p) => svgEl("circle", { class: "point", cx: x(p.t), cy: y(p.v), r: 2.5 })),
    svgEl("circle", { class: "marker", r: 5, visibility: "hidden" }),
  ]);
  followPointer(svg, points, x, y, statistic.unit);
  return svg;
}

// Evenly spaced time labels, as many as fit the width without overlapping.
function timeAxis(t0, t1, x, plot) {
  const count = t1 === t0 ? 1 : Math.max(2, Math.floor(plot.width / 110));
  const times = Array.from({ length: count }, (_, i) => (count === 1 ? t0 : t0 + ((t1 - t0) * i) / (count - 1)));
  return [
    svgEl("line", { class: "axis", x1: plot.left, x2: plot.right, y1: plot.bottom, y2: plot.bottom }),
    ...times.map((t, i) => svgEl("text", { class: "tick", x: x(t), y: plot.bottom + 15,
      "text-anchor": count === 1 ? "middle" : i === 0 ? "start" : i === count - 1 ? "end" : "middle" },
    formatClock(t, false))),
  ];
}

// Horizontal bars: values go up the shared y axis, bar length counts batches.
function drawHistogram(points, ticks, average, width) {
  const plot = plotArea(width, 8);
  const y = yScale(ticks, plot);
  const top = ticks.at(-1);
  const counts = new Array(HISTOGRAM_BINS).fill(0);
  for (const p of points) counts[Math.min(HISTOGRAM_BINS - 1, Math.floor((p.v / top) * HISTOGRAM_BINS))] += 1;
  // At least 3 so the count axis never gets half-batch ticks.
  const countTicks = niceTicks(Math.max(3, ...counts), 3);
  const x = (count) => plot.left + (count / countTicks.at(-1)) * plot.width;
  const binHeight = (plot.bottom - plot.top) / HISTOGRAM_BINS;
  return chartSvg("histogram", width, "Distribution over batches", [
    ...horizontalGrid(ticks, y, plot, false),
    svgEl("text", { class: "axis-title", x: plot.right, y: 11, "text-anchor": "end" }, "batches"),
    ...counts.map((count, bin) => svgEl("rect", { class: "bar", x: plot.left,
      y: plot.bottom - (bin + 1) * binHeight + 1, width: Math.max(0, x(count) - plot.left),
      height: Math.max(0, binHeight - 2) }, svgEl("title", {}, `${count} batches`))),
    svgEl("line", { class: "average", x1: plot.left, x2: plot.right, y1: y(average), y2: y(average) }),
    svgEl("line", { class: "axis", x1: plot.left, x2: plot.right, y1: plot.bottom, y2: plot.bottom }),
    ...countTicks.map((tick) => svgEl("text", { class: "tick", x: x(tick), y: plot.bottom + 15,
      "text-anchor": "middle" }, formatInt(tick))),
  ]);
}

// The tooltip follows the batch nearest the pointer's x, which is easier to
// aim at than a five-pixel point.
function followPointer(svg, points, x, y, unit) {
  const marker = svg.querySelector(".marker");
  svg.addEventListener("mousemove", (event) => {
    const pointerX = event.clientX - svg.getBoundingClientRect().left;
    const nearest = points.reduce((best, p) => (Math.abs(x(p.t) - pointerX) < Math.abs(x(best.t) - pointerX) ? p : best));
    fill(marker, { cx: x(nearest.t), cy: y(nearest.v), visibility: "visible" }, []);
    showTooltip(event.clientX, event.clientY, formatClock(nearest.t), `${formatValue(nearest.v)} ${unit}`);
  });
  svg.addEventListener("mouseleave", () => {
    marker.setAttribute("visibility", "hidden");
    hideTooltip();
  });
}

function showTooltip(clientX, clientY, title, value) {
  const tooltip = document.getElementById("tooltip");
  tooltip.replaceChildren(el("div", { class: "tooltip-time" }, title), el("strong", {}, value));
  tooltip.hidden = false;
  // Flip to the pointer's left near the right edge so it stays on screen.
  const flip = clientX + 16 + tooltip.offsetWidth > window.innerWidth;
  tooltip.style.left = `${flip ? clientX - 12 - tooltip.offsetWidth : clientX + 12}px`;
  tooltip.style.top = `${clientY + 14}px`;
}

function hideTooltip() {
  document.getElementById("tooltip").hidden = true;
}

// ---- recent batches ---------------------------------------------------------------

const BATCH_COLUMNS = 10;
const phaseMs = (phases, phase) => phases[`${phase}_ms`] ?? 0;
const phaseTotal = (phases) => PHASES.reduce((sum, phase) => sum + phaseMs(phases, phase), 0);
const phaseText = (phases) => PHASES.map((phase) => `${phase} ${formatInt(phaseMs(phases, phase))}`).join(" · ");

function renderBatches(batches) {
  const present = new Set(batches.map((batch) => batch.batch_time_ms));
  for (const key of openBatches) if (!present.has(key)) openBatches.delete(key); // aged out
  // Bars share one scale, so a long batch also shows as a long bar.
  const scale = Math.max(1, ...batches.map((batch) => phaseTotal(batch.phases)));
  const rows = [...batches].reverse().flatMap((batch) => {
    const row = batchRow(batch, scale);
    return openBatches.has(batch.batch_time_ms) ? [row, detailRow(batch)] : [row];
  });
  document.querySelector("#batches > tbody").replaceChildren(
    ...(rows.length ? rows : [emptyRow(BATCH_COLUMNS, "No batches yet.")]));
}

function batchRow(batch, scale) {
  const open = openBatches.has(batch.batch_time_ms);
  const row = el("tr", { class: "batch", tabindex: 0, "aria-expanded": String(open),
    "data-batch-time": batch.batch_time_ms, "data-records-in": batch.records_in,
    "data-outputs": batch.outputs, "data-ending": batch.ending },
  el("td", { class: "time" }, formatClock(batch.batch_time_ms)),
  numCell(formatInt(batch.records_in)), numCell(formatInt(batch.outputs)),
  numCell(formatInt(batch.rejected), batch.rejected ? "warn" : ""),
  numCell(formatInt(batch.dead_letters), batch.dead_letters ? "warn" : ""),
  numCell(`${formatInt(batch.scheduling_delay_ms)} ms`), numCell(`${formatInt(batch.processing_ms)} ms`),
  numCell(`${formatInt(batch.total_delay_ms)} ms`),
  el("td", {}, phaseBar(batch.phases, scale)),
  el("td", {}, badge(batch.ending, batch.ending), batch.replayed ? badge("replayed", "replayed") : null));
  row.addEventListener("click", () => toggleDetail(row, batch));
  row.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
    toggleDetail(row, batch);
  });
  return row;
}

function phaseBar(phases, scale) {
  const text = `${phaseText(phases)} ms`;
  return el("div", { class: "phases", title: text, "aria-label": text },
    ...PHASES.map((phase) => el("span", { class: `phase phase-${phase}`,
      style: `width:${((phaseMs(phases, phase) / scale) * 100).toFixed(2)}%` })));
}

function toggleDetail(row, batch) {
  const key = batch.batch_time_ms;
  if (openBatches.delete(key)) {
    if (row.nextElementSibling?.matches("tr.batch-detail")) row.nextElementSibling.remove();
  } else {
    openBatches.add(key);
    row.after(detailRow(batch));
  }
  row.setAttribute("aria-expanded", String(openBatches.has(key)));
}

function detailRow(batch) {
  const ranges = batch.ranges.length
    ? el("table", { class: "ranges" },
      el("thead", {}, el("tr", {}, el("th", {}, "Topic"), ...["Partition", "From", "Until", "Records"]
        .map((heading) => el("th", { class: "num" }, heading)))),
      el("tbody", {}, ...batch.ranges.map(rangeRow)))
    : el("p", { class: "empty" }, "No offset ranges: the batch read nothing.");
  return el("tr", { class: "batch-detail", "data-batch-time": batch.batch_time_ms },
    el("td", { colspan: BATCH_COLUMNS },
      el("p", {}, "Build ", el("span", { class: "build" }, batch.build),
        batch.replayed ? " · replayed after a restart" : "",
        ` · skipped ${formatInt(batch.skipped)} · phases ${phaseText(batch.phases)} ms`),
      ranges));
}

function rangeRow(range) {
  return el("tr", { class: "range", "data-topic": range.topic, "data-partition": range.partition,
    "data-from": range.from, "data-until": range.until },
  el("td", {}, range.topic), numCell(range.partition), numCell(formatInt(range.from)),
  numCell(formatInt(range.until)), numCell(formatInt(range.until - range.from)));
}

// ---- lineage, upgrades, lag ------------------------------------------------------

function renderLineage(lineage) {
  const rows = lineage.map((entry, i) => el("tr", { class: "build-row", "data-build": entry.build },
    el("td", {}, entry.build, i === lineage.length - 1 ? badge("latest", "latest") : null),
    el("td", { class: "time" }, formatDateTime(entry.first_batch_ms)), numCell(`v${entry.state_schema_version}`)));
  document.querySelector("#lineage > tbody").replaceChildren(
    ...(rows.length ? rows : [emptyRow(3, "No lineage: the job runs without a checkpoint.")]));
}

function renderUpgrades(upgrades) {
  const rows = upgrades.map((upgrade) => el("tr", { class: "upgrade", "data-outcome": upgrade.outcome },
    el("td", { class: "time" }, formatClock(upgrade.at_ms, false)), el("td", {}, badge(upgrade.outcome, upgrade.outcome)),
    el("td", {}, upgrade.from, el("br"), "→ ", upgrade.to), el("td", {}, upgrade.detail)));
  document.querySelector("#upgrades > tbody").replaceChildren(
    ...(rows.length ? rows : [emptyRow(4, "No upgrade attempted in this run.")]));
}

function renderLag(lag) {
  const sorted = [...lag].sort((a, b) => a.topic.localeCompare(b.topic) || a.partition - b.partition);
  const rows = sorted.map((entry) => el("tr", { class: "lag-row" }, el("td", {}, entry.topic),
    numCell(entry.partition), numCell(formatInt(entry.lag), entry.lag ? "" : "quiet")));
  const total = lag.reduce((sum, entry) => sum + entry.lag, 0);
  document.querySelector("#lag > tbody").replaceChildren(
    ...(rows.length ? rows : [emptyRow(3, "No partitions assigned.")]));
  document.querySelector("#lag > tfoot").replaceChildren(
    el("tr", {}, el("td", { colspan: 2 }, "Total"), numCell(formatInt(total))));
}

function renderLegend() {
  document.getElementById("phase-legend").replaceChildren(...PHASES.map((phase) =>
    el("span", { class: "legend-item" }, el("span", { class: `swatch phase-${phase}` }), phase)));
}

// ---- refresh loop -------------------------------------------------------------

function render(data) {
  renderJob(data.job, data.totals);
  renderStatistics(data);
  renderBatches(data.batches);
  renderLineage(data.lineage);
  renderUpgrades(data.upgrades);
  renderLag(data.lag);
  lastData = data;
  document.body.dataset.loaded = "true";
}

async function fetchStreaming() {
  let response;
  try {
    response = await fetch(API_URL, { cache: "no-store", signal: AbortSignal.timeout(FETCH_TIMEOUT_MS) });
  } catch (error) {
    throw new Error(`cannot reach job (${error.name === "TimeoutError" ? "timed out" : "no connection"})`);
  }
  if (!response.ok) throw new Error(`cannot reach job (HTTP ${response.status})`);
  return response.json().catch(() => {
    throw new Error("cannot read job data (not JSON)");
  });
}

function setStatus(text, failed) {
  const status = document.getElementById("updated");
  status.textContent = text;
  status.classList.toggle("failed", failed);
}

// Renders one document; a failure here is a bug in this page or a schema
// change, so the stack goes to the console.
function show(data) {
  try {
    render(data);
    lastUpdated = formatClock(Date.now(), false);
    setStatus(`updated ${lastUpdated}`, false);
  } catch (error) {
    setStatus(`cannot show job data: ${error.message}`, true);
    console.error(error);
  }
}

// One request at a time: the next is scheduled only once this one settled, so
// a slow or dead job never piles requests up. Failures keep the last data shown
// (the browser already logs the failed request).
async function refresh() {
  const data = await fetchStreaming().catch((error) => {
    setStatus(lastUpdated ? `${error.message} · showing data from ${lastUpdated}` : error.message, true);
    return null;
  });
  if (data) show(data);
  setTimeout(refresh, REFRESH_MS);
}

// Charts are drawn at pixel width, so redraw them once a resize settles.
let resizeTimer;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => lastData && renderStatistics(lastData), 150);
});

renderLegend();
refresh();
