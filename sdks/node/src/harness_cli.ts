#!/usr/bin/env node
/**
 * `trace-udf-local HANDLER_FILE [INPUT_JSON] [--answers ANSWERS_JSON] [--export NAME]`: run a
 * built handler module (`.mjs`/`.js`) once against an input (an invoke event's fields, at
 * least `payload`; `-` reads stdin) with the in-memory task surface, and print what it did as
 * JSON (`outcome`, `rows`, `events`, `queries`). `ANSWERS_JSON` maps SQL text to
 * the rows `ctx.query` answers. Exit status 0 when the handler succeeded, 1 otherwise.
 */

import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

import { runLocal } from "./harness.js";
import type { Handler } from "./runtime.js";
import type { InvokeEvent, JsonObject } from "./types.js";

function readJson(path: string): unknown {
  return JSON.parse(readFileSync(path === "-" ? 0 : path, "utf8"));
}

async function cli(argv: string[]): Promise<number> {
  const args = [...argv];
  let answers: Record<string, JsonObject[]> | undefined;
  let exportName = "handler";
  const grants: string[] = [];
  const positional: string[] = [];
  while (args.length > 0) {
    const arg = args.shift() as string;
    if (arg === "--answers") answers = readJson(args.shift() ?? "") as Record<string, JsonObject[]>;
    else if (arg === "--export") exportName = args.shift() ?? "handler";
    else if (arg === "--grant") grants.push(args.shift() ?? "");
    else positional.push(arg);
  }
  const [file, inputPath] = positional;
  if (!file) {
    process.stderr.write("usage: trace-udf-local HANDLER_FILE [INPUT_JSON|-] [--answers FILE] [--grant DATASET]...\n");
    return 2;
  }
  const mod = (await import(pathToFileURL(resolve(file)).href)) as Record<string, unknown>;
  const handler = mod[exportName];
  if (typeof handler !== "function") {
    process.stderr.write(`${file} exports no function ${exportName}\n`);
    return 2;
  }
  const input = (inputPath ? readJson(inputPath) : {}) as Partial<InvokeEvent>;
  const run = await runLocal(handler as Handler, input, { query: answers, grants });
  process.stdout.write(`${JSON.stringify(run, null, 2)}\n`);
  return run.outcome.ok ? 0 : 1;
}

cli(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (exc: unknown) => {
    process.stderr.write(`trace-udf-local: ${exc instanceof Error ? exc.stack : String(exc)}\n`);
    process.exit(2);
  },
);
