/** A private libvirtd (@ferry/test-guest) whose directory belongs to a test's sandbox. */

import type { Sandbox } from "@ferry/local-clusters";
import { type LibvirtDaemon, startPrivateLibvirtd } from "@ferry/test-guest";

/** Start it in a fresh directory of `sandbox`; the test stops it, the sandbox removes the directory. */
export async function startLibvirtDaemon(sandbox: Sandbox): Promise<LibvirtDaemon> {
  return startPrivateLibvirtd(await sandbox.dir("ferry-libvirt-"));
}
