/**
 * A vitest reporter that ends a run with one plain line, `<suite>: N passed, N failed[, N skipped]`,
 * the closing line CI reads to count tests in any language.
 */
import type { Reporter, TestModule } from "vitest/node";

export class PassFailSummary implements Reporter {
  constructor(private readonly suite: string) {}

  onTestRunEnd(testModules: ReadonlyArray<TestModule>): void {
    let passed = 0;
    let failed = 0;
    let skipped = 0;
    for (const module of testModules) {
      for (const test of module.children.allTests()) {
        const state = test.result().state;
        if (state === "passed") passed++;
        else if (state === "failed") failed++;
        else skipped++;
      }
      // A file that failed to load or whose hooks failed has no failed test but must count.
      if (module.state() === "failed" && ![...module.children.allTests("failed")].length) failed++;
    }
    const tail = skipped > 0 ? `, ${skipped} skipped` : "";
    process.stdout.write(`\n${this.suite}: ${passed} passed, ${failed} failed${tail}\n`);
  }
}
