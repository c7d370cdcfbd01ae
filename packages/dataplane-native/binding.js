// The package's public face: the generated napi-rs exports (index.js), with one fix-up. napi-rs
// can only set a fixed status as `error.code`, so the Rust layer sends errors as
// "ERR_CODE: message"; here the prefix moves into `error.code`, leaving a clean message.
import * as native from "./index.js";

const CODED = /^(ERR_[A-Z0-9_]+): /;

function recode(err) {
  if (err instanceof Error) {
    const m = CODED.exec(err.message);
    if (m) {
      err.message = err.message.slice(m[0].length);
      Object.defineProperty(err, "code", { value: m[1], enumerable: true, writable: true, configurable: true });
    }
  }
  return err;
}

function wrap(fn, self) {
  return (...args) => {
    let out;
    try {
      out = fn.apply(self, args);
    } catch (err) {
      throw recode(err);
    }
    return out instanceof Promise
      ? out.catch((err) => {
          throw recode(err);
        })
      : out;
  };
}

for (const name of ["stop"]) {
  const original = native.VolumeService.prototype[name];
  native.VolumeService.prototype[name] = function (...args) {
    return wrap(original, this)(...args);
  };
}

export const VolumeService = native.VolumeService;
export const parseSize = wrap(native.parseSize);
export const checkPeerNats = wrap(native.checkPeerNats);
export const createVolume = wrap(native.createVolume);
export const listVolumes = wrap(native.listVolumes);
export const deleteVolume = wrap(native.deleteVolume);
export const dirtyExtents = wrap(native.dirtyExtents);
export const cutVolumes = wrap(native.cutVolumes);
export const volumeStats = wrap(native.volumeStats);
export const importVolume = wrap(native.importVolume);
export const startVolumeService = wrap(native.startVolumeService);
export const replicate = wrap(native.replicate);
