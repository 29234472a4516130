/** The process entry of a bundle's `runtime.mjs` (see `bootstrap.ts`). */
import { main } from "./bootstrap.js";

await main();
