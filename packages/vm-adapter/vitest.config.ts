import { PassFailSummary } from "@ferry/testkit";
import { defineConfig } from "vitest/config";

// The libvirt tests start a private libvirtd and boot TCG guests; two cores, so one file at a time.
export default defineConfig({
  test: {
    reporters: ["default", new PassFailSummary("vm-adapter")],
    include: ["src/**/*.test.ts", "test/**/*.test.ts"],
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 120_000,
  },
});
