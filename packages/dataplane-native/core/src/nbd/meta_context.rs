//! NBD metadata contexts: which ones an export offers, how client queries select them, and the
//! names they carry on the wire.
//!
//! Ferry offers, per export:
//! - `base:allocation` (holes and zeroes, from `Volume::allocation`);
//! - `qemu:dirty-bitmap:<name>` for every bitmap `Volume::bitmaps()` reports (`open`, `gen-N`),
//!   so backup tools that speak QEMU's namespace can read our changed-block tracking.
//!
//! Query syntax (what `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` accept):
//! - `base:allocation`, `qemu:dirty-bitmap:<name>` select that context if the export has it;
//! - `base:`, `qemu:` and `qemu:dirty-bitmap:` are wildcards when listing and select nothing when
//!   setting (the spec says an empty leaf SHOULD NOT select anything);
//! - an unknown namespace or leaf is ignored (the spec says MUST ignore), a query without a colon
//!   is invalid.
//!
//! This module only matches names; it never touches the wire or a volume's data.

use crate::nbd::proto::{META_BASE_ALLOCATION, META_DIRTY_BITMAP_PREFIX};
use crate::volume::{BitmapRef, Volume};

/// A context a connection can have selected for `NBD_CMD_BLOCK_STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:<name>`.
    DirtyBitmap(BitmapRef),
}

impl MetaContext {
    /// The context's wire name.
    pub fn name(&self) -> String {
        match self {
            MetaContext::Allocation => META_BASE_ALLOCATION.to_string(),
            MetaContext::DirtyBitmap(b) => format!("{META_DIRTY_BITMAP_PREFIX}{}", b.name()),
        }
    }

    /// Every context `volume` offers right now, `base:allocation` first.
    pub fn offered_by(volume: &Volume) -> Vec<MetaContext> {
        let mut all = vec![MetaContext::Allocation];
        all.extend(volume.bitmaps().into_iter().map(MetaContext::DirtyBitmap));
        all
    }
}

/// Whether a query is answered for `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`:
/// wildcards only expand when listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMode {
    List,
    Set,
}

/// A query the spec lets us refuse with `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidQuery(pub String);

/// Select from `offered` (context names, as `MetaContext::name` spells them) the ones `queries`
/// ask for, in offered order and without duplicates. Returns indexes into `offered`.
///
/// Works on names rather than `MetaContext`s so the matching rules are testable on their own.
pub fn select(
    offered: &[String],
    queries: &[String],
    mode: QueryMode,
) -> Result<Vec<usize>, InvalidQuery> {
    if queries.is_empty() {
        // Zero queries: LIST returns everything, SET selects nothing (both MUST per spec).
        return Ok(match mode {
            QueryMode::List => (0..offered.len()).collect(),
            QueryMode::Set => Vec::new(),
        });
    }
    let mut chosen = vec![false; offered.len()];
    for q in queries {
        let Some(colon) = q.find(':') else {
            return Err(InvalidQuery(format!(
                "meta context query '{q}' has no namespace: write e.g. 'base:allocation' or '{META_DIRTY_BITMAP_PREFIX}open'"
            )));
        };
        if colon == 0 {
            return Err(InvalidQuery(format!(
                "meta context query '{q}' has an empty namespace"
            )));
        }
        for (i, name) in offered.iter().enumerate() {
            if matches(name, q, mode) {
                chosen[i] = true;
            }
        }
    }
    Ok(chosen
        .iter()
        .enumerate()
        .filter(|(_, c)| **c)
        .map(|(i, _)| i)
        .collect())
}

/// Whether context `name` answers `query`. Only the namespaces we own expand wildcards, and a
/// wildcard is a query that stops right after a `:` of the context's name.
fn matches(name: &str, query: &str, mode: QueryMode) -> bool {
    if name == query {
        return true;
    }
    if mode == QueryMode::Set || !query.ends_with(':') {
        return false;
    }
    const WILDCARDS: [&str; 3] = ["base:", "qemu:", META_DIRTY_BITMAP_PREFIX];
    WILDCARDS.contains(&query) && name.starts_with(query)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered() -> Vec<String> {
        [
            "base:allocation",
            "qemu:dirty-bitmap:open",
            "qemu:dirty-bitmap:gen-3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn q(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn empty_query_lists_all_and_sets_none() {
        assert_eq!(
            select(&offered(), &[], QueryMode::List).unwrap(),
            vec![0, 1, 2]
        );
        assert!(select(&offered(), &[], QueryMode::Set).unwrap().is_empty());
    }

    #[test]
    fn exact_names_select_in_both_modes() {
        for mode in [QueryMode::List, QueryMode::Set] {
            let got = select(
                &offered(),
                &q(&["qemu:dirty-bitmap:gen-3", "base:allocation"]),
                mode,
            );
            assert_eq!(got.unwrap(), vec![0, 2], "{mode:?}");
        }
    }

    #[test]
    fn wildcards_expand_only_when_listing() {
        let bitmaps = q(&["qemu:dirty-bitmap:"]);
        assert_eq!(
            select(&offered(), &bitmaps, QueryMode::List).unwrap(),
            vec![1, 2]
        );
        assert!(select(&offered(), &bitmaps, QueryMode::Set)
            .unwrap()
            .is_empty());
        assert_eq!(
            select(&offered(), &q(&["qemu:"]), QueryMode::List).unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            select(&offered(), &q(&["base:"]), QueryMode::List).unwrap(),
            vec![0]
        );
        assert!(select(&offered(), &q(&["base:"]), QueryMode::Set)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn unknown_namespaces_and_leaves_are_ignored() {
        let got = select(
            &offered(),
            &q(&[
                "x-foo:bar",
                "qemu:dirty-bitmap:nope",
                "base:alloc",
                "qemu:dirty-bitmap:op",
            ]),
            QueryMode::List,
        );
        assert!(got.unwrap().is_empty());
        // A prefix of a name is not a wildcard unless it ends a namespace we own.
        assert!(select(&offered(), &q(&["qemu:dirty-"]), QueryMode::List)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn duplicates_are_selected_once() {
        let got = select(
            &offered(),
            &q(&["base:allocation", "base:allocation", "base:"]),
            QueryMode::List,
        );
        assert_eq!(got.unwrap(), vec![0]);
    }

    #[test]
    fn a_query_without_namespace_is_invalid() {
        let e = select(&offered(), &q(&["allocation"]), QueryMode::Set).unwrap_err();
        assert!(e.0.contains("'allocation'"), "{}", e.0);
        assert!(select(&offered(), &q(&[":x"]), QueryMode::List).is_err());
    }
}
