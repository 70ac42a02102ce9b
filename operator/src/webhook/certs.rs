//! Serving certificate of the webhook, in one of three modes:
//! - `self` (default): the operator creates a CA and a serving certificate
//!   with rcgen, keeps both in a Secret, writes the CA bundle into its
//!   MutatingWebhookConfiguration, and renews them before they expire;
//! - `cert-manager`: cert-manager writes the Secret (a `Certificate`) and
//!   injects the CA (annotation `cert-manager.io/inject-ca-from`);
//! - `files`: the user mounts `tls.crt`, `tls.key` (and optionally `ca.crt`)
//!   in a directory.
//!
//! In every mode the certificate is re-read periodically and swapped into
//! [`CertStore`], which rustls asks for the certificate at every handshake:
//! a renewal needs no restart.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Secret annotations of the self-managed mode.
const NOT_AFTER: &str = "rm-abstract.io/not-after";
const CA_NOT_AFTER: &str = "rm-abstract.io/ca-not-after";
const CA_NAME: &str = "rm-abstract.io/ca-name";
const SANS: &str = "rm-abstract.io/sans";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate PEM has no certificate: {0}")]
    NoCertificate(String),
    #[error("the private key PEM is not a usable key: {0}")]
    Key(String),
    #[error("Secret {0} is missing key {1:?}")]
    SecretField(String, &'static str),
    #[error("Secret {0}: {1}")]
    Api(String, #[source] kube::Error),
    #[error("cannot read {0}: {1}")]
    Read(String, #[source] std::io::Error),
}

/// The certificate rustls serves; swapped in place on renewal.
#[derive(Debug, Default)]
pub struct CertStore {
    current: RwLock<Option<(String, Arc<CertifiedKey>)>>,
}

impl CertStore {
    /// Installs `cert_pem`/`key_pem` unless they are what is served already.
    /// Returns whether the served certificate changed.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<bool, CertError> {
        if self.current_pem().as_deref() == Some(cert_pem) {
            return Ok(false);
        }
        let key = certified_key(cert_pem, key_pem)?;
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        *cur = Some((cert_pem.to_string(), Arc::new(key)));
        Ok(true)
    }

    pub fn current_pem(&self) -> Option<String> {
        let cur = self.current.read().unwrap_or_else(|p| p.into_inner());
        cur.as_ref().map(|(pem, _)| pem.clone())
    }

    pub fn is_loaded(&self) -> bool {
        self.current_pem().is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let cur = self.current.read().unwrap_or_else(|p| p.into_inner());
        cur.as_ref().map(|(_, k)| k.clone())
    }
}

/// A rustls key from PEM text (certificate chain, private key).
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::NoCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate("empty".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CertError::Key(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    Ok(CertifiedKey::new(certs, signing))
}

/// A CA or serving certificate with its key, as PEM.
#[derive(Debug, Clone, PartialEq)]
pub struct Pem {
    pub cert: String,
    pub key: String,
    pub not_after: jiff::Timestamp,
}

fn to_offset(t: jiff::Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn ca_params(name: &str, not_after: jiff::Timestamp) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "rm-abstract");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = to_offset(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(300));
    p.not_after = to_offset(not_after);
    p
}

/// A new CA named `name` (its subject CN), valid for `validity`.
pub fn issue_ca(name: &str, validity: Duration) -> Result<Pem, CertError> {
    let key = KeyPair::generate()?;
    let not_after =
        jiff::Timestamp::now() + jiff::SignedDuration::from_secs(validity.as_secs() as i64);
    let cert = ca_params(name, not_after).self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after,
    })
}

