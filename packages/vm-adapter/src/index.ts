/** @ferry/vm-adapter's public face: the libvirt VM adapter, its domain XML transforms and errors. */
export {
  type DiskInfo,
  type DomainXmlInfo,
  FERRY_XMLNS,
  type FerryExport,
  ferryDiskXml,
  forRecovery,
  isFerryDisk,
  parseDomainXml,
  type RecoveryTransform,
  withFerryDisks,
} from "./domain-xml.js";
export {
  InvalidDomainXml,
  NotAdopted,
  NotConfigured,
  ThawFailed,
  UnsupportedDisk,
  VmAdapterError,
  WrongDomainState,
} from "./errors.js";
export { Libvirt, type NativeDomain } from "./libvirt.js";
export {
  type AdoptedDisk,
  type AdoptResult,
  adoptedVolumeName,
  drillName,
  LibvirtVmAdapter,
  type LibvirtVmAdapterOptions,
  libvirtVmAdapter,
  type VmCaptureMetadata,
  type VmSummary,
  type VolumeStore,
} from "./libvirt-vm-adapter.js";
