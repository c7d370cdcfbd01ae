//! The napi-rs binding of `ferry-libvirt`: the one layer that holds `#[napi]`. It converts types
//! and errors and runs every libvirt call on tokio's blocking pool, never on the JavaScript
//! thread — nothing else. Errors reach JavaScript as `CODE: message`; `src/native.ts` moves the
//! prefix into `error.code` (napi-rs only carries a fixed status as the code).

use ferry_libvirt::{BlockCopyOptions as CoreBlockCopy, DomainSummary, Hypervisor};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::sync::Arc;
use std::time::Duration;

fn coded(code: &str, message: impl std::fmt::Display) -> napi::Error {
    napi::Error::new(Status::GenericFailure, format!("{code}: {message}"))
}

fn js_err(e: ferry_libvirt::Error) -> napi::Error {
    coded(e.code(), &e)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ferry_libvirt::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| coded("ERR_INTERNAL", e))?
        .map_err(js_err)
}

fn millis(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

#[napi(object)]
pub struct NativeDomain {
    pub name: String,
    pub uuid: String,
    /// running, shutoff, paused, shutdown, crashed, pmsuspended, blocked, nostate, unknown
    pub state: String,
    pub persistent: bool,
    /// The current domain XML (live while running).
    pub xml: String,
}

impl From<DomainSummary> for NativeDomain {
    fn from(s: DomainSummary) -> Self {
        NativeDomain {
            name: s.name,
            uuid: s.uuid,
            state: s.state.as_str().to_string(),
            persistent: s.persistent,
            xml: s.xml,
        }
    }
}

#[napi(object)]
pub struct BlockCopyOptions {
    /// The disk's target name, e.g. `vda`.
    pub disk: String,
    /// The `<disk>` XML of the destination, which must exist and be large enough.
    pub destination_xml: String,
    pub synchronous_writes: bool,
    pub timeout_ms: u32,
}

/// One libvirt connection.
#[napi]
pub struct Libvirt {
    inner: Arc<Hypervisor>,
}

/// Open a read-write libvirt connection (`qemu:///system`, `…?socket=PATH`, `test:///default`).
#[napi]
pub async fn connect(uri: String) -> Result<Libvirt> {
    let h = blocking(move || Hypervisor::connect(&uri)).await?;
    Ok(Libvirt { inner: Arc::new(h) })
}

#[napi]
impl Libvirt {
    #[napi(getter)]
    pub fn uri(&self) -> String {
        self.inner.uri().to_string()
    }

    #[napi]
    pub async fn list_domains(&self) -> Result<Vec<NativeDomain>> {
        let h = self.inner.clone();
        let list = blocking(move || h.list()).await?;
        Ok(list.into_iter().map(NativeDomain::from).collect())
    }

    #[napi]
    pub async fn describe(&self, name: String) -> Result<NativeDomain> {
        let h = self.inner.clone();
        Ok(blocking(move || h.describe(&name)).await?.into())
    }

    #[napi]
    pub async fn state(&self, name: String) -> Result<String> {
        let h = self.inner.clone();
        Ok(blocking(move || h.state(&name)).await?.as_str().to_string())
    }

    /// Resume the domain if libvirt paused it on a disk's I/O error; whether it did.
    #[napi]
    pub async fn resume_if_paused_on_io_error(&self, name: String) -> Result<bool> {
        let h = self.inner.clone();
        blocking(move || h.resume_if_paused_on_io_error(&name)).await
    }

    /// The domain XML; `inactive` answers the persistent definition.
    #[napi]
    pub async fn xml(&self, name: String, inactive: bool) -> Result<String> {
        let h = self.inner.clone();
        blocking(move || h.xml(&name, inactive)).await
    }

    /// A disk's virtual size in bytes.
    #[napi]
    pub async fn disk_capacity(&self, name: String, disk: String) -> Result<f64> {
        let h = self.inner.clone();
        Ok(blocking(move || h.disk_capacity(&name, &disk)).await? as f64)
    }

    /// Define (or redefine) a persistent domain; answers its name.
    #[napi]
    pub async fn define(&self, xml: String) -> Result<String> {
        let h = self.inner.clone();
        blocking(move || h.define(&xml)).await
    }

    #[napi]
    pub async fn undefine(&self, name: String) -> Result<()> {
        let h = self.inner.clone();
        blocking(move || h.undefine(&name)).await
    }

    #[napi]
    pub async fn start(&self, name: String) -> Result<()> {
        let h = self.inner.clone();
        blocking(move || h.start(&name)).await
    }

    /// Graceful shutdown, waiting up to `timeout_ms` for the domain to be off.
    #[napi]
    pub async fn shutdown(&self, name: String, timeout_ms: u32) -> Result<()> {
        let h = self.inner.clone();
        blocking(move || h.shutdown(&name, millis(timeout_ms))).await
    }

    #[napi]
    pub async fn destroy(&self, name: String) -> Result<()> {
        let h = self.inner.clone();
        blocking(move || h.destroy(&name)).await
    }

    /// Live copy of one disk onto the destination, then pivot (see `ferry_libvirt`).
    #[napi]
    pub async fn block_copy(&self, name: String, options: BlockCopyOptions) -> Result<()> {
        let h = self.inner.clone();
        let opts = CoreBlockCopy {
            disk: options.disk,
            destination_xml: options.destination_xml,
            synchronous_writes: options.synchronous_writes,
            timeout: millis(options.timeout_ms),
        };
        blocking(move || h.block_copy(&name, &opts)).await
    }

    /// A guest-agent command (JSON text); answers the agent's JSON reply.
    #[napi]
    pub async fn agent_command(
        &self,
        name: String,
        command: String,
        timeout_ms: u32,
    ) -> Result<String> {
        let h = self.inner.clone();
        blocking(move || h.agent_command(&name, &command, millis(timeout_ms))).await
    }
}
