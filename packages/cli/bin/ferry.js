#!/usr/bin/env node
// The `ferry` executable. It is committed (unlike dist/) so that `npm ci` can link it before the
// first build; the command itself lives in dist/, built from src/ by `npm run build`.
let main;
try {
  ({ main } = await import("../dist/main.js"));
} catch (error) {
  if (error?.code !== "ERR_MODULE_NOT_FOUND" || !String(error.message).includes("dist/main.js")) throw error;
  process.stderr.write("ferry: @ferry/cli is not built: run `npm run build` in the repository root\n");
  process.exit(1);
}
process.exit(await main(process.argv.slice(2)));
