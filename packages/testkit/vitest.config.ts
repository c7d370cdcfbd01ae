import { defineConfig } from "vitest/config";
import { PassFailSummary } from "./src/pass-fail-summary.js";

export default defineConfig({
  test: {
    reporters: ["default", new PassFailSummary("testkit")],
    include: ["src/**/*.test.ts"],
  },
});
