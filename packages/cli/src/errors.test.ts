import { describe, expect, it } from "vitest";
import { BindingUnavailable, describeError, ExitCode, Interrupted } from "./errors.js";

describe("describeError", () => {
  it("passes a data plane error's code and message through as one line, exit 1", () => {
    const native = Object.assign(new Error("unknown volume 'x' in /d: create it\nwith ferry volume create"), {
      code: "ERR_UNKNOWN_VOLUME",
    });
    expect(describeError(native)).toEqual({
      code: "ERR_UNKNOWN_VOLUME",
      message: "unknown volume 'x' in /d: create it with ferry volume create",
      exitCode: ExitCode.failed,
    });
  });

  it("uses the CLI error's own code and exit status", () => {
    expect(describeError(new BindingUnavailable("not built"))).toEqual({
      code: "ERR_BINDING_UNAVAILABLE",
      message: "not built",
      exitCode: 1,
    });
    expect(describeError(new Interrupted("stopped")).exitCode).toBe(130);
  });

  it("labels anything else as an internal error", () => {
    expect(describeError(new TypeError("x is not a function"))).toMatchObject({
      code: "ERR_INTERNAL",
      message: expect.stringMatching(/^internal error: x is not a function/),
    });
    expect(describeError("a string").code).toBe("ERR_INTERNAL");
  });
});
