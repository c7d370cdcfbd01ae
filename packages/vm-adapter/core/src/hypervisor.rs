//! `Hypervisor`: one libvirt connection and the calls the VM adapter makes on it. Domains are
//! named by their libvirt name; each call looks the domain up, so a stale handle can never act on
//! a domain that was undefined and redefined meanwhile.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::sync::Once;
use std::thread::sleep;
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::domain::{Domain, DomainPausedReason, DomainState as VirtState, DomainStateReason};
use virt::enumutil::Enum;
use virt::sys;

/// A domain's lifecycle state, as libvirt names it (`virsh domstate` words without spaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    NoState,
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    Suspended,
    Unknown,
}

impl DomainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::NoState => "nostate",
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "shutdown",
            DomainState::ShutOff => "shutoff",
            DomainState::Crashed => "crashed",
            DomainState::Suspended => "pmsuspended",
            DomainState::Unknown => "unknown",
        }
    }

    fn from_virt(state: Enum<VirtState, sys::virDomainState>) -> DomainState {
        match state {
            Enum::Known(VirtState::NoState) => DomainState::NoState,
            Enum::Known(VirtState::Running) => DomainState::Running,
            Enum::Known(VirtState::Blocked) => DomainState::Blocked,
            Enum::Known(VirtState::Paused) => DomainState::Paused,
            Enum::Known(VirtState::Shutdown) => DomainState::ShuttingDown,
            Enum::Known(VirtState::Shutoff) => DomainState::ShutOff,
            Enum::Known(VirtState::Crashed) => DomainState::Crashed,
            Enum::Known(VirtState::PMSuspended) => DomainState::Suspended,
            Enum::Unknown(_) => DomainState::Unknown,
        }
    }
}

/// What listing answers per domain; the XML is the current one (live while running), from which
/// the adapter reads the disks.
#[derive(Debug, Clone)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub persistent: bool,
    pub xml: String,
}

/// A live block copy of one disk onto a destination described by a `<disk>` XML.
#[derive(Debug, Clone)]
pub struct BlockCopyOptions {
    /// The disk's target name (`vda`).
    pub disk: String,
    /// `<disk type='network'>…</disk>` (or a file disk) the copy goes to; it must exist already
    /// and be at least as large as the source (libvirt's REUSE_EXT: Ferry creates the volume).
    pub destination_xml: String,
    /// Guest writes go to both sides before they complete, so the copy converges under load.
    pub synchronous_writes: bool,
    /// How long the copy may take to reach the ready phase before it is cancelled.
    pub timeout: Duration,
}

pub struct Hypervisor {
    conn: Connect,
    uri: String,
}

/// How often waits look again. Short: a TCG guest's state changes within a few seconds.
const POLL: Duration = Duration::from_millis(100);

