//! The live state: policy and keys compiled together into one immutable [`Snapshot`].
//!
//! A request loads the current snapshot once and uses it throughout, so it never sees half a
//! reload. Swapping happens only after a whole new snapshot compiled without error.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::diagnostic::Problem;
use crate::keys::{self, KeyStore, UsageTable};
use crate::policy::{self, Policy};

/// Policy and keys that belong together, with a generation number bumped on every good load.
#[derive(Debug)]
pub struct Snapshot {
    /// Counts good loads since start (1 for the first).
    pub generation: u64,
    /// The compiled policy.
    pub policy: Arc<Policy>,
    /// The compiled keys, valid for this policy.
    pub keys: Arc<KeyStore>,
}

/// Which file a set of problems belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The policy file.
    Policy,
    /// The keys file.
    Keys,
}

/// Problems from one file.
pub type SourceProblems = (Source, Vec<Problem>);

impl Snapshot {
    /// Compiles policy and keys text into a snapshot and the keys' warnings.
    pub fn compile(
        policy_text: &str,
        keys_text: &str,
        generation: u64,
        usage: &Arc<UsageTable>,
    ) -> Result<(Snapshot, Vec<Problem>), SourceProblems> {
        let policy = policy::compile(policy_text).map_err(|p| (Source::Policy, p))?;
        let compiled =
            keys::compile(keys_text, &policy, None, usage).map_err(|p| (Source::Keys, p))?;
        Ok((
            Snapshot {
                generation,
                policy: Arc::new(policy),
                keys: Arc::new(compiled.store),
            },
            compiled.warnings,
        ))
    }
}

/// The shared, swappable current snapshot.
pub type LiveState = Arc<ArcSwap<Snapshot>>;
