/** Public face of @ferry/test-guest. */
export { type LibvirtDaemon, libvirtInstalled, startPrivateLibvirtd } from "./private-libvirtd.js";
export {
  buildTestGuest,
  expectedGuestSha256,
  fileDiskXml,
  type GuestReport,
  parseGuestConsole,
  readGuestConsole,
  type TestGuestKernel,
  type TestGuestOptions,
  testGuestXml,
  waitForGuest,
} from "./test-guest.js";
