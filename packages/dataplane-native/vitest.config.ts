import { PassFailSummary } from "@ferry/testkit";
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    reporters: ["default", new PassFailSummary("binding")],
    include: ["__test__/**/*.test.ts"],
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
