//! Limits on what a tenant may store on the node: one upload's size, all a
//! namespace holds (its uploads, its hub downloads and the compiled entries
//! of its models), and a floor of free space on the cache's filesystem, so
//! that no pod can fill the node's disk and have the kubelet evict other
//! tenants' pods under DiskPressure.
//!
//! [`room`] is the pure decision: how many bytes a namespace may still have
//! written for it; [`allowance`] adds the per-upload limit. The upload
//! handler checks it before reading the body (with the declared length) and
//! caps the body at it while reading (a client that sends more than it
//! declared, or declares nothing, is cut off); a hub download is watched
//! while it runs and stopped at it; a compile is admitted only with room
//! left.

use std::path::Path;

/// The node's limits (flags of `rm-agent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest single blob (`--max-upload-bytes`).
    pub max_upload: u64,
    /// Bytes one namespace may hold on the node (`--namespace-quota`).
    pub namespace_quota: u64,
    /// Free space the cache's filesystem keeps (`--min-free-disk`).
    pub min_free: FreeFloor,
    /// Bytes all namespaces' uploads together may take (`--uploads-max-bytes`).
    pub uploads_max: u64,
}

/// A floor of free space: bytes, or a percentage of the filesystem (as the
/// kubelet's `nodefs.available` eviction threshold may be given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeFloor {
    Bytes(u64),
    Percent(u8),
}

impl FreeFloor {
    /// The floor in bytes on a filesystem of `total` bytes.
    pub fn bytes(&self, total: u64) -> u64 {
        match *self {
            FreeFloor::Bytes(b) => b,
            FreeFloor::Percent(p) => total / 100 * u64::from(p),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_upload: 64 << 30,
            namespace_quota: 200 << 30,
            min_free: FreeFloor::Bytes(10 << 30),
            uploads_max: 500 << 30,
        }
    }
}

/// What the decision needs to know at the time of an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Bytes the namespace holds (`None`: a trusted or admin caller, not
    /// counted).
    pub namespace_bytes: Option<u64>,
    /// The cache's filesystem.
    pub disk: DiskSpace,
    /// Bytes of every namespace's uploads on the node (promised ones
    /// included), after the least recently used were evicted.
    pub uploads_bytes: u64,
}

/// Free and total bytes of a filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    pub free: u64,
    pub total: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error(
        "the upload is {size} bytes; one file may be at most {max} bytes on this node (rm-agent --max-upload-bytes)"
    )]
    TooLarge { size: u64, max: u64 },
    #[error(
        "namespace {namespace} holds {used} bytes on this node (uploads, hub downloads and compiled entries of its models); {size} more would pass its quota of {quota} bytes (rm-agent --namespace-quota): delete what it no longer needs (DELETE /v1/blobs/<sha256>, DELETE /v1/cache/<key>), or ask the cluster operator for more"
    )]
    Quota {
        namespace: String,
        used: u64,
        size: u64,
        quota: u64,
    },
    #[error(
        "uploads on this node may take {budget} bytes (rm-agent --uploads-max-bytes); they take {used}, and none that is not in use could be removed to make room for {size} more: retry later, or on another node"
    )]
    NodeUploads { budget: u64, used: u64, size: u64 },
    #[error(
        "the node's cache filesystem has {free} bytes free and keeps at least {min_free} free (rm-agent --min-free-disk), so that the node stays out of DiskPressure; {size} bytes do not fit: retry later or on another node"
    )]
    Disk { free: u64, min_free: u64, size: u64 },
}

impl QuotaError {
    pub fn http_status(&self) -> u16 {
        match self {
            QuotaError::TooLarge { .. } => 413,
            // As the apiserver answers a ResourceQuota: the caller must free
            // its own space or be given more.
            QuotaError::Quota { .. } => 403,
            QuotaError::Disk { .. } | QuotaError::NodeUploads { .. } => 507,
        }
    }
}

/// How many bytes an upload of `namespace` may write: the least of the
/// per-upload limit and [`room`]. `size` is the declared length (0 when
/// unknown); an upload that cannot fit is refused with the limit it would
/// pass.
pub fn allowance(
    limits: &Limits,
    usage: &Usage,
    namespace: Option<&str>,
    size: u64,
) -> Result<u64, QuotaError> {
    if size > limits.max_upload {
        return Err(QuotaError::TooLarge {
            size,
            max: limits.max_upload,
        });
    }
    let node_left = limits.uploads_max.saturating_sub(usage.uploads_bytes);
    if size > node_left || node_left == 0 {
        return Err(QuotaError::NodeUploads {
            budget: limits.uploads_max,
            used: usage.uploads_bytes,
            size,
        });
    }
    Ok(room(limits, usage, namespace, size)?
        .min(limits.max_upload)
        .min(node_left))
}

/// How many more bytes may be written for `namespace`: the least of what is
/// left of its quota and the free space above the floor. Refused when `size`
/// (0: unknown) does not fit, or nothing is left.
pub fn room(
    limits: &Limits,
    usage: &Usage,
    namespace: Option<&str>,
    size: u64,
) -> Result<u64, QuotaError> {
    let mut left = u64::MAX;
    if let (Some(ns), Some(used)) = (namespace, usage.namespace_bytes) {
        let quota_left = limits.namespace_quota.saturating_sub(used);
        if size > quota_left || quota_left == 0 {
            return Err(QuotaError::Quota {
                namespace: ns.to_string(),
                used,
                size,
                quota: limits.namespace_quota,
            });
        }
        left = quota_left;
    }
    let min_free = limits.min_free.bytes(usage.disk.total);
    let disk_left = usage.disk.free.saturating_sub(min_free);
    if size > disk_left || disk_left == 0 {
        return Err(QuotaError::Disk {
            free: usage.disk.free,
            min_free,
            size,
        });
    }
    Ok(left.min(disk_left))
}

