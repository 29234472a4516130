// Unit tests of @trace/udf (run from the compiled dist/: `npm test` after `npm run build`,
// or by tests/udf/test_node_sdk.py).
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { chunkRows, MAX_BATCH_BYTES, NonRetryableError, UdfContext } from "../dist/index.js";
import { localEvent, runLocal } from "../dist/harness.js";
import { eventProblem, resultProblem } from "../dist/runtime.js";
import { grantedDatasets, lineBytes } from "../dist/context.js";

const SDK = join(dirname(fileURLToPath(import.meta.url)), "..");

test("chunkRows splits at 1000 rows and at the canonical byte limit", () => {
  const rows = Array.from({ length: 2500 }, (_, i) => ({ i }));
  assert.deepEqual(chunkRows(rows).map((c) => c.length), [1000, 1000, 500]);
  // 30,000 "é" are 180,000 canonical bytes (\u00e9 each): two such rows need two batches
  const wide = { s: "é".repeat(30_000) };
  assert.equal(lineBytes(wide), 180_000 + 8 + 1);
  assert.equal(chunkRows([wide, wide]).length, 2);
  assert.throws(() => chunkRows([{ s: "x".repeat(MAX_BATCH_BYTES) }]), /exceeds/);
});

test("grantedDatasets reads grants.datasets.read from the token's claims", () => {
  const claims = Buffer.from(JSON.stringify({ grants: { datasets: { read: ["blocks", "logs"] } } })).toString("base64url");
  assert.deepEqual(grantedDatasets(`e30.${claims}.sig`), ["blocks", "logs"]);
  assert.deepEqual(grantedDatasets("not-a-token"), []);
  assert.deepEqual(grantedDatasets("a.!!!.c"), []);
});

test("emitRows keys count calls per dataset, honour a given key and refuse bad input", () => {
  const ctx = new UdfContext(localEvent(), /** @type {any} */ ({}));
  assert.equal(ctx.emitRows("a", [{ x: 1 }]), "a.0");
  assert.equal(ctx.emitRows("a", [{ x: 2 }]), "a.1");
  assert.equal(ctx.emitRows("b", [{ x: 3 }]), "b.0");
  assert.equal(ctx.emitRows("a", [], { key: "mine" }), "mine");
  assert.throws(() => ctx.emitRows("a", [], { key: "mine" }), /already used/);
  assert.throws(() => ctx.emitRows("Bad Name", []), /invalid dataset name/);
  assert.throws(() => ctx.emitRows("a", [[1]]), /not a JSON object/);
  assert.throws(() => ctx.emitRows("a", [{ big: 1n }]), /BigInt/);
  assert.deepEqual(ctx.pendingRows, { a: [{ x: 1 }, { x: 2 }], b: [{ x: 3 }] });
});

test("resultProblem and eventProblem name what is wrong", () => {
  assert.equal(resultProblem(undefined), null);
  assert.equal(resultProblem({ a: 1 }), null);
  assert.match(resultProblem([1]), /returned an array/);
  assert.match(resultProblem(new Map()), /non-plain object/);
  const cycle = {};
  cycle.self = cycle;
  assert.match(resultProblem(cycle), /not JSON/);
  assert.equal(eventProblem(localEvent()), null);
  assert.match(eventProblem({ ...localEvent(), attempt: 0 }), /attempt/);
  assert.match(eventProblem({ ...localEvent(), payload: [] }), /payload/);
});

test("runLocal publishes rows and answers queries on success", async () => {
  const run = await runLocal(
    async (ctx) => {
      const rows = await ctx.query("SELECT n FROM blocks");
      ctx.emitRows("doubled", rows.map((r) => ({ n: r.n, d: 2 * r.n })));
      ctx.emitEvent("doubled.done", { rows: rows.length }, { key: "done" });
      return { read: rows.length, granted: ctx.datasets };
    },
    { payload: { any: true } },
    { query: { "SELECT n FROM blocks": [{ n: 1 }, { n: 2 }] }, grants: ["blocks"] },
  );
  assert.ok(run.outcome.ok);
  assert.deepEqual(run.outcome.response.result, { read: 2, granted: ["blocks"] });
  assert.deepEqual(run.rows, { doubled: [{ n: 1, d: 2 }, { n: 2, d: 4 }] });
  assert.deepEqual(run.batches.map((b) => b.key), ["doubled.0.0"]);
  assert.deepEqual(run.events, [{ key: "done", type: "doubled.done", payload: { rows: 2 } }]);
  assert.deepEqual(run.queries, ["SELECT n FROM blocks"]);
});

test("runLocal publishes nothing when the handler fails", async () => {
  const run = await runLocal(async (ctx) => {
    ctx.emitRows("doubled", [{ n: 1 }]);
    throw new NonRetryableError("no");
  });
  assert.equal(run.outcome.ok, false);
  assert.equal(run.outcome.error.errorType, "NonRetryableError");
  assert.deepEqual(run.rows, {});
});

test("build.mjs: the same sources give the same bytes; a type error fails --typecheck", () => {
  const root = mkdtempSync(join(tmpdir(), "udf-build-"));
  const src = join(root, "src");
  execFileSync("mkdir", ["-p", src]);
  writeFileSync(join(src, "handler.ts"), 'import type { Handler } from "@trace/udf";\nexport const handler: Handler = (ctx) => ({ n: ctx.payload.n ?? 0 });\n');
  const build = (out, ...extra) =>
    spawnSync(process.execPath, [join(SDK, "build.mjs"), src, join(root, out), "--name", "det", ...extra], { encoding: "utf8" });
  assert.equal(build("a", "--typecheck").status, 0);
  assert.equal(build("b").status, 0);
  const files = readdirSync(join(root, "a"));
  assert.deepEqual(files, readdirSync(join(root, "b")));
  for (const f of files) assert.deepEqual(readFileSync(join(root, "a", f)), readFileSync(join(root, "b", f)));
  const manifest = JSON.parse(readFileSync(join(root, "a", "trace-udf.json"), "utf8"));
  assert.deepEqual(manifest, { format: 1, name: "det", language: "node", handler: "handler.handler" });
  writeFileSync(join(src, "handler.ts"), 'import type { Handler } from "@trace/udf";\nexport const handler: Handler = (ctx) => ctx.payload.n.toFixed(2);\n');
  const bad = build("c", "--typecheck");
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /type errors/);
  const noName = spawnSync(process.execPath, [join(SDK, "build.mjs"), src, join(root, "d")], { encoding: "utf8" });
  assert.equal(noName.status, 1);
  assert.match(noName.stderr, /needs a name/);
});
