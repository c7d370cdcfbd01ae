//! Errors with stable codes (`error.code` in JavaScript). A message names the domain and says
//! what to do; libvirt's own message is kept after it, since it is often the precise reason.

use std::fmt;
use virt::error::ErrorNumber;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The libvirt daemon could not be reached at the URI.
    Connect { uri: String, reason: String },
    /// No domain of that name.
    UnknownDomain { domain: String },
    /// The domain is not in a state the call needs (e.g. block copy of a shut-off domain).
    InvalidState { domain: String, reason: String },
    /// A wait (shutdown, block job) ran out of time.
    Timeout { domain: String, what: String },
    /// The guest agent is absent or did not answer.
    Agent { domain: String, reason: String },
    /// A live block copy failed or could not be pivoted.
    BlockCopy {
        domain: String,
        disk: String,
        reason: String,
    },
    /// Anything else libvirt refused; `what` is the call.
    Libvirt { what: String, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The stable code JavaScript sees as `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Connect { .. } => "ERR_LIBVIRT_CONNECT",
            Error::UnknownDomain { .. } => "ERR_VM_UNKNOWN",
            Error::InvalidState { .. } => "ERR_VM_STATE",
            Error::Timeout { .. } => "ERR_VM_TIMEOUT",
            Error::Agent { .. } => "ERR_VM_AGENT",
            Error::BlockCopy { .. } => "ERR_VM_BLOCK_COPY",
            Error::Libvirt { .. } => "ERR_LIBVIRT",
        }
    }

    /// Map a libvirt error raised by a call about `domain`.
    pub(crate) fn from_virt(e: virt::error::Error, domain: &str, what: &str) -> Error {
        let reason = e.message().to_string();
        match e.code() {
            virt::enumutil::Enum::Known(ErrorNumber::NoDomain) => Error::UnknownDomain {
                domain: domain.to_string(),
            },
            virt::enumutil::Enum::Known(ErrorNumber::OperationInvalid) => Error::InvalidState {
                domain: domain.to_string(),
                reason,
            },
            virt::enumutil::Enum::Known(
                ErrorNumber::AgentUnresponsive | ErrorNumber::AgentCommandTimeout,
            ) => Error::Agent {
                domain: domain.to_string(),
                reason,
            },
            _ => Error::Libvirt {
                what: format!("{what} of domain '{domain}'"),
                reason,
            },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { uri, reason } => write!(
                f,
                "cannot connect to libvirt at {uri}: {reason} (is libvirtd running, and is the \
                 URI's socket reachable?)"
            ),
            Error::UnknownDomain { domain } => write!(
                f,
                "no domain named '{domain}' in libvirt (see `ferry vm list` for the domains there)"
            ),
            Error::InvalidState { domain, reason } => {
                write!(f, "domain '{domain}' is not in a state for this: {reason}")
            }
            Error::Timeout { domain, what } => write!(f, "domain '{domain}': {what}"),
            Error::Agent { domain, reason } => write!(
                f,
                "the guest agent of domain '{domain}' did not answer: {reason} (is \
                 qemu-guest-agent running in the guest, with an org.qemu.guest_agent.0 channel?)"
            ),
            Error::BlockCopy {
                domain,
                disk,
                reason,
            } => write!(
                f,
                "live copy of disk {disk} of domain '{domain}' failed: {reason} (the domain keeps \
                 its old disk)"
            ),
            Error::Libvirt { what, reason } => write!(f, "libvirt refused {what}: {reason}"),
        }
    }
}

impl std::error::Error for Error {}