impl Hypervisor {
    /// Open a read-write connection, e.g. `qemu:///system` or
    /// `qemu:///system?socket=/path/libvirt-sock`.
    pub fn connect(uri: &str) -> Result<Hypervisor> {
        // libvirt prints every error on stderr by default; ours travel as values instead.
        static QUIET: Once = Once::new();
        QUIET.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(uri)).map_err(|e| Error::Connect {
            uri: uri.to_string(),
            reason: e.message().to_string(),
        })?;
        Ok(Hypervisor {
            conn,
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn lookup(&self, name: &str) -> Result<Domain> {
        self.conn
            .lookup_domain_by_name(name)
            .map_err(|e| Error::from_virt(e, name, "lookup"))
    }

    /// Every domain, running or defined, sorted by name.
    pub fn list(&self) -> Result<Vec<DomainSummary>> {
        let domains = self.conn.list_all_domains(0).map_err(|e| Error::Libvirt {
            what: "listing domains".into(),
            reason: e.message().to_string(),
        })?;
        let mut out = Vec::with_capacity(domains.len());
        for d in domains {
            let name = d.name().map_err(|e| Error::from_virt(e, "?", "name"))?;
            match summarize(&d, &name) {
                Ok(s) => out.push(s),
                // Undefined between the listing and this look: it is simply gone.
                Err(Error::UnknownDomain { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn describe(&self, name: &str) -> Result<DomainSummary> {
        summarize(&self.lookup(name)?, name)
    }

    pub fn state(&self, name: &str) -> Result<DomainState> {
        let d = self.lookup(name)?;
        let (state, _) = d.state().map_err(|e| Error::from_virt(e, name, "state"))?;
        Ok(DomainState::from_virt(state))
    }

    /// The domain XML: `inactive` answers the persistent definition (what `define` would take
    /// back), else the live one while running.
    pub fn xml(&self, name: &str, inactive: bool) -> Result<String> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.lookup(name)?
            .xml_desc(flags)
            .map_err(|e| Error::from_virt(e, name, "reading XML"))
    }

    /// A disk's virtual size in bytes (what a Ferry volume must hold to take it over).
    pub fn disk_capacity(&self, name: &str, disk: &str) -> Result<u64> {
        let info = self
            .lookup(name)?
            .block_info(disk, 0)
            .map_err(|e| Error::from_virt(e, name, &format!("size of disk {disk}")))?;
        Ok(info.capacity)
    }

    /// Define (or redefine, same name and UUID) a persistent domain; answers its name.
    pub fn define(&self, xml: &str) -> Result<String> {
        let d = self
            .conn
            .define_domain_xml(xml)
            .map_err(|e| Error::Libvirt {
                what: "defining a domain".into(),
                reason: e.message().to_string(),
            })?;
        d.name().map_err(|e| Error::from_virt(e, "?", "name"))
    }

    /// Remove the definition with its managed save, snapshot and checkpoint metadata. NVRAM files
    /// are kept: a copy defined from another domain's XML may name the original's NVRAM file.
    /// A running domain keeps running (transient) until stopped.
    pub fn undefine(&self, name: &str) -> Result<()> {
        let d = self.lookup(name)?;
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM;
        match d.undefine_flags(flags) {
            Ok(()) => Ok(()),
            // A driver without checkpoints or NVRAM (libvirt's test driver) refuses those flags;
            // for it they have nothing to remove, so the plain call means the same.
            Err(e) if e.code() == Enum::Known(virt::error::ErrorNumber::InvalidArg) => d
                .undefine()
                .map_err(|e| Error::from_virt(e, name, "undefine")),
            Err(e) => Err(Error::from_virt(e, name, "undefine")),
        }
    }

    pub fn start(&self, name: &str) -> Result<()> {
        self.lookup(name)?
            .create()
            .map_err(|e| Error::from_virt(e, name, "start"))
    }

    /// Resume a domain that libvirt paused because a disk's I/O failed (a disk whose
    /// `error_policy` is `stop`, e.g. its NBD server restarting). True when it was paused so and
    /// runs again; false, doing nothing, in any other state (a domain a user paused stays paused).
    pub fn resume_if_paused_on_io_error(&self, name: &str) -> Result<bool> {
        let d = self.lookup(name)?;
        let (_, reason) = d.state().map_err(|e| Error::from_virt(e, name, "state"))?;
        if !matches!(
            reason,
            Enum::Known(DomainStateReason::Paused(Enum::Known(
                DomainPausedReason::IOError
            )))
        ) {
            return Ok(false);
        }
        d.resume()
            .map_err(|e| Error::from_virt(e, name, "resume"))?;
        Ok(true)
    }

    /// Hard stop. Succeeds on a domain already shut off.
    pub fn destroy(&self, name: &str) -> Result<()> {
        let d = self.lookup(name)?;
        if !d
            .is_active()
            .map_err(|e| Error::from_virt(e, name, "state"))?
        {
            return Ok(());
        }
        d.destroy()
            .map_err(|e| Error::from_virt(e, name, "destroy"))
    }

    /// Ask the guest to shut down (ACPI) and wait until it is off; on timeout the domain keeps
    /// running and the error says so (the caller decides whether to destroy).
    pub fn shutdown(&self, name: &str, timeout: Duration) -> Result<()> {
        let d = self.lookup(name)?;
        if !d
            .is_active()
            .map_err(|e| Error::from_virt(e, name, "state"))?
        {
            return Ok(());
        }
        d.shutdown()
            .map_err(|e| Error::from_virt(e, name, "shutdown"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if !d
                .is_active()
                .map_err(|e| Error::from_virt(e, name, "state"))?
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    domain: name.to_string(),
                    what: format!(
                        "did not shut down within {:.1}s of the request (the guest may ignore \
                         ACPI power buttons); it is still running",
                        timeout.as_secs_f64()
                    ),
                });
            }
            sleep(POLL);
        }
    }

    /// Copy a running domain's disk onto `destination_xml` while the guest runs, then pivot: the
    /// domain uses the destination from then on, with no downtime. libvirt's job is transient (no
    /// persistent definition needed) and, with `synchronous_writes`, mirrors guest writes
    /// synchronously so the copy converges even while the guest writes all the time. The
    /// persistent definition is not changed: the caller redefines it to match.
    pub fn block_copy(&self, name: &str, opts: &BlockCopyOptions) -> Result<()> {
        let d = self.lookup(name)?;
        let fail = |reason: String| Error::BlockCopy {
            domain: name.to_string(),
            disk: opts.disk.clone(),
            reason,
        };
        let disk =
            CString::new(opts.disk.as_str()).map_err(|_| fail("disk name has a NUL".into()))?;
        let xml = CString::new(opts.destination_xml.as_str())
            .map_err(|_| fail("destination XML has a NUL".into()))?;
        let mut flags =
            sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
        if opts.synchronous_writes {
            flags |= sys::VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES;
        }
        // SAFETY: `d` is a live domain handle, the strings outlive the call, no typed params.
        let rc = unsafe {
            sys::virDomainBlockCopy(
                d.as_ptr(),
                disk.as_ptr(),
                xml.as_ptr(),
                std::ptr::null_mut(),
                0,
                flags,
            )
        };
        if rc < 0 {
            return Err(last_error(name, "block copy", fail));
        }

        let deadline = Instant::now() + opts.timeout;
        loop {
            let mut info = sys::virDomainBlockJobInfo {
                type_: 0,
                bandwidth: 0,
                cur: 0,
                end: 0,
            };
            // SAFETY: as above; `info` is a valid out-pointer.
            let rc =
                unsafe { sys::virDomainGetBlockJobInfo(d.as_ptr(), disk.as_ptr(), &mut info, 0) };
            if rc < 0 {
                return Err(last_error(name, "block job info", fail));
            }
            if rc == 0 {
                return Err(fail(
                    "the copy job ended before it was ready (see libvirt's log)".into(),
                ));
            }
            if info.end > 0 && info.cur == info.end {
                // Ready: both sides hold the same bytes and writes go to both. Pivot may still
                // refuse for a moment while QEMU reports readiness; retry until the deadline.
                // SAFETY: as above.
                let rc = unsafe {
                    sys::virDomainBlockJobAbort(
                        d.as_ptr(),
                        disk.as_ptr(),
                        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT,
                    )
                };
                if rc == 0 {
                    return Ok(());
                }
                let err = virt::error::Error::last_error();
                let not_ready = matches!(
                    err.code(),
                    Enum::Known(virt::error::ErrorNumber::BlockCopyActive)
                        | Enum::Known(virt::error::ErrorNumber::OperationInvalid)
                );
                if !not_ready || Instant::now() >= deadline {
                    self.cancel_copy(&d, &disk);
                    return Err(fail(format!("pivot refused: {}", err.message())));
                }
            }
            if Instant::now() >= deadline {
                self.cancel_copy(&d, &disk);
                return Err(Error::Timeout {
                    domain: name.to_string(),
                    what: format!(
                        "copy of disk {} not ready within {:.0}s ({} of {} bytes); cancelled, \
                         the domain keeps its old disk",
                        opts.disk,
                        opts.timeout.as_secs_f64(),
                        info.cur,
                        info.end
                    ),
                });
            }
            sleep(POLL);
        }
    }

    fn cancel_copy(&self, d: &Domain, disk: &CString) {
        // SAFETY: as in block_copy. Best effort: the job may already be gone.
        unsafe {
            sys::virDomainBlockJobAbort(d.as_ptr(), disk.as_ptr(), 0);
        }
    }

    /// Send a guest-agent command (JSON text, e.g. `{"execute":"guest-fsfreeze-freeze"}`) and
    /// answer its JSON reply; `timeout` bounds the wait for the agent.
    pub fn agent_command(&self, name: &str, command: &str, timeout: Duration) -> Result<String> {
        let d = self.lookup(name)?;
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        d.qemu_agent_command(command, secs, 0).map_err(|e| {
            let reason = e.message().to_string();
            match e.code() {
                Enum::Known(virt::error::ErrorNumber::NoDomain) => Error::UnknownDomain {
                    domain: name.to_string(),
                },
                // Not running, no agent channel, agent not connected, timeout or failure: all
                // mean "no application consistency from this guest now".
                _ => Error::Agent {
                    domain: name.to_string(),
                    reason,
                },
            }
        })
    }
}

fn summarize(d: &Domain, name: &str) -> Result<DomainSummary> {
    let uuid = d
        .uuid_string()
        .map_err(|e| Error::from_virt(e, name, "uuid"))?;
    let (state, _) = d.state().map_err(|e| Error::from_virt(e, name, "state"))?;
    let persistent = d
        .is_persistent()
        .map_err(|e| Error::from_virt(e, name, "state"))?;
    let xml = d
        .xml_desc(0)
        .map_err(|e| Error::from_virt(e, name, "reading XML"))?;
    Ok(DomainSummary {
        name: name.to_string(),
        uuid,
        state: DomainState::from_virt(state),
        persistent,
        xml,
    })
}

/// The error libvirt recorded for the failed raw call, as a domain error or via `other`.
fn last_error(name: &str, what: &str, other: impl Fn(String) -> Error) -> Error {
    let e = virt::error::Error::last_error();
    match e.code() {
        Enum::Known(virt::error::ErrorNumber::NoDomain) => Error::UnknownDomain {
            domain: name.to_string(),
        },
        _ => other(format!("{what}: {}", e.message())),
    }
}

#[cfg(test)]
mod tests {
    //! Against libvirt's own `test:///default` driver (in-process, part of libvirt): real
    //! libvirt code paths without a daemon. It holds one running domain named "test".
    use super::*;

    fn test_driver() -> Hypervisor {
        Hypervisor::connect("test:///default").unwrap()
    }

    #[test]
    fn lists_and_describes_the_test_domain() {
        let h = test_driver();
        let all = h.list().unwrap();
        let t = all
            .iter()
            .find(|d| d.name == "test")
            .expect("the test driver's domain");
        assert_eq!(t.state, DomainState::Running);
        assert_eq!(t.uuid.len(), 36);
        assert!(t.xml.contains("<name>test</name>"), "{}", t.xml);
        assert_eq!(h.describe("test").unwrap().uuid, t.uuid);
    }

    #[test]
    fn unknown_domain_is_named_in_the_error() {
        let h = test_driver();
        let e = h.state("no-such-vm").unwrap_err();
        assert_eq!(e.code(), "ERR_VM_UNKNOWN");
        assert!(e.to_string().contains("'no-such-vm'"), "{e}");
        assert_eq!(
            h.xml("no-such-vm", true).unwrap_err().code(),
            "ERR_VM_UNKNOWN"
        );
    }

    #[test]
    fn define_start_destroy_undefine_round_trip() {
        let h = test_driver();
        let xml = "<domain type='test'><name>ferry-rt</name><memory>8192</memory>\
                   <os><type>hvm</type></os></domain>";
        assert_eq!(h.define(xml).unwrap(), "ferry-rt");
        assert_eq!(h.state("ferry-rt").unwrap(), DomainState::ShutOff);
        h.start("ferry-rt").unwrap();
        assert_eq!(h.state("ferry-rt").unwrap(), DomainState::Running);
        h.destroy("ferry-rt").unwrap();
        h.destroy("ferry-rt").unwrap();
        assert_eq!(h.state("ferry-rt").unwrap(), DomainState::ShutOff);
        h.undefine("ferry-rt").unwrap();
        assert_eq!(h.state("ferry-rt").unwrap_err().code(), "ERR_VM_UNKNOWN");
    }

    #[test]
    fn bad_uri_is_a_connect_error() {
        let Err(e) = Hypervisor::connect("qemu:///system?socket=/nonexistent/ferry-sock") else {
            panic!("connected to a socket that does not exist");
        };
        assert_eq!(e.code(), "ERR_LIBVIRT_CONNECT");
        assert!(e.to_string().contains("/nonexistent/ferry-sock"), "{e}");
    }
}
