// Drives a Sluice job's Streaming page in headless Chromium for the Rust
// end-to-end tests, and prints what the page shows as one JSON object:
//
//   node tests/browser/streaming_page.mjs URL SCREENSHOT.png [--expand N]
//
// It uses Debian's chromium (or $CHROMIUM) through playwright-core, which never
// downloads a browser of its own. Any failure exits 1 with a message on stderr.
import { readFile } from "node:fs/promises";
import { chromium } from "playwright-core";
import { PNG } from "pngjs";

const LOAD_TIMEOUT_MS = 30_000;
const DEFAULT_EXPAND = 3;
const VIEWPORT = { width: 1280, height: 900 };

function usage(message) {
  throw new Error(`${message}\nusage: node streaming_page.mjs URL SCREENSHOT.png [--expand N]`);
}

function parseArgs(args) {
  const positional = [];
  let expand = DEFAULT_EXPAND;
  for (let i = 0; i < args.length; i += 1) {
    if (args[i] !== "--expand") {
      positional.push(args[i]);
      continue;
    }
    expand = Number(args[(i += 1)]);
    if (!Number.isInteger(expand) || expand < 0) usage("--expand takes a whole number");
  }
  if (positional.length !== 2) usage("expected a URL and a screenshot path");
  return { url: positional[0], screenshot: positional[1], expand };
}

// Opens the newest N batches' detail rows. Rows are picked by batch time, not
// by position: the page refreshes every two seconds and a new batch would
// shift positions (and a second click would close a row again). A batch that
// ages out of the history meanwhile is skipped rather than waited for.
async function expandNewest(page, count) {
  const times = await page.$$eval("table#batches tr.batch", (rows, n) =>
    rows.slice(0, n).map((row) => row.dataset.batchTime), count);
  for (const time of times) {
    const row = page.locator(`table#batches tr.batch[data-batch-time="${time}"]`);
    if ((await row.count()) === 0) continue;
    try {
      await row.click({ timeout: LOAD_TIMEOUT_MS });
    } catch (error) {
      if ((await row.count()) === 0) continue;
      throw error;
    }
    await page.locator(`table#batches tr.batch-detail[data-batch-time="${time}"]`)
      .waitFor({ state: "attached", timeout: LOAD_TIMEOUT_MS });
  }
}

// Reads everything in one evaluation, so a refresh cannot land halfway.
function readPage(page) {
  return page.evaluate(() => {
    const all = (selector, root = document) => [...root.querySelectorAll(selector)];
    const detailOf = (time) => document.querySelector(`table#batches tr.batch-detail[data-batch-time="${time}"]`);
    const batches = all("table#batches tr.batch").map((row) => {
      const detail = detailOf(row.dataset.batchTime);
      return {
        batch_time_ms: Number(row.dataset.batchTime),
        records_in: Number(row.dataset.recordsIn),
        outputs: Number(row.dataset.outputs),
        ending: row.dataset.ending,
        ranges: detail ? all("tr.range", detail).map((range) => ({
          topic: range.dataset.topic,
          partition: Number(range.dataset.partition),
          from: Number(range.dataset.from),
          until: Number(range.dataset.until),
        })) : null,
        build: detail?.querySelector(".build")?.textContent ?? null,
      };
    });
    return {
      batches,
      lineage: all("table#lineage tr.build-row").map((row) => row.dataset.build),
      upgrades: all("table#upgrades tr.upgrade").map((row) => ({ outcome: row.dataset.outcome })),
      lag_rows: all("table#lag tr.lag-row").length,
      charts: all("svg.chart").length,
    };
  });
}

// Distinct colours tell a rendered page from a blank or error page.
async function measurePng(path) {
  const png = PNG.sync.read(await readFile(path));
  const pixels = new Uint32Array(png.data.buffer, png.data.byteOffset, png.data.length / 4);
  return { path, width: png.width, height: png.height, distinct_colours: new Set(pixels).size };
}

async function main() {
  const { url, screenshot, expand } = parseArgs(process.argv.slice(2));
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox"], // the tests run as root
  });
  try {
    const page = await browser.newPage({ viewport: VIEWPORT });
    const pageErrors = [];
    page.on("pageerror", (error) => pageErrors.push(error.message));
    const response = await page.goto(url, { timeout: LOAD_TIMEOUT_MS });
    if (!response?.ok()) throw new Error(`GET ${url} answered ${response?.status()}`);
    await page.locator('body[data-loaded="true"]').waitFor({ state: "attached", timeout: LOAD_TIMEOUT_MS })
      .catch(async () => {
        const status = await page.locator("#updated").textContent().catch(() => "?");
        throw new Error(`page did not load its data within ${LOAD_TIMEOUT_MS / 1000} s (indicator: ${status})`);
      });
    await expandNewest(page, expand);
    const report = await readPage(page);
    await page.screenshot({ path: screenshot, fullPage: true });
    report.screenshot = await measurePng(screenshot);
    if (pageErrors.length) throw new Error(`the page threw: ${pageErrors.join("; ")}`);
    process.stdout.write(`${JSON.stringify(report)}\n`);
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  process.stderr.write(`streaming_page: ${error.message}\n`);
  process.exit(1);
});