/// A serving certificate for `sans` (DNS names or IP addresses) signed by
/// the CA named `ca_name` with key `ca_key_pem`.
pub fn issue_serving(
    ca_name: &str,
    ca_key_pem: &str,
    sans: &[String],
    validity: Duration,
) -> Result<Pem, CertError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    // The issuer only contributes its subject and key: rebuilt from the name.
    let issuer = Issuer::new(ca_params(ca_name, jiff::Timestamp::now()), ca_key);
    let mut p = CertificateParams::default();
    p.distinguished_name.push(
        DnType::CommonName,
        sans.first()
            .cloned()
            .unwrap_or_else(|| "rm-operator-webhook".into()),
    );
    p.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => s.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let not_after =
        jiff::Timestamp::now() + jiff::SignedDuration::from_secs(validity.as_secs() as i64);
    p.not_before = to_offset(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(300));
    p.not_after = to_offset(not_after);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after,
    })
}

/// Lifetimes of the self-managed certificates.
#[derive(Debug, Clone)]
pub struct Lifetimes {
    pub ca_validity: Duration,
    pub validity: Duration,
    /// Renew once less than this is left (serving cert and CA alike).
    pub renew_before: Duration,
}

/// The self-managed material as kept in the Secret.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfManaged {
    pub ca_name: String,
    pub ca: Pem,
    /// CA certificates the apiserver must trust: the current CA, and the
    /// previous one until it expires (so a CA change never fails a call).
    pub ca_bundle: String,
    pub serving: Pem,
    pub sans: Vec<String>,
}

/// What has to change in the self-managed material at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Nothing,
    Serving,
    CaAndServing,
}

/// The renewal due for `m` at `now`: a CA within `renew_before` of its end
/// (or unable to outlive a fresh serving cert's renewal window) is replaced;
/// a serving certificate within `renew_before` of its end, or issued for
/// other names, is reissued.
pub fn renewal_due(
    m: &SelfManaged,
    sans: &[String],
    life: &Lifetimes,
    now: jiff::Timestamp,
) -> Renewal {
    let left = |t: jiff::Timestamp| t.duration_since(now).as_secs();
    let renew = life.renew_before.as_secs() as i64;
    if left(m.ca.not_after) <= renew {
        Renewal::CaAndServing
    } else if left(m.serving.not_after) <= renew
        || m.sans != sans
        || m.serving.not_after > m.ca.not_after
    {
        Renewal::Serving
    } else {
        Renewal::Nothing
    }
}

/// New material: a fresh CA (keeping `previous`'s CA in the bundle) and a
/// serving certificate, or only a new serving certificate.
pub fn renew(
    previous: Option<&SelfManaged>,
    what: Renewal,
    sans: &[String],
    life: &Lifetimes,
) -> Result<SelfManaged, CertError> {
    let (ca_name, ca, ca_bundle) = match (previous, what) {
        (Some(p), Renewal::Serving | Renewal::Nothing) => {
            (p.ca_name.clone(), p.ca.clone(), p.ca_bundle.clone())
        }
        (prev, _) => {
            let name = format!(
                "rm-abstract webhook CA {}",
                jiff::Timestamp::now().as_second()
            );
            let ca = issue_ca(&name, life.ca_validity)?;
            let mut bundle = ca.cert.clone();
            if let Some(p) = prev.filter(|p| p.ca.not_after > jiff::Timestamp::now()) {
                bundle.push_str(&p.ca.cert);
            }
            (name, ca, bundle)
        }
    };
    // A serving certificate never outlives its CA.
    let max = ca
        .not_after
        .duration_since(jiff::Timestamp::now())
        .as_secs()
        .max(0) as u64;
    let validity = life.validity.min(Duration::from_secs(max));
    let serving = issue_serving(&ca_name, &ca.key, sans, validity)?;
    Ok(SelfManaged {
        ca_name,
        ca,
        ca_bundle,
        serving,
        sans: sans.to_vec(),
    })
}

fn text(secret: &Secret, key: &'static str, name: &str) -> Result<String, CertError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| CertError::SecretField(name.to_string(), key))
}

fn annotation(secret: &Secret, key: &'static str, name: &str) -> Result<String, CertError> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
        .ok_or_else(|| CertError::SecretField(name.to_string(), key))
}

