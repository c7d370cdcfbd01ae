//! The crate's one error type. Every variant maps to a stable `code()` string that the binding
//! hands to JavaScript as `error.code`; every message names the input and, where there is one,
//! the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown volume '{name}' in {dir}: create it with `ferry volume create {name} --size SIZE` or check --data")]
    UnknownVolume { name: String, dir: PathBuf },

    #[error("volume '{name}' already exists in {dir}: pick another name or delete it first")]
    VolumeExists { name: String, dir: PathBuf },

    #[error("invalid volume name '{0}': use 1-64 characters from [A-Za-z0-9._-], not starting with '.' or '-'")]
    BadName(String),

    #[error("invalid size '{input}': {why}")]
    BadSize { input: String, why: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("data directory {dir} is not usable: {why}")]
    DataDir { dir: PathBuf, why: String },

    #[error("volume '{name}' is busy: {why}")]
    VolumeBusy { name: String, why: String },

    #[error("cannot listen on {addr}: {why}")]
    Listen { addr: String, why: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("metadata of volume '{name}' is corrupt ({path}): {why}")]
    CorruptMetadata {
        name: String,
        path: PathBuf,
        why: String,
    },

    #[error("NBD protocol error talking to {peer}: {why}")]
    Protocol { peer: String, why: String },

    #[error("NBD server {peer} refused {what}: {why}")]
    Refused {
        peer: String,
        what: String,
        why: String,
    },

    /// A command failed on the server: `errno` is the wire error number (`nbd::proto::EIO`, ...)
    /// and `message` the server's text from a structured error chunk, if it sent one.
    #[error(
        "NBD server {peer} failed {command} at offset {offset}, length {length}: {} (errno {errno}){}",
        crate::nbd::proto::errno_name(*.errno),
        if .message.is_empty() { String::new() } else { format!(": {}", .message) }
    )]
    ServerError {
        peer: String,
        command: &'static str,
        offset: u64,
        length: u64,
        errno: u32,
        message: String,
    },

    #[error("import of '{name}' from {source_desc} failed: {why}")]
    Import {
        name: String,
        source_desc: String,
        why: String,
    },

    #[error("the volume service for {dir} is not reachable: {why}")]
    Service { dir: PathBuf, why: String },

    #[error("data directory {dir} is in use by another volume service{holder}: {hint}")]
    DataDirBusy {
        dir: PathBuf,
        holder: String,
        hint: String,
    },

    #[error("residency: volume(s) {volume} may not be replicated to site {site}: its region {region} is not among the allowed regions [{allowed}]; replicate to a site in an allowed region, or change the allowed regions (--allow-regions) if your policy permits")]
    Residency {
        volume: String,
        site: String,
        region: String,
        allowed: String,
    },

    #[error("NATS at {url}: {why}")]
    Nats { url: String, why: String },

    #[error("volume '{name}' is read-only")]
    ReadOnly { name: String },

    /// Writes refused while a planned migration or failback moves the volume to another site.
    #[error("volume '{name}' is fenced for a planned migration or failback: writes are refused so none can be lost in the move; reads still work. Lift the fence with {{\"op\":\"fence\",\"volumes\":[\"{name}\"],\"fenced\":false}} once the move is finished or abandoned")]
    Fenced { name: String },

    #[error("request on volume '{name}' is out of range: offset {offset} + length {length} > size {size}")]
    OutOfRange {
        name: String,
        offset: u64,
        length: u64,
        size: u64,
    },

    #[error("not supported: {0}")]
    NotSupported(String),

    /// A replication message that fails decoding or verification: bytes from the peer site that
    /// must be dropped (and resent), never applied.
    #[error("replication frame refused: {why}")]
    Frame { why: String },

    /// An error reported by the running volume service over its control socket.
    #[error("{message}")]
    Remote { code: String, message: String },
}

impl Error {
    /// Stable code for programs (the JavaScript `error.code`).
    pub fn code(&self) -> &str {
        match self {
            Error::UnknownVolume { .. } => "ERR_UNKNOWN_VOLUME",
            Error::VolumeExists { .. } => "ERR_VOLUME_EXISTS",
            Error::BadName(_) => "ERR_BAD_NAME",
            Error::BadSize { .. } => "ERR_BAD_SIZE",
            Error::InvalidArgument(_) => "ERR_INVALID_ARGUMENT",
            Error::DataDir { .. } => "ERR_DATA_DIR",
            Error::VolumeBusy { .. } => "ERR_VOLUME_BUSY",
            Error::Listen { .. } => "ERR_LISTEN",
            Error::Io { .. } => "ERR_IO",
            Error::CorruptMetadata { .. } => "ERR_CORRUPT_METADATA",
            Error::Protocol { .. } => "ERR_NBD_PROTOCOL",
            Error::Refused { .. } => "ERR_NBD_REFUSED",
            Error::ServerError { .. } => "ERR_NBD_SERVER",
            Error::Import { .. } => "ERR_IMPORT",
            Error::Service { .. } => "ERR_SERVICE",
            Error::DataDirBusy { .. } => "ERR_DATA_DIR_BUSY",
            Error::Residency { .. } => "ERR_RESIDENCY",
            Error::Nats { .. } => "ERR_NATS",
            Error::ReadOnly { .. } => "ERR_READ_ONLY",
            Error::Fenced { .. } => "ERR_FENCED",
            Error::OutOfRange { .. } => "ERR_OUT_OF_RANGE",
            Error::NotSupported(_) => "ERR_NOT_SUPPORTED",
            Error::Frame { .. } => "ERR_FRAME",
            Error::Remote { code, .. } => code,
        }
    }

    /// The NBD error number a failed request reports on the wire.
    pub fn nbd_errno(&self) -> u32 {
        use crate::nbd::proto;
        match self {
            Error::ReadOnly { .. } | Error::Fenced { .. } => proto::EPERM,
            Error::OutOfRange { .. } | Error::InvalidArgument(_) => proto::EINVAL,
            Error::NotSupported(_) => proto::ENOTSUP,
            Error::ServerError { errno, .. } => *errno,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => proto::ENOSPC,
                Some(libc::EINVAL) => proto::EINVAL,
                Some(libc::ENOMEM) => proto::ENOMEM,
                Some(libc::EPERM) | Some(libc::EROFS) => proto::EPERM,
                _ => proto::EIO,
            },
            _ => proto::EIO,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a context line to an `io::Result`.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
