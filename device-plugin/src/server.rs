//! The DevicePlugin gRPC service the kubelet calls on our socket. Thin: it
//! reads the resource manager, calls the pure allocation functions and records
//! tokens.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::allocation::{self, AllocateOptions, Candidate};
use crate::api;
use crate::api::device_plugin_server::DevicePlugin;
use crate::discovery::{Device, Health};
use crate::podresources::TokenCollector;
use crate::resource::{ResourceKind, ResourceManager};
use crate::tokens::{RECORD_VERSION, TokenRecord, TokenStore, token_device, token_sha256};

pub struct DevicePluginService {
    pub manager: Arc<ResourceManager>,
    /// Records tokens and binds them to their pods.
    pub tokens: Arc<TokenCollector>,
    pub options: AllocateOptions,
    /// Ends open ListAndWatch streams when this server instance stops, so a
    /// graceful shutdown does not wait on them forever.
    pub stop: watch::Receiver<bool>,
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for DevicePluginService {
    async fn get_device_plugin_options(
        &self,
        _request: Request<api::Empty>,
    ) -> Result<Response<api::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = ListStream;

    async fn list_and_watch(
        &self,
        _request: Request<api::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let resource = self.manager.resource_name.clone();
        let mut stop = self.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        // WatchStream yields the current list first, then every change of
        // the advertised list only: the kubelet rewrites its checkpoint on
        // each message, so internal state changes must not reach it.
        let stream = WatchStream::new(self.manager.watch_advertised())
            .map(move |devices| {
                tracing::debug!(
                    resource = %resource,
                    devices = devices.len(),
                    "sending the device list"
                );
                Ok(api::ListAndWatchResponse {
                    devices: devices.as_ref().clone(),
                })
            })
            .take_until(Box::pin(stopped));
        tracing::info!(resource = %self.manager.resource_name, "kubelet opened ListAndWatch");
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        let state = self.manager.snapshot();
        let mut container_responses = Vec::new();
        for req in request.into_inner().container_requests {
            let size = usize::try_from(req.allocation_size).map_err(|_| {
                Status::invalid_argument(format!(
                    "allocation_size {} is negative",
                    req.allocation_size
                ))
            })?;
            let candidates: Vec<Candidate<'_>> = req
                .available_device_i_ds
                .iter()
                .filter_map(|id| {
                    let d = self.manager.resolve(&state, id)?;
                    (d.health == Health::Healthy).then_some(Candidate {
                        advertised_id: id.as_str(),
                        physical_id: d.id.as_str(),
                        numa_node: d.numa_node,
                    })
                })
                .collect();
            let must: Vec<&str> = req
                .must_include_device_i_ds
                .iter()
                .map(String::as_str)
                .collect();
            container_responses.push(api::ContainerPreferredAllocationResponse {
                device_i_ds: allocation::preferred(&candidates, &must, size),
            });
        }
        Ok(Response::new(api::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let state = self.manager.snapshot();
        let mut container_responses = Vec::new();
        for req in request.into_inner().container_requests {
            let mut physical: Vec<&Device> = Vec::new();
            for id in &req.devices_ids {
                let d = self.manager.resolve(&state, id).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "unknown device {id:?} for {}; known: {}",
                        self.manager.resource_name,
                        known_ids(&self.manager, &state.devices)
                    ))
                })?;
                if d.health != Health::Healthy {
                    return Err(Status::failed_precondition(format!(
                        "device {id:?} of {} is Unhealthy: {}",
                        self.manager.resource_name,
                        d.reason.as_deref().unwrap_or("unknown reason")
                    )));
                }
                if !physical.iter().any(|p| p.id == d.id) {
                    physical.push(d);
                }
            }
            let agent_slot = self.manager.kind == ResourceKind::AgentSocket;
            let token = TokenStore::mint().map_err(|e| Status::internal(e.to_string()))?;
            let now = TokenStore::now_ms();
            let record = TokenRecord {
                version: RECORD_VERSION,
                token_sha256: token_sha256(&token),
                resource_name: self.manager.resource_name.clone(),
                device_ids: req.devices_ids.clone(),
                // A slot is no device: the record grants the agent on the CPU.
                devices: if agent_slot {
                    vec![]
                } else {
                    physical.iter().map(|d| token_device(d)).collect()
                },
                created_unix_ms: now,
                expires_unix_ms: Some(now.saturating_add(self.tokens.lease.as_millis() as u64)),
                owner: None,
                agent_slot,
            };
            self.tokens.store.record(&record).map_err(|e| {
                tracing::error!(error = %e, "cannot record allocation token");
                Status::internal(format!("cannot record allocation token: {e}"))
            })?;
            self.tokens.bind_soon(record.token_sha256.clone());
            tracing::info!(
                resource = %self.manager.resource_name,
                devices = ?req.devices_ids,
                "allocated"
            );
            container_responses.push(if agent_slot {
                allocation::agent_socket_response(&self.options, &token)
            } else {
                allocation::container_response(
                    &physical,
                    &state.control_nodes,
                    &self.options,
                    &token,
                )
            });
        }
        Ok(Response::new(api::AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _request: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        Ok(Response::new(api::PreStartContainerResponse {}))
    }
}

/// What we tell the kubelet at registration and on request.
pub fn options() -> api::DevicePluginOptions {
    api::DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

fn known_ids(manager: &ResourceManager, devices: &[Device]) -> String {
    let ids: Vec<String> = devices
        .iter()
        .map(|d| manager.advertised_id(&d.id, 0))
        .collect();
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}
