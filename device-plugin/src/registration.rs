//! Registration with the kubelet, and the watch that redoes it: when the
//! kubelet restarts it deletes the sockets in its device-plugin directory and
//! creates `kubelet.sock` anew, so we watch both (polling every
//! `kubelet_poll_interval`, 100 ms by default: cheaper than it sounds — two
//! stat calls — and immune to missed inotify events on hostPath mounts).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::allocation::AllocateOptions;
use crate::api::RegisterRequest;
use crate::api::device_plugin_server::DevicePluginServer;
use crate::api::registration_client::RegistrationClient;
use crate::error::{Error, Result};
use crate::podresources::TokenCollector;
use crate::resource::ResourceManager;
use crate::server::{DevicePluginService, options};
use crate::transport::{bind_unix, connect_unix};

/// The API version we speak (`deviceplugin/v1beta1/constants.go`).
pub const API_VERSION: &str = "v1beta1";

/// Registers `resource` served on `endpoint` (a file name in the kubelet's
/// directory) with the kubelet at `kubelet_socket`.
pub async fn register(kubelet_socket: &Path, endpoint: &str, resource: &str) -> Result<()> {
    let channel = connect_unix(kubelet_socket).await?;
    let mut client = RegistrationClient::new(channel);
    client
        .register(RegisterRequest {
            version: API_VERSION.into(),
            endpoint: endpoint.into(),
            resource_name: resource.into(),
            options: Some(options()),
        })
        .await
        .map_err(|status| Error::Register {
            resource: resource.into(),
            status: Box::new(status),
        })?;
    Ok(())
}

/// Identity of a file: (device, inode). A recreated socket has a new one.
fn identity(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    m.file_type().is_socket().then(|| (m.dev(), m.ino()))
}

/// One running gRPC server on our socket.
struct ServerInstance {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
    socket_identity: Option<(u64, u64)>,
}

/// Serves one resource and keeps it registered.
pub struct PluginEndpoint {
    pub manager: Arc<ResourceManager>,
    pub tokens: Arc<TokenCollector>,
    pub options: AllocateOptions,
    pub kubelet_dir: PathBuf,
    /// File name of our socket in `kubelet_dir`.
    pub endpoint: String,
    pub poll_interval: Duration,
}

impl PluginEndpoint {
    pub fn socket_path(&self) -> PathBuf {
        self.kubelet_dir.join(&self.endpoint)
    }

    fn start_server(&self) -> Result<ServerInstance> {
        let path = self.socket_path();
        let listener = bind_unix(&path)?;
        let socket_identity = identity(&path);
        let (stop, stop_rx) = watch::channel(false);
        let service = DevicePluginService {
            manager: self.manager.clone(),
            tokens: self.tokens.clone(),
            options: self.options.clone(),
            stop: stop_rx.clone(),
        };
        let resource = self.manager.resource_name.clone();
        let mut stop_wait = stop_rx;
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async move {
                        let _ = stop_wait.wait_for(|s| *s).await;
                    },
                )
                .await
                .map_err(|source| Error::Serve { resource, source })
        });
        tracing::info!(resource = %self.manager.resource_name, socket = %path.display(), "serving");
        Ok(ServerInstance {
            stop,
            task,
            socket_identity,
        })
    }

    async fn stop_server(&self, inst: ServerInstance) {
        let _ = inst.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(5), inst.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
            Err(_) => tracing::warn!("server did not stop within 5 s"),
        }
    }

    /// Serves, registers, and re-does both whenever the kubelet restarts or
    /// our socket disappears, until `shutdown` turns true. Removes the socket
    /// on the way out.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let resource = self.manager.resource_name.clone();
        let kubelet_socket = self.kubelet_dir.join("kubelet.sock");
        let mut server: Option<ServerInstance> = None;
        let mut registered_with: Option<(u64, u64)> = None;
        let mut last_error: Option<String> = None;
        loop {
            // Our socket gone or replaced (kubelet wiped its directory), or
            // the server died: serve again on a fresh socket.
            let ours = identity(&self.socket_path());
            let healthy = server.as_ref().is_some_and(|s| {
                s.socket_identity.is_some() && s.socket_identity == ours && !s.task.is_finished()
            });
            if !healthy {
                if let Some(old) = server.take() {
                    tracing::info!(resource = %resource, "plugin socket vanished; serving again");
                    self.stop_server(old).await;
                }
                match self.start_server() {
                    Ok(s) => server = Some(s),
                    Err(e) => tracing::error!(error = %e, "cannot serve"),
                }
                registered_with = None;
            }
            let kubelet = identity(&kubelet_socket);
            if server.is_some() && kubelet.is_some() && kubelet != registered_with {
                let attempt = tokio::time::timeout(
                    Duration::from_secs(2),
                    register(&kubelet_socket, &self.endpoint, &resource),
                )
                .await;
                match attempt {
                    Ok(Ok(())) => {
                        tracing::info!(resource = %resource, endpoint = %self.endpoint, "registered with the kubelet");
                        registered_with = kubelet;
                        last_error = None;
                    }
                    Ok(Err(e)) => log_once(&mut last_error, e.to_string()),
                    Err(_) => log_once(&mut last_error, "registration timed out".into()),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if let Some(s) = server.take() {
            let mine = s.socket_identity;
            self.stop_server(s).await;
            // Only remove the socket if it is still ours, not a successor's.
            if mine.is_some() && identity(&self.socket_path()) == mine {
                let _ = std::fs::remove_file(self.socket_path());
            }
        }
        tracing::info!(resource = %resource, "stopped");
        Ok(())
    }
}

fn log_once(last: &mut Option<String>, msg: String) {
    if last.as_deref() != Some(msg.as_str()) {
        tracing::warn!(error = %msg, "registration with the kubelet failed; retrying");
        *last = Some(msg);
    }
}
