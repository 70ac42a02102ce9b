//! gRPC over unix sockets: a client channel to a socket path, and a server
//! listener on one.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{Error, Result};

/// A channel to the gRPC server on `path`. The URI is a placeholder: the
/// connector ignores it and dials the socket.
pub async fn connect_unix(path: &Path) -> Result<Channel> {
    let p: PathBuf = path.to_owned();
    let endpoint = Endpoint::from_static("http://localhost")
        .connect_timeout(std::time::Duration::from_secs(2));
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|source| Error::Connect {
            path: path.to_owned(),
            source,
        })
}

/// Binds `path`, replacing a stale socket file left by an earlier run.
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Bind {
                path: path.to_owned(),
                source,
            });
        }
    }
    UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_owned(),
        source,
    })
}
