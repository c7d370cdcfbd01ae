//! STUB API — being implemented; signatures are stable.
use crate::volume::Volume;
use std::sync::Arc;

/// The open volumes of one data directory, shared by the NBD server and the control socket.
pub struct Registry {}

/// A connection's hold on an export; while any lease exists the volume counts as busy.
pub struct ExportLease { volume: Arc<Volume> }

impl std::ops::Deref for ExportLease {
    type Target = Arc<Volume>;
    fn deref(&self) -> &Arc<Volume> { &self.volume }
}

impl Registry {
    /// Names of all exports, sorted.
    pub fn names(&self) -> Vec<String> { todo!() }
    /// Look up an export without leasing it (OPT_INFO, OPT_LIST_META_CONTEXT).
    pub fn get(&self, name: &str) -> Option<Arc<Volume>> { todo!() }
    /// Lease an export for a connection entering transmission (OPT_GO / EXPORT_NAME).
    pub fn lease(&self, name: &str) -> Option<ExportLease> { todo!() }
}
