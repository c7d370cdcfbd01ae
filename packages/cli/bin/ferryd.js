#!/usr/bin/env node
// `ferryd`: the same as `ferry daemon …`.
process.argv.splice(2, 0, "daemon");
await import("./ferry.js");