/// Bytes promised to writes under way (uploads streaming, compiles
/// running), per namespace and for the node. They count as held until the
/// write ends: without them, ten uploads started at once would each be
/// measured against the same free space and quota, and together pass both.
#[derive(Clone, Default)]
pub struct Ledger(std::sync::Arc<std::sync::Mutex<Promised>>);

#[derive(Default)]
struct Promised {
    node: u64,
    by_namespace: std::collections::HashMap<String, u64>,
}

/// What a write under way was promised; given back when dropped.
pub struct Reservation {
    ledger: Ledger,
    namespace: Option<String>,
    pub bytes: u64,
}

impl Ledger {
    /// What writes under way hold: (this namespace's, the node's).
    pub fn promised(&self, namespace: Option<&str>) -> (u64, u64) {
        let p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mine = namespace
            .and_then(|ns| p.by_namespace.get(ns).copied())
            .unwrap_or(0);
        (mine, p.node)
    }

    /// Promises `bytes` to a write of `namespace` (take it with the decision
    /// that allowed it, under no other lock).
    pub fn reserve(&self, namespace: Option<&str>, bytes: u64) -> Reservation {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.node = p.node.saturating_add(bytes);
        if let Some(ns) = namespace {
            let n = p.by_namespace.entry(ns.to_string()).or_default();
            *n = n.saturating_add(bytes);
        }
        Reservation {
            ledger: self.clone(),
            namespace: namespace.map(str::to_string),
            bytes,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut p = self.ledger.0.lock().unwrap_or_else(|e| e.into_inner());
        p.node = p.node.saturating_sub(self.bytes);
        if let Some(ns) = &self.namespace
            && let Some(n) = p.by_namespace.get_mut(ns)
        {
            *n = n.saturating_sub(self.bytes);
            if *n == 0 {
                p.by_namespace.remove(ns);
            }
        }
    }
}

/// Free bytes (for an unprivileged writer) and total bytes of the
/// filesystem of `path`.
pub fn disk_space(path: &Path) -> std::io::Result<DiskSpace> {
    let s = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(DiskSpace {
        free: s.f_bavail.saturating_mul(s.f_frsize),
        total: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_upload: 100,
        namespace_quota: 250,
        min_free: FreeFloor::Bytes(1000),
        uploads_max: 1_000_000,
    };

    fn usage(ns: Option<u64>, free: u64) -> Usage {
        Usage {
            namespace_bytes: ns,
            disk: DiskSpace {
                free,
                total: 100_000,
            },
            uploads_bytes: 0,
        }
    }

    #[test]
    fn the_least_of_the_three_limits_wins() {
        assert_eq!(
            allowance(&L, &usage(Some(0), 10_000), Some("a"), 0),
            Ok(100)
        );
        assert_eq!(
            allowance(&L, &usage(Some(200), 10_000), Some("a"), 0),
            Ok(50)
        );
        assert_eq!(allowance(&L, &usage(Some(0), 1_030), Some("a"), 10), Ok(30));
        // Trusted and admin callers are not counted against a namespace.
        assert_eq!(allowance(&L, &usage(None, 10_000), None, 100), Ok(100));
    }

    #[test]
    fn each_refusal_names_its_limit() {
        let e = allowance(&L, &usage(Some(0), 10_000), Some("a"), 101).unwrap_err();
        assert_eq!(e.http_status(), 413);
        assert!(e.to_string().contains("--max-upload-bytes"), "{e}");
        let e = allowance(&L, &usage(Some(200), 10_000), Some("team-a"), 60).unwrap_err();
        assert_eq!(e.http_status(), 403);
        assert!(
            e.to_string().contains("team-a") && e.to_string().contains("250"),
            "{e}"
        );
        // A full quota refuses even an upload of unknown length.
        assert!(matches!(
            allowance(&L, &usage(Some(250), 10_000), Some("a"), 0),
            Err(QuotaError::Quota { .. })
        ));
        let e = allowance(&L, &usage(Some(0), 1_050), Some("a"), 60).unwrap_err();
        assert_eq!(e.http_status(), 507);
        assert!(e.to_string().contains("DiskPressure"), "{e}");
        assert!(matches!(
            allowance(&L, &usage(None, 900), None, 0),
            Err(QuotaError::Disk { .. })
        ));
    }

    #[test]
    fn a_floor_may_be_a_share_of_the_filesystem() {
        let limits = Limits {
            min_free: FreeFloor::Percent(5),
            ..L
        };
        // 5 % of 100 000 is 5 000: 5 060 free leaves 60.
        assert_eq!(
            allowance(&limits, &usage(Some(0), 5_060), Some("a"), 0),
            Ok(60)
        );
        let e = allowance(&limits, &usage(Some(0), 5_060), Some("a"), 61).unwrap_err();
        assert!(e.to_string().contains("keeps at least 5000"), "{e}");
        // Hub downloads and compiles have no per-file limit, only room.
        assert_eq!(room(&L, &usage(Some(0), 10_000), Some("a"), 200), Ok(250));
    }

    #[test]
    fn disk_space_reads_the_filesystem() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = disk_space(dir.path()).expect("statvfs");
        assert!(d.free > 0 && d.total >= d.free);
        assert!(disk_space(&dir.path().join("missing")).is_err());
    }
}