fn timestamp(secret: &Secret, key: &'static str, name: &str) -> Result<jiff::Timestamp, CertError> {
    annotation(secret, key, name)?
        .parse()
        .map_err(|_| CertError::SecretField(name.to_string(), key))
}

impl SelfManaged {
    /// Reads the material from a Secret written by [`SelfManaged::to_secret`].
    pub fn from_secret(secret: &Secret) -> Result<Self, CertError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        Ok(Self {
            ca_name: annotation(secret, CA_NAME, &name)?,
            ca: Pem {
                cert: text(secret, "ca.crt", &name)?,
                key: text(secret, "ca.key", &name)?,
                not_after: timestamp(secret, CA_NOT_AFTER, &name)?,
            },
            ca_bundle: text(secret, "ca-bundle.crt", &name)?,
            serving: Pem {
                cert: text(secret, "tls.crt", &name)?,
                key: text(secret, "tls.key", &name)?,
                not_after: timestamp(secret, NOT_AFTER, &name)?,
            },
            sans: annotation(secret, SANS, &name)?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        })
    }

    /// The Secret (type kubernetes.io/tls) holding this material.
    pub fn to_secret(&self, name: &str, namespace: &str) -> Secret {
        let b = |s: &str| ByteString(s.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                annotations: Some(
                    [
                        (CA_NAME.to_string(), self.ca_name.clone()),
                        (CA_NOT_AFTER.to_string(), self.ca.not_after.to_string()),
                        (NOT_AFTER.to_string(), self.serving.not_after.to_string()),
                        (SANS.to_string(), self.sans.join(",")),
                    ]
                    .into(),
                ),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "rm-operator".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    ("tls.crt".to_string(), b(&self.serving.cert)),
                    ("tls.key".to_string(), b(&self.serving.key)),
                    ("ca.crt".to_string(), b(&self.ca.cert)),
                    ("ca.key".to_string(), b(&self.ca.key)),
                    ("ca-bundle.crt".to_string(), b(&self.ca_bundle)),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }
}

/// One pass of the self-managed mode: reads the Secret, creates or renews the
/// material when due (optimistic concurrency: another replica's write wins
/// and is read back on the next pass), and returns what to serve.
pub async fn sync_self_managed(
    secrets: &Api<Secret>,
    name: &str,
    namespace: &str,
    sans: &[String],
    life: &Lifetimes,
) -> Result<SelfManaged, CertError> {
    let api_err = |e| CertError::Api(format!("{namespace}/{name}"), e);
    let existing = secrets.get_opt(name).await.map_err(api_err)?;
    let current = existing
        .as_ref()
        .and_then(|s| SelfManaged::from_secret(s).ok());
    let what = match &current {
        None => Renewal::CaAndServing,
        Some(m) => renewal_due(m, sans, life, jiff::Timestamp::now()),
    };
    if what == Renewal::Nothing {
        if let Some(m) = current {
            return Ok(m);
        }
    }
    let next = renew(current.as_ref(), what, sans, life)?;
    let mut secret = next.to_secret(name, namespace);
    let result = match &existing {
        None => secrets.create(&PostParams::default(), &secret).await,
        Some(old) => {
            secret.metadata.resource_version = old.metadata.resource_version.clone();
            secrets.replace(name, &PostParams::default(), &secret).await
        }
    };
    match result {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), renewal = ?what, not_after = %next.serving.not_after, "webhook certificate issued");
            Ok(next)
        }
        // Another replica wrote first: serve what it wrote.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = secrets.get(name).await.map_err(api_err)?;
            SelfManaged::from_secret(&s)
        }
        Err(e) => Err(api_err(e)),
    }
}

/// Reads `tls.crt`/`tls.key` (and `ca.crt` if present) of a Secret written by
/// cert-manager or the user.
pub async fn read_tls_secret(
    secrets: &Api<Secret>,
    name: &str,
) -> Result<(String, String, Option<String>), CertError> {
    let s = secrets
        .get(name)
        .await
        .map_err(|e| CertError::Api(name.to_string(), e))?;
    let ca = text(&s, "ca.crt", name).ok();
    Ok((text(&s, "tls.crt", name)?, text(&s, "tls.key", name)?, ca))
}

