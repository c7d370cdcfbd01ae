import { describe, expect, it } from "vitest";
import { WaitTimedOut } from "./errors.js";
import { waitFor } from "./wait-for.js";

describe("waitFor", () => {
  it("returns the first value the probe yields", async () => {
    let calls = 0;
    await expect(waitFor("the third call", () => (++calls >= 3 ? calls : undefined), { intervalMs: 1 })).resolves.toBe(
      3,
    );
  });

  it("fails with what it waited for and the last error once the deadline passes", async () => {
    const failure = await waitFor(
      "a thing",
      () => {
        throw new Error("not yet");
      },
      { timeoutMs: 50, intervalMs: 10 },
    ).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(WaitTimedOut);
    expect(failure).toMatchObject({
      code: "ERR_TIMEOUT",
      message: expect.stringMatching(/waiting for a thing: not yet/),
    });
  });
});
