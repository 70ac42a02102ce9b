//! Limits on what a tenant may store on the node: one upload's size, a
//! namespace's uploads in all, and a floor of free space on the cache's
//! filesystem, so that no pod can fill the node's disk and have the kubelet
//! evict other tenants' pods under DiskPressure.
//!
//! [`allowance`] is the pure decision: how many bytes an upload may still
//! write. The upload handler checks it before reading the body (with the
//! declared length) and caps the body at it while reading (a client that
//! sends more than it declared, or declares nothing, is cut off).

use std::path::Path;

/// The node's limits (flags of `rm-agent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest single blob (`--max-upload-bytes`).
    pub max_upload: u64,
    /// Uploaded bytes one namespace may hold (`--namespace-upload-quota`).
    pub namespace_quota: u64,
    /// Free bytes the cache's filesystem keeps (`--min-free-disk`).
    pub min_free: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_upload: 64 << 30,
            namespace_quota: 200 << 30,
            min_free: 10 << 30,
        }
    }
}

/// What the decision needs to know at the time of an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of the blobs the namespace holds (`None`: a trusted or admin
    /// caller, not counted).
    pub namespace_bytes: Option<u64>,
    /// Free bytes on the cache's filesystem.
    pub free_disk: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error(
        "the upload is {size} bytes; one file may be at most {max} bytes on this node (rm-agent --max-upload-bytes)"
    )]
    TooLarge { size: u64, max: u64 },
    #[error(
        "namespace {namespace} holds {used} bytes of uploads on this node; {size} more would pass its quota of {quota} bytes (rm-agent --namespace-upload-quota): delete blobs it no longer needs (DELETE /v1/blobs/<sha256>), or ask the cluster operator for more"
    )]
    Quota {
        namespace: String,
        used: u64,
        size: u64,
        quota: u64,
    },
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
            QuotaError::Disk { .. } => 507,
        }
    }
}

/// How many bytes an upload of `namespace` may write: the least of the
/// per-upload limit, what is left of the namespace's quota, and the free
/// space above the floor. `size` is the declared length (0 when unknown);
/// an upload that cannot fit is refused with the limit it would pass.
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
    let mut left = limits.max_upload;
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
        left = left.min(quota_left);
    }
    let disk_left = usage.free_disk.saturating_sub(limits.min_free);
    if size > disk_left || disk_left == 0 {
        return Err(QuotaError::Disk {
            free: usage.free_disk,
            min_free: limits.min_free,
            size,
        });
    }
    Ok(left.min(disk_left))
}

/// Free bytes for an unprivileged writer on the filesystem of `path`.
pub fn free_disk(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_upload: 100,
        namespace_quota: 250,
        min_free: 1000,
    };

    fn usage(ns: Option<u64>, free: u64) -> Usage {
        Usage {
            namespace_bytes: ns,
            free_disk: free,
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
    fn free_disk_reads_the_filesystem() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(free_disk(dir.path()).expect("statvfs") > 0);
        assert!(free_disk(&dir.path().join("missing")).is_err());
    }
}
