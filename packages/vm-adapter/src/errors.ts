/**
 * The VM adapter's errors, each with a stable `code`. Errors from libvirt calls come from the
 * native layer with their own codes (`ERR_VM_UNKNOWN`, `ERR_VM_STATE`, `ERR_VM_TIMEOUT`,
 * `ERR_VM_AGENT`, `ERR_VM_BLOCK_COPY`, `ERR_LIBVIRT_CONNECT`, `ERR_LIBVIRT`) and pass through as
 * they are. Every message names the domain and says what to do.
 */
export abstract class VmAdapterError extends Error {
  abstract readonly code: string;

  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A domain XML that is not one, or lacks what the adapter needs. */
export class InvalidDomainXml extends VmAdapterError {
  readonly code = "ERR_VM_XML";
}

/** A disk Ferry cannot take over (a network disk of another kind, a storage-pool volume, …). */
export class UnsupportedDisk extends VmAdapterError {
  readonly code = "ERR_VM_DISK_UNSUPPORTED";
}

/** The domain is not in the state the operation needs (e.g. offline adopt of a running VM). */
export class WrongDomainState extends VmAdapterError {
  readonly code = "ERR_VM_STATE";
}

/** A protected VM with a disk that is not a Ferry volume yet. */
export class NotAdopted extends VmAdapterError {
  readonly code = "ERR_VM_NOT_ADOPTED";
}

/** Something the adapter needs was not configured (e.g. adopt without a volume store). */
export class NotConfigured extends VmAdapterError {
  readonly code = "ERR_VM_NOT_CONFIGURED";
}

/** Thawing a guest the adapter froze failed: its filesystems may still be frozen. */
export class ThawFailed extends VmAdapterError {
  readonly code = "ERR_VM_THAW";
}
