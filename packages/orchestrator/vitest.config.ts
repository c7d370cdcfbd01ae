import { PassFailSummary } from "@ferry/testkit";
import { defineConfig } from "vitest/config";

// The orchestrator tests start real nats-servers; two cores, so one file at a time.
export default defineConfig({
  test: {
    reporters: ["default", new PassFailSummary("orchestrator")],
    include: ["src/**/*.test.ts"],
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
