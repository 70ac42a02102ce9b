//! The mutating admission webhook: injects the rm_abstract init into pods.
//!
//! - [`inject`]: the pure pod → JSON patch function;
//! - [`server`]: the HTTPS endpoint (`POST /mutate-v1-pod`);
//! - [`certs`]: serving certificate (self-managed, cert-manager or files),
//!   reloaded without restart;
//! - this module: the flags, the MutatingWebhookConfiguration the operator
//!   keeps applied, and [`run`], which ties them together.
//!
//! The webhook runs on every replica, leader or not.

pub mod certs;
pub mod inject;
pub mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

use crate::config::parse_duration;
use certs::{CertStore, Lifetimes};
use inject::InjectConfig;
use server::WebhookState;

/// Field manager of the MutatingWebhookConfiguration.
const FIELD_MANAGER: &str = "rm-operator-webhook";
/// Name of the webhook inside the configuration.
pub const WEBHOOK_NAME: &str = "pods.inject.rm-abstract.io";

/// Where the serving certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertMode {
    /// The operator's own CA and certificate, kept in --webhook-secret-name.
    #[value(name = "self")]
    SelfManaged,
    /// cert-manager writes --webhook-secret-name and injects the CA.
    CertManager,
    /// tls.crt/tls.key (and ca.crt) in --webhook-cert-dir.
    Files,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    Ignore,
    Fail,
}

impl FailurePolicy {
    fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Ignore => "Ignore",
            FailurePolicy::Fail => "Fail",
        }
    }
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn label_arg(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Flags of the webhook (all optional; the webhook is off without --webhook-addr).
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Address of the HTTPS admission webhook (off when absent), e.g. 0.0.0.0:9443.
    #[arg(long, env = "RM_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// Certificate source: self (own CA, default), cert-manager, files.
    #[arg(long, env = "RM_WEBHOOK_CERT_MODE", value_enum, default_value = "self")]
    pub webhook_cert_mode: CertMode,
    /// Secret of the serving certificate (self and cert-manager modes).
    #[arg(
        long,
        env = "RM_WEBHOOK_SECRET_NAME",
        default_value = "rm-operator-webhook-tls"
    )]
    pub webhook_secret_name: String,
    /// Namespace of that Secret (default: the operator's namespace).
    #[arg(long, env = "RM_WEBHOOK_SECRET_NAMESPACE")]
    pub webhook_secret_namespace: Option<String>,
    /// cert-manager Certificate (namespace/name or name) whose CA is injected.
    #[arg(long, env = "RM_WEBHOOK_CERT_MANAGER_CERTIFICATE")]
    pub webhook_cert_manager_certificate: Option<String>,
    /// Directory with tls.crt, tls.key and optional ca.crt (files mode).
    #[arg(long, env = "RM_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,
    /// MutatingWebhookConfiguration the operator applies; "" = leave it to Helm/the user.
    #[arg(
        long,
        env = "RM_WEBHOOK_CONFIG_NAME",
        default_value = "rm-abstract-webhook"
    )]
    pub webhook_config_name: String,
    /// Service in front of the webhook (clientConfig.service).
    #[arg(
        long,
        env = "RM_WEBHOOK_SERVICE_NAME",
        default_value = "rm-operator-webhook"
    )]
    pub webhook_service_name: String,
    #[arg(long, env = "RM_WEBHOOK_SERVICE_PORT", default_value_t = 443)]
    pub webhook_service_port: i32,
    /// clientConfig.url instead of the Service (out-of-cluster operator, tests).
    #[arg(long, env = "RM_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// More names (DNS or IP) in the serving certificate, comma-separated.
    #[arg(long, env = "RM_WEBHOOK_DNS_NAMES", value_delimiter = ',')]
    pub webhook_dns_names: Vec<String>,
    /// failurePolicy of the webhook: Ignore (default) or Fail.
    #[arg(
        long,
        env = "RM_WEBHOOK_FAILURE_POLICY",
        value_enum,
        default_value = "ignore",
        ignore_case = true
    )]
    pub webhook_failure_policy: FailurePolicy,
    #[arg(long, env = "RM_WEBHOOK_TIMEOUT_SECONDS", default_value_t = 5)]
    pub webhook_timeout_seconds: i32,
    /// namespaceSelector matchLabels, KEY=VALUE, comma-separated (default: all
    /// namespaces but kube-system and the operator's).
    #[arg(long, env = "RM_WEBHOOK_NAMESPACE_SELECTOR", value_delimiter = ',', value_parser = label_arg)]
    pub webhook_namespace_selector: Vec<(String, String)>,
    /// Image holding /rm-abstract/rm_abstract and /rm-abstract/sitecustomize.py.
    #[arg(
        long,
        env = "RM_WEBHOOK_INIT_IMAGE",
        default_value = "ghcr.io/rm-abstract/python-init:latest"
    )]
    pub webhook_init_image: String,
    #[arg(long, env = "RM_WEBHOOK_INIT_IMAGE_PULL_POLICY")]
    pub webhook_init_image_pull_policy: Option<String>,
    /// sizeLimit of the injected emptyDir.
    #[arg(long, env = "RM_WEBHOOK_VOLUME_SIZE_LIMIT", default_value = "64Mi")]
    pub webhook_volume_size_limit: String,
    /// RM_AGENT_SOCKET in the pods.
    #[arg(
        long,
        env = "RM_WEBHOOK_AGENT_SOCKET",
        default_value = "/var/run/rm-abstract/agent.sock"
    )]
    pub webhook_agent_socket: String,
    /// RM_CACHE_DIR in the pods.
    #[arg(
        long,
        env = "RM_WEBHOOK_CACHE_DIR",
        default_value = "/var/cache/rm-abstract"
    )]
    pub webhook_cache_dir: String,
    /// Extended resource requested by CPU containers to get the agent socket; "" = none.
    #[arg(long, env = "RM_WEBHOOK_AGENT_RESOURCE", default_value = inject::AGENT_RESOURCE)]
    pub webhook_agent_resource: String,
    /// GID owning the agent's socket (rm-agent --socket-group), added to the
    /// injected pods' supplementalGroups so that non-root users may connect.
    /// Unset: no group added.
    #[arg(long, env = "RM_WEBHOOK_AGENT_SOCKET_GROUP", value_parser = rm_runtime::parse_socket_group)]
    pub webhook_agent_socket_group: Option<u32>,
    /// Lifetime of the self-managed serving certificate.
    #[arg(long, default_value = "8760h", value_parser = duration_arg)]
    pub webhook_cert_validity: Duration,
    /// Lifetime of the self-managed CA.
    #[arg(long, default_value = "87600h", value_parser = duration_arg)]
    pub webhook_ca_validity: Duration,
    /// Renew a self-managed certificate once less than this is left.
    #[arg(long, default_value = "720h", value_parser = duration_arg)]
    pub webhook_cert_renew_before: Duration,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = server::DEFAULT_MAX_BODY)]
    pub webhook_max_body_bytes: usize,
}

