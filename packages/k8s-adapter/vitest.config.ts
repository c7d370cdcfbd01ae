import { PassFailSummary } from "@ferry/testkit";
import { defineConfig } from "vitest/config";

// The tests start a real etcd and two kube-apiservers; two cores, so one file at a time.
export default defineConfig({
  test: {
    reporters: ["default", new PassFailSummary("k8s-adapter")],
    include: ["src/**/*.test.ts"],
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 120_000,
  },
});
