/**
 * Loads the native data plane lazily, so that `ferry --help` and usage errors work even when the
 * addon is not built, and a missing build is reported as one actionable line.
 */
import { BindingUnavailable } from "./errors.js";

export type Dataplane = typeof import("@ferry/dataplane-native");

let loaded: Promise<Dataplane> | undefined;

export function dataplane(): Promise<Dataplane> {
  loaded ??= import("@ferry/dataplane-native").catch((cause: unknown) => {
    const why = cause instanceof Error ? cause.message.split("\n")[0] : String(cause);
    throw new BindingUnavailable(
      `the native data plane @ferry/dataplane-native cannot be loaded (${why}): build it with \`npm run build\` in the repository root`,
      { cause },
    );
  });
  return loaded;
}