impl WebhookArgs {
    pub fn inject_config(&self, accelerators: impl IntoIterator<Item = String>) -> InjectConfig {
        let mut cfg = InjectConfig {
            init_image: self.webhook_init_image.clone(),
            image_pull_policy: self.webhook_init_image_pull_policy.clone(),
            size_limit: self.webhook_volume_size_limit.clone(),
            agent_socket: self.webhook_agent_socket.clone(),
            cache_dir: self.webhook_cache_dir.clone(),
            agent_resource: Some(self.webhook_agent_resource.clone()).filter(|r| !r.is_empty()),
            agent_socket_group: self.webhook_agent_socket_group.map(i64::from),
            ..InjectConfig::default()
        };
        cfg.accelerator_resources.extend(accelerators);
        cfg
    }

    /// Names in the serving certificate: the Service's names and the extras.
    fn sans(&self, namespace: &str) -> Vec<String> {
        let svc = &self.webhook_service_name;
        let mut names = vec![
            format!("{svc}.{namespace}.svc"),
            format!("{svc}.{namespace}.svc.cluster.local"),
        ];
        names.extend(
            self.webhook_dns_names
                .iter()
                .filter(|n| !n.is_empty())
                .cloned(),
        );
        names
    }
}

/// The MutatingWebhookConfiguration: CREATE of v1 pods, sideEffects None,
/// the given failurePolicy; `ca_bundle` is left out where cert-manager or
/// the user owns it.
pub fn webhook_configuration(
    args: &WebhookArgs,
    namespace: &str,
    ca_bundle: Option<&str>,
) -> MutatingWebhookConfiguration {
    let mut client_config = match &args.webhook_url {
        Some(url) => json!({ "url": format!("{}{}", url.trim_end_matches('/'), server::PATH) }),
        None => json!({ "service": {
            "name": args.webhook_service_name,
            "namespace": namespace,
            "path": server::PATH,
            "port": args.webhook_service_port,
        }}),
    };
    if let Some(ca) = ca_bundle {
        client_config["caBundle"] = json!(k8s_openapi::ByteString(ca.as_bytes().to_vec()));
    }
    let namespace_selector = if args.webhook_namespace_selector.is_empty() {
        json!({ "matchExpressions": [{
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", namespace],
        }]})
    } else {
        json!({ "matchLabels": args.webhook_namespace_selector.iter().cloned().collect::<BTreeMap<_, _>>() })
    };
    let mut annotations = BTreeMap::new();
    if args.webhook_cert_mode == CertMode::CertManager {
        let cert = args
            .webhook_cert_manager_certificate
            .clone()
            .unwrap_or_else(|| args.webhook_secret_name.clone());
        let cert = if cert.contains('/') {
            cert
        } else {
            format!("{namespace}/{cert}")
        };
        annotations.insert("cert-manager.io/inject-ca-from".to_string(), cert);
    }
    let value = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {
            "name": args.webhook_config_name,
            "annotations": annotations,
            "labels": { "app.kubernetes.io/managed-by": "rm-operator" },
        },
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": args.webhook_failure_policy.as_str(),
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "Never",
            "timeoutSeconds": args.webhook_timeout_seconds,
            "clientConfig": client_config,
            "namespaceSelector": namespace_selector,
            "rules": [{
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
        }],
    });
    #[allow(clippy::expect_used)] // a constant shape; covered by a unit test
    serde_json::from_value(value).expect("valid MutatingWebhookConfiguration")
}

