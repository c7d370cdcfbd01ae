#!/usr/bin/env node
/**
 * Serves a Ferry data directory the way `ferry volume serve` does (one `startVolumeService` call
 * in a Node process of its own, stopped cleanly on SIGTERM/SIGINT), plus `--untracked`, which
 * the CLI does not offer: the volume bench needs it to measure what changed-block tracking costs.
 * Benchmarks only; never a way to run Ferry for real (an untracked volume is wholly dirty).
 *
 * Usage: node ferry-serve.mjs --data DIR (--socket PATH | --listen HOST:PORT) [--untracked]
 */
import { parseArgs } from "node:util";
import { startVolumeService } from "../../packages/dataplane-native/binding.js";

const { values } = parseArgs({
  options: {
    data: { type: "string" },
    socket: { type: "string" },
    listen: { type: "string" },
    untracked: { type: "boolean", default: false },
  },
});
if (!values.data || (!values.socket && !values.listen)) {
  process.stderr.write("usage: ferry-serve.mjs --data DIR (--socket PATH | --listen HOST:PORT) [--untracked]\n");
  process.exit(2);
}

const service = await startVolumeService({
  dataDir: values.data,
  socket: values.socket,
  listen: values.listen,
  untracked: values.untracked,
});
process.stdout.write(
  `ferry-serve: serving ${service.volumeNames.join(", ")} on ${service.socketPath ?? service.tcpAddress}${values.untracked ? " (untracked)" : ""}\n`,
);

// The service runs on native threads; this timer is what keeps the process waiting.
const keepAlive = setInterval(() => {}, 2 ** 30);
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.once(signal, async () => {
    clearInterval(keepAlive);
    try {
      await service.stop();
      process.exit(0);
    } catch (err) {
      process.stderr.write(`ferry-serve: stopping failed: ${err.code ?? ""} ${err.message}\n`);
      process.exit(1);
    }
  });
}
