//! The libvirt calls Ferry's VM adapter makes, over the libvirt project's `virt` crate: connect,
//! list and describe domains, define/undefine, lifecycle, live block copy onto an NBD export with
//! pivot, and guest-agent commands. It owns no policy (which disks, which XML — that is the
//! TypeScript adapter's) and must never parse `virsh` output or know of napi. Every call blocks;
//! the binding runs them off the JavaScript thread.

mod error;
mod hypervisor;

pub use error::{Error, Result};
pub use hypervisor::{BlockCopyOptions, DomainState, DomainSummary, Hypervisor};
