#!/usr/bin/env node
/**
 * Build a Node UDF bundle: `node sdks/node/build.mjs SRC_DIR OUT_DIR [--typecheck]`.
 *
 * SRC_DIR holds the handler module: the first of handler.ts, handler.mts, handler.js,
 * handler.mjs, index.ts, index.js (its `handler` export is the UDF), with any npm
 * dependencies in SRC_DIR/node_modules. TypeScript is compiled to JavaScript here (esbuild);
 * `--typecheck` also runs `tsc --noEmit` on it against this SDK's types. `@trace/udf` resolves
 * to this SDK's sources, so a bundle needs no install.
 *
 * OUT_DIR (emptied first) receives a self-contained bundle, as for Lambda's custom runtime:
 *   bootstrap          executable: exec node runtime.mjs (node from PATH, or $TRACE_NODE)
 *   runtime.mjs        the Runtime API loop; loads handler.mjs (`_HANDLER`, default handler.handler)
 *   handler.mjs        the handler and its dependencies
 *   chunk-*.mjs        code both share (the SDK), so `instanceof` holds across them
 *   trace-udf.json     {"runtime": "node", "handler": "handler.handler", "sdk": VERSION}
 * The same sources give the same bytes. Prints {"out", "files"} as JSON; exit 1 with the
 * reason on stderr when the handler is missing or does not compile.
 */

import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";

const SDK = dirname(fileURLToPath(import.meta.url));
const ENTRIES = ["handler.ts", "handler.mts", "handler.js", "handler.mjs", "index.ts", "index.js"];

export const BOOTSTRAP = '#!/bin/sh\nexec "${TRACE_NODE:-node}" "$(dirname "$0")/runtime.mjs" "$@"\n';

/** Find SRC_DIR's handler module; throws when there is none. */
export function findEntry(srcDir) {
  const entry = ENTRIES.map((name) => join(srcDir, name)).find((p) => existsSync(p));
  if (!entry) throw new Error(`no handler module in ${srcDir} (one of ${ENTRIES.join(", ")})`);
  return entry;
}

/** Type-check the entry with tsc against the SDK's sources; throws with tsc's output. */
export function typecheck(entry) {
  const config = {
    compilerOptions: {
      target: "ES2022",
      module: "NodeNext",
      moduleResolution: "NodeNext",
      strict: true,
      noEmit: true,
      skipLibCheck: true,
      types: ["node"],
      typeRoots: [join(SDK, "node_modules", "@types")],
      paths: { "@trace/udf": [join(SDK, "src", "index.ts")] },
      allowImportingTsExtensions: true,
    },
    files: [resolve(entry)],
  };
  const dir = join(dirname(resolve(entry)), ".trace-typecheck");
  mkdirSync(dir, { recursive: true });
  const tsconfig = join(dir, "tsconfig.json");
  writeFileSync(tsconfig, JSON.stringify(config));
  try {
    const tsc = join(SDK, "node_modules", "typescript", "bin", "tsc");
    const run = spawnSync(process.execPath, [tsc, "-p", tsconfig], { encoding: "utf8" });
    if (run.status !== 0) throw new Error(`type errors:\n${run.stdout}${run.stderr}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Build the bundle of SRC_DIR into OUT_DIR; returns the files written. */
export async function buildBundle(srcDir, outDir, { check = false } = {}) {
  const entry = findEntry(srcDir);
  if (check && /\.m?ts$/.test(entry)) typecheck(entry);
  rmSync(outDir, { recursive: true, force: true });
  mkdirSync(outDir, { recursive: true });
  const sdkSrc = join(SDK, "src");
  await esbuild.build({
    entryPoints: { handler: entry, runtime: join(sdkSrc, "bootstrap_main.ts") },
    bundle: true,
    splitting: true,
    format: "esm",
    platform: "node",
    target: "node20",
    outdir: outDir,
    outExtension: { ".js": ".mjs" },
    chunkNames: "chunk-[hash]",
    alias: {
      "@trace/udf/harness": join(sdkSrc, "harness.ts"),
      "@trace/udf/runtime": join(sdkSrc, "runtime.ts"),
      "@trace/udf": join(sdkSrc, "index.ts"),
    },
    absWorkingDir: resolve(srcDir),
    logLevel: "silent",
    legalComments: "none",
    banner: { js: "// Trace UDF bundle (built by @trace/udf build.mjs)" },
  });
  const version = JSON.parse(readFileSync(join(SDK, "package.json"), "utf8")).version;
  writeFileSync(join(outDir, "bootstrap"), BOOTSTRAP);
  chmodSync(join(outDir, "bootstrap"), 0o755);
  writeFileSync(
    join(outDir, "trace-udf.json"),
    `${JSON.stringify({ runtime: "node", handler: "handler.handler", sdk: version })}\n`,
  );
  return readdirSync(outDir).sort();
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const check = args.includes("--typecheck");
  const [srcDir, outDir] = args.filter((a) => a !== "--typecheck");
  if (!srcDir || !outDir) {
    process.stderr.write("usage: node build.mjs SRC_DIR OUT_DIR [--typecheck]\n");
    process.exit(2);
  }
  try {
    const files = await buildBundle(srcDir, outDir, { check });
    process.stdout.write(`${JSON.stringify({ out: resolve(outDir), files })}\n`);
  } catch (exc) {
    const errors = exc && Array.isArray(exc.errors) ? exc.errors.map((e) => `${e.location?.file ?? ""}:${e.location?.line ?? ""}: ${e.text}`).join("\n") : "";
    process.stderr.write(`build.mjs: ${errors || (exc instanceof Error ? exc.message : String(exc))}\n`);
    process.exit(1);
  }
}
