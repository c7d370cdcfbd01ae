import { PassFailSummary } from "@ferry/testkit";
import { defineConfig } from "vitest/config";

// The CLI tests run the built bin and the real volume service; two cores, so one file at a time.
export default defineConfig({
  test: {
    reporters: ["default", new PassFailSummary("cli")],
    include: ["src/**/*.test.ts", "test/**/*.test.ts"],
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
