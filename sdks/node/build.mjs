#!/usr/bin/env node
/**
 * Build a Node UDF bundle directory:
 *     node sdks/node/build.mjs SRC_DIR OUT_DIR [--name NAME] [--typecheck]
 * then package and upload it with `trace udf build OUT_DIR` / `trace udf deploy OUT_DIR`.
 *
 * SRC_DIR holds the handler module: the first of handler.ts, handler.mts, handler.js,
 * handler.mjs, index.ts, index.js (its `handler` export is the UDF), with any npm
 * dependencies in SRC_DIR/node_modules. TypeScript is compiled to JavaScript here (esbuild);
 * `--typecheck` also runs `tsc --noEmit` on it against this SDK's types. `@trace/udf` resolves
 * to this SDK's sources, so a bundle needs no install.
 *
 * OUT_DIR (emptied first) receives the bundle's files (docs/architecture/udf.md, Bundles):
 *   trace-udf.json     the manifest, format 1: SRC_DIR's trace-udf.json (its name, limits)
 *                      with language "node" and handler "handler.handler"; or --name NAME
 *   runtime.mjs        the entry the runner starts (`node runtime.mjs`): the Runtime API loop,
 *                      which loads handler.mjs (`_HANDLER`, default handler.handler)
 *   handler.mjs        the handler and its dependencies
 *   chunk-*.mjs        code both share (the SDK), so `instanceof` holds across them
 * The same sources give the same bytes. Prints {"out", "files", "manifest"} as JSON; exit 1
 * with the reason on stderr when the handler or the name is missing or the code does not
 * compile.
 */

import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";

const SDK = dirname(fileURLToPath(import.meta.url));
const ENTRIES = ["handler.ts", "handler.mts", "handler.js", "handler.mjs", "index.ts", "index.js"];

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

/** The bundle's manifest: SRC_DIR's trace-udf.json (if any) as a Node bundle, `name` over it. */
export function manifestFor(srcDir, name) {
  const path = join(srcDir, "trace-udf.json");
  const base = existsSync(path) ? JSON.parse(readFileSync(path, "utf8")) : {};
  if (base.language !== undefined && base.language !== "node") {
    throw new Error(`${path} says language ${JSON.stringify(base.language)}, not "node"`);
  }
  const manifest = { ...base, format: 1, name: name ?? base.name, language: "node", handler: "handler.handler" };
  delete manifest.entry;
  if (typeof manifest.name !== "string" || !/^[a-z][a-z0-9_-]{0,62}$/.test(manifest.name)) {
    throw new Error("the bundle needs a name ^[a-z][a-z0-9_-]{0,62}$ (--name, or name in trace-udf.json)");
  }
  return manifest;
}

/** Build the bundle of SRC_DIR into OUT_DIR; returns the files written and the manifest. */
export async function buildBundle(srcDir, outDir, { check = false, name } = {}) {
  const entry = findEntry(srcDir);
  const manifest = manifestFor(srcDir, name);
  if (check && /\.m?ts$/.test(entry)) typecheck(entry);
  rmSync(outDir, { recursive: true, force: true });
  mkdirSync(outDir, { recursive: true });
  const sdkSrc = join(SDK, "src");
  await esbuild.build({
    entryPoints: { handler: resolve(entry), runtime: join(sdkSrc, "bootstrap_main.ts") },
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
  writeFileSync(join(outDir, "trace-udf.json"), `${JSON.stringify(manifest, null, 2)}\n`);
  return { files: readdirSync(outDir).sort(), manifest };
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const check = args.includes("--typecheck");
  const nameAt = args.indexOf("--name");
  const name = nameAt >= 0 ? args[nameAt + 1] : undefined;
  const skip = new Set(nameAt >= 0 ? [nameAt, nameAt + 1] : []);
  const [srcDir, outDir] = args.filter((a, i) => a !== "--typecheck" && !skip.has(i));
  if (!srcDir || !outDir) {
    process.stderr.write("usage: node build.mjs SRC_DIR OUT_DIR [--name NAME] [--typecheck]\n");
    process.exit(2);
  }
  try {
    const { files, manifest } = await buildBundle(srcDir, outDir, { check, name });
    process.stdout.write(`${JSON.stringify({ out: resolve(outDir), files, manifest })}\n`);
  } catch (exc) {
    const errors = exc && Array.isArray(exc.errors) ? exc.errors.map((e) => `${e.location?.file ?? ""}:${e.location?.line ?? ""}: ${e.text}`).join("\n") : "";
    process.stderr.write(`build.mjs: ${errors || (exc instanceof Error ? exc.message : String(exc))}\n`);
    process.exit(1);
  }
}
