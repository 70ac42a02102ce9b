//! Which tenant (a pod's namespace) may use which model and blob.
//!
//! Models and blobs are stored once per node by content, whoever brings them.
//! A namespace gains a model by registering it (naming a node path it may
//! read, a hub repository, or blobs it uploaded itself) and a blob by
//! uploading all of its bytes: possession of the content is the proof, so two
//! tenants with the same weights share one copy and one compile, and a tenant
//! that only knows a digest gets nothing. Cache entries follow their model.
//!
//! The grants live in `<cache-dir>/access.json`, rewritten atomically on each
//! change, so they survive restarts. A missing or unreadable file starts
//! empty: tenants then re-register (the in-pod client does so on every
//! `from_pretrained`), and nothing is shown to anyone meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// The owner that makes a model visible to every namespace: what the cluster
/// operator registers with the admin token.
pub const SHARED: &str = "*";

const FILE: &str = "access.json";
const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Model,
    Blob,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Grants {
    version: u32,
    /// model digest (`sha256:...`) → namespaces.
    models: BTreeMap<String, BTreeSet<String>>,
    /// blob SHA-256 → namespaces.
    blobs: BTreeMap<String, BTreeSet<String>>,
}

impl Grants {
    fn of(&mut self, kind: Kind) -> &mut BTreeMap<String, BTreeSet<String>> {
        match kind {
            Kind::Model => &mut self.models,
            Kind::Blob => &mut self.blobs,
        }
    }
}

pub struct AccessIndex {
    path: PathBuf,
    grants: Mutex<Grants>,
}

impl AccessIndex {
    /// Opens `<cache_dir>/access.json`.
    pub fn open(cache_dir: &Path) -> Self {
        let path = cache_dir.join(FILE);
        let grants = match std::fs::read(&path) {
            Ok(raw) => match serde_json::from_slice::<Grants>(&raw) {
                Ok(g) if g.version == VERSION => g,
                Ok(g) => {
                    tracing::warn!(path = %path.display(), version = g.version, "access grants of another version; starting empty (tenants re-register)");
                    Grants::default()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "access grants unreadable; starting empty (tenants re-register)");
                    Grants::default()
                }
            },
            Err(_) => Grants::default(),
        };
        AccessIndex {
            path,
            grants: Mutex::new(grants),
        }
    }

    /// The file the grants are kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Grants> {
        // Every change is one insert or remove: a poisoned map is whole.
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `namespace` the use of `id` (`None`, a trusted caller: nothing
    /// to record). Persisted before it returns.
    pub fn grant(&self, kind: Kind, id: &str, namespace: &str) -> std::io::Result<()> {
        let mut g = self.lock();
        if !g
            .of(kind)
            .entry(id.to_string())
            .or_default()
            .insert(namespace.to_string())
        {
            return Ok(());
        }
        g.version = VERSION;
        self.persist(&g)
    }

    /// Whether a caller of `namespace` may use `id` (`None` sees all).
    pub fn may_use(&self, kind: Kind, id: &str, namespace: Option<&str>) -> bool {
        let Some(ns) = namespace else { return true };
        self.lock()
            .of(kind)
            .get(id)
            .is_some_and(|owners| owners.contains(ns) || owners.contains(SHARED))
    }

    /// The namespaces other than `namespace` that hold `id` (`*` when shared).
    pub fn others(&self, kind: Kind, id: &str, namespace: &str) -> Vec<String> {
        self.lock()
            .of(kind)
            .get(id)
            .map(|o| o.iter().filter(|n| *n != namespace).cloned().collect())
            .unwrap_or_default()
    }

    /// The ids of `kind` that `namespace` holds.
    pub fn held_by(&self, kind: Kind, namespace: &str) -> Vec<String> {
        self.lock()
            .of(kind)
            .iter()
            .filter(|(_, owners)| owners.contains(namespace))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Takes `id` from `namespace` (`None`: from everyone); returns whether
    /// anyone still holds it.
    pub fn revoke(&self, kind: Kind, id: &str, namespace: Option<&str>) -> std::io::Result<bool> {
        let mut g = self.lock();
        let map = g.of(kind);
        let left = match (map.get_mut(id), namespace) {
            (Some(owners), Some(ns)) => {
                owners.remove(ns);
                !owners.is_empty()
            }
            _ => false,
        };
        if !left {
            map.remove(id);
        }
        g.version = VERSION;
        self.persist(&g)?;
        Ok(left)
    }

    fn persist(&self, g: &Grants) -> std::io::Result<()> {
        let json = serde_json::to_vec(g).map_err(std::io::Error::other)?;
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_per_namespace_shared_by_star_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = AccessIndex::open(dir.path());
        a.grant(Kind::Model, "sha256:m", "team-a").expect("grant");
        a.grant(Kind::Blob, "b1", "team-b").expect("grant");
        assert!(a.may_use(Kind::Model, "sha256:m", Some("team-a")));
        assert!(!a.may_use(Kind::Model, "sha256:m", Some("team-b")));
        assert!(
            !a.may_use(Kind::Blob, "sha256:m", Some("team-a")),
            "kinds apart"
        );
        assert!(
            a.may_use(Kind::Model, "sha256:m", None),
            "trusted/admin see all"
        );
        assert!(!a.may_use(Kind::Model, "sha256:other", Some("team-a")));
        assert!(a.others(Kind::Model, "sha256:m", "team-a").is_empty());
        a.grant(Kind::Model, "sha256:m", SHARED).expect("share");
        assert!(a.may_use(Kind::Model, "sha256:m", Some("team-z")));
        assert_eq!(a.others(Kind::Model, "sha256:m", "team-a"), [SHARED]);

        let b = AccessIndex::open(dir.path());
        assert!(b.may_use(Kind::Blob, "b1", Some("team-b")));
        assert_eq!(b.held_by(Kind::Blob, "team-b"), ["b1"]);
        b.grant(Kind::Blob, "b1", "team-c").expect("grant");
        assert!(b.revoke(Kind::Blob, "b1", Some("team-b")).expect("revoke"));
        assert!(!b.may_use(Kind::Blob, "b1", Some("team-b")));
        assert!(!b.revoke(Kind::Blob, "b1", Some("team-c")).expect("revoke"));
        assert!(b.held_by(Kind::Blob, "team-c").is_empty());
        assert!(b.may_use(Kind::Model, "sha256:m", Some("team-z")));
        std::fs::write(dir.path().join(FILE), b"{garbled").expect("write");
        let c = AccessIndex::open(dir.path());
        assert!(
            !c.may_use(Kind::Blob, "b1", Some("team-b")),
            "unreadable grants fail closed"
        );
    }
}
