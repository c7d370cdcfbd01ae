import { PassFailSummary } from "@ferry/testkit";
import { defineConfig } from "vitest/config";

// Interop tests drive real NBD tools against `ferry volume serve`; they are I/O heavy, so one file
// at a time on a two-core machine.
export default defineConfig({
  test: {
    reporters: ["default", new PassFailSummary("interop")],
    include: ["interop/**/*.test.ts"],
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 60_000,
  },
});
