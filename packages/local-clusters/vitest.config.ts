import { defineConfig } from "vitest/config";
// The reporter is testkit's; imported by path, not as a package, because testkit depends on this
// package and a dependency back would make the workspace graph a cycle.
import { PassFailSummary } from "../testkit/src/pass-fail-summary.js";

export default defineConfig({
  test: {
    reporters: ["default", new PassFailSummary("local-clusters")],
    include: ["src/**/*.test.ts"],
  },
});