/// Reads `tls.crt`/`tls.key` (and `ca.crt` if present) from a directory.
pub fn read_cert_dir(dir: &std::path::Path) -> Result<(String, String, Option<String>), CertError> {
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).map_err(|e| CertError::Read(p.display().to_string(), e))
    };
    Ok((read("tls.crt")?, read("tls.key")?, read("ca.crt").ok()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn life() -> Lifetimes {
        Lifetimes {
            ca_validity: Duration::from_secs(3600 * 24 * 365),
            validity: Duration::from_secs(3600 * 24 * 30),
            renew_before: Duration::from_secs(3600 * 24 * 10),
        }
    }

    #[test]
    fn issued_certificate_loads_into_rustls() {
        let sans = vec!["svc.ns.svc".to_string(), "127.0.0.1".to_string()];
        let m = renew(None, Renewal::CaAndServing, &sans, &life()).unwrap();
        let store = CertStore::default();
        assert!(store.set(&m.serving.cert, &m.serving.key).unwrap());
        assert!(
            !store.set(&m.serving.cert, &m.serving.key).unwrap(),
            "same cert is not reloaded"
        );
        assert_eq!(m.ca_bundle, m.ca.cert);
    }

    #[test]
    fn secret_round_trip_keeps_the_material() {
        let m = renew(None, Renewal::CaAndServing, &["a.b.svc".into()], &life()).unwrap();
        let back = SelfManaged::from_secret(&m.to_secret("s", "ns")).unwrap();
        assert_eq!(back.ca_name, m.ca_name);
        assert_eq!(back.serving.cert, m.serving.cert);
        assert_eq!(back.ca.not_after.as_second(), m.ca.not_after.as_second());
        assert_eq!(back.sans, m.sans);
    }

    #[test]
    fn serving_certificate_is_renewed_before_expiry_and_on_new_names() {
        let sans = vec!["a.b.svc".to_string()];
        let m = renew(None, Renewal::CaAndServing, &sans, &life()).unwrap();
        let now = jiff::Timestamp::now();
        assert_eq!(renewal_due(&m, &sans, &life(), now), Renewal::Nothing);
        let late = now + jiff::SignedDuration::from_hours(24 * 25);
        assert_eq!(renewal_due(&m, &sans, &life(), late), Renewal::Serving);
        assert_eq!(
            renewal_due(&m, &["other.svc".into()], &life(), now),
            Renewal::Serving
        );
        let very_late = now + jiff::SignedDuration::from_hours(24 * 360);
        assert_eq!(
            renewal_due(&m, &sans, &life(), very_late),
            Renewal::CaAndServing
        );
    }

    #[test]
    fn serving_renewal_keeps_the_ca_and_ca_renewal_keeps_the_old_ca_trusted() {
        let sans = vec!["a.b.svc".to_string()];
        let m = renew(None, Renewal::CaAndServing, &sans, &life()).unwrap();
        let s = renew(Some(&m), Renewal::Serving, &sans, &life()).unwrap();
        assert_eq!(s.ca, m.ca);
        assert_ne!(s.serving.cert, m.serving.cert);
        let c = renew(Some(&m), Renewal::CaAndServing, &sans, &life()).unwrap();
        assert_ne!(c.ca.cert, m.ca.cert);
        assert!(c.ca_bundle.contains(&m.ca.cert) && c.ca_bundle.contains(&c.ca.cert));
    }

    #[test]
    fn garbage_pem_is_an_error_not_a_panic() {
        assert!(certified_key("nope", "nope").is_err());
        let m = renew(None, Renewal::CaAndServing, &["x.svc".into()], &life()).unwrap();
        assert!(
            certified_key(
                &m.serving.cert,
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            )
            .is_err()
        );
    }
}