async fn apply_configuration(
    client: &Client,
    cfg: &MutatingWebhookConfiguration,
) -> Result<(), kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = cfg.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(cfg),
    )
    .await
    .map(|_| ())
}

/// Keeps the serving certificate loaded and the configuration applied, until
/// the process ends. Until a certificate is loaded, handshakes fail (and the
/// apiserver applies the failurePolicy); passes are then retried every 2 s.
async fn keep_certificates(
    client: Client,
    args: WebhookArgs,
    namespace: String,
    store: Arc<CertStore>,
) {
    let life = Lifetimes {
        ca_validity: args.webhook_ca_validity,
        validity: args.webhook_cert_validity,
        renew_before: args.webhook_cert_renew_before,
    };
    let secret_ns = args
        .webhook_secret_namespace
        .clone()
        .unwrap_or_else(|| namespace.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &secret_ns);
    let sans = args.sans(&namespace);
    // Check often enough to renew well within the renewal window.
    let period = match args.webhook_cert_mode {
        CertMode::SelfManaged => {
            (life.renew_before / 4).clamp(Duration::from_millis(500), Duration::from_secs(60))
        }
        _ => Duration::from_secs(15),
    };
    let mut applied_bundle: Option<Option<String>> = None;
    loop {
        let pass = async {
            let (cert, key, ca) = match args.webhook_cert_mode {
                CertMode::SelfManaged => {
                    let m = certs::sync_self_managed(
                        &secrets,
                        &args.webhook_secret_name,
                        &secret_ns,
                        &sans,
                        &life,
                    )
                    .await?;
                    (m.serving.cert, m.serving.key, Some(m.ca_bundle))
                }
                CertMode::CertManager => {
                    let (c, k, _) =
                        certs::read_tls_secret(&secrets, &args.webhook_secret_name).await?;
                    (c, k, None)
                }
                CertMode::Files => {
                    let dir = args
                        .webhook_cert_dir
                        .clone()
                        .unwrap_or_else(|| PathBuf::from("/tls"));
                    certs::read_cert_dir(&dir)?
                }
            };
            Ok::<_, certs::CertError>((cert, key, ca))
        };
        match pass.await {
            Ok((cert, key, ca)) => {
                // The CA goes out before the certificate it signed is served.
                if !args.webhook_config_name.is_empty() && applied_bundle.as_ref() != Some(&ca) {
                    let cfg = webhook_configuration(&args, &namespace, ca.as_deref());
                    match apply_configuration(&client, &cfg).await {
                        Ok(()) => {
                            tracing::info!(name = %args.webhook_config_name, "MutatingWebhookConfiguration applied");
                            applied_bundle = Some(ca);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot apply the MutatingWebhookConfiguration; retrying")
                        }
                    }
                }
                match store.set(&cert, &key) {
                    Ok(true) => tracing::info!("webhook serving certificate loaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook certificate unusable; keeping the previous one")
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "webhook certificate not available; retrying"),
        }
        tokio::time::sleep(if store.is_loaded() {
            period
        } else {
            Duration::from_secs(2).min(period)
        })
        .await;
    }
}

/// Starts the webhook: certificates, namespace cache, HTTPS server. Returns
/// when `shutdown` resolves.
pub async fn run(
    client: Client,
    args: WebhookArgs,
    namespace: String,
    inject: InjectConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Some(addr) = args.webhook_addr else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let store = Arc::new(CertStore::default());
    tokio::spawn(keep_certificates(
        client.clone(),
        args.clone(),
        namespace,
        store.clone(),
    ));

    let (reader, writer) = reflector::store();
    let namespaces: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    tokio::spawn(
        watcher(namespaces, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(|_| async {}),
    );
    let state = WebhookState {
        inject: Arc::new(inject),
        namespaces: Some(reader),
    };
    let tls = server::tls_config(store).map_err(std::io::Error::other)?;
    tracing::info!(%addr, path = server::PATH, mode = ?args.webhook_cert_mode, "serving the admission webhook");
    server::serve(
        listener,
        tls,
        server::router(state, args.webhook_max_body_bytes),
        shutdown,
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        w: WebhookArgs,
    }

    #[test]
    fn configuration_has_policy_selector_and_ca() {
        let cli = Cli::parse_from([
            "x",
            "--webhook-addr=127.0.0.1:9443",
            "--webhook-failure-policy=Fail",
            "--webhook-namespace-selector=a=b",
            "--webhook-url=https://127.0.0.1:9443",
        ]);
        let cfg = webhook_configuration(&cli.w, "ops", Some("PEM"));
        let wh = &cfg.webhooks.as_ref().unwrap()[0];
        assert_eq!(wh.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(
            wh.client_config.url.as_deref(),
            Some("https://127.0.0.1:9443/mutate-v1-pod")
        );
        assert_eq!(wh.client_config.ca_bundle.as_ref().unwrap().0, b"PEM");
        assert_eq!(
            wh.namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["a"],
            "b"
        );
    }

    #[test]
    fn defaults_are_ignore_service_and_exclude_system_namespaces() {
        let cli = Cli::parse_from(["x", "--webhook-cert-mode=cert-manager"]);
        let cfg = webhook_configuration(&cli.w, "ops", None);
        let wh = &cfg.webhooks.as_ref().unwrap()[0];
        assert_eq!(wh.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(wh.client_config.service.as_ref().unwrap().namespace, "ops");
        assert!(wh.client_config.ca_bundle.is_none());
        assert_eq!(
            cfg.metadata.annotations.unwrap()["cert-manager.io/inject-ca-from"],
            "ops/rm-operator-webhook-tls"
        );
        let sel = wh.namespace_selector.as_ref().unwrap();
        assert!(
            sel.match_expressions.as_ref().unwrap()[0]
                .values
                .as_ref()
                .unwrap()
                .contains(&"kube-system".to_string())
        );
    }

    #[test]
    fn socket_group_flag_reaches_the_injection_and_refuses_root() {
        let cli = Cli::parse_from(["x", "--webhook-agent-socket-group=2026"]);
        assert_eq!(cli.w.inject_config([]).agent_socket_group, Some(2026));
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.w.inject_config([]).agent_socket_group, None);
        for bad in ["0", "-1", "staff", "4294967296"] {
            assert!(
                Cli::try_parse_from(["x", &format!("--webhook-agent-socket-group={bad}")]).is_err(),
                "{bad}"
            );
        }
    }
}
